"""A compile or an import never destroys a file of the user's: `-o` replaces only a complete
mocompile artifact, never the input, the current, home or root directory, a file, or a
directory of other things; refusals come before any heavy work; outputs get the umask's
permissions."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

import mocompile
from mocompile import cli
from mocompile.errors import MocompileError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC = EXAMPLES / "mixtral_tiny.moe"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with its content hash: what a refused command must leave as is."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if the compile gets as far as building the reference model."""
    import mocompile.compiler as compiler

    def refuse(*args, **kwargs):
        raise AssertionError("the compile started building the model before refusing its options")

    monkeypatch.setattr(compiler, "source_for", refuse)


def refused(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mocompile: error: "), err
    return err[0]


def test_a_directory_of_user_files_is_refused(tmp_path, capsys, no_heavy_work) -> None:
    user = tmp_path / "userdir"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "data.bin").write_bytes(b"\0\1")
    before = snapshot(tmp_path)
    msg = refused(capsys, "compile", str(SPEC), "-o", str(user))
    assert "not a mocompile artifact" in msg and "notes.txt" in msg and "sub/" in msg
    assert snapshot(tmp_path) == before


def test_the_checkpoint_itself_is_refused(tmp_path, capsys, no_heavy_work) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    before = snapshot(tmp_path)
    msg = refused(capsys, "compile", str(ckpt), "-o", str(ckpt))
    assert "its own input" in msg
    assert snapshot(tmp_path) == before


def test_the_spec_file_and_a_directory_holding_it_are_refused(tmp_path, capsys, no_heavy_work) -> None:
    project = tmp_path / "project"
    project.mkdir()
    spec = project / "model.moe"
    spec.write_bytes(SPEC.read_bytes())
    before = snapshot(tmp_path)
    assert "its own input" in refused(capsys, "compile", str(spec), "-o", str(spec))
    assert "its own input" in refused(capsys, "compile", str(spec), "-o", str(project))
    assert snapshot(tmp_path) == before  # no hidden .old / .partial siblings either


def test_current_home_and_root_directories_are_refused(tmp_path, capsys, monkeypatch, no_heavy_work) -> None:
    home, work = tmp_path / "home", tmp_path / "home" / "projects" / "work"
    work.mkdir(parents=True)
    (home / ".bashrc").write_text("keep")
    (work / "spec.moe").write_bytes(SPEC.read_bytes())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert "the current directory" in refused(capsys, "compile", "spec.moe", "-o", ".")
    assert "the current directory" in refused(capsys, "compile", "spec.moe", "-o", "..")  # holds it
    assert "home directory" in refused(capsys, "compile", "spec.moe", "-o", "~")
    assert "root directory" in refused(capsys, "compile", "spec.moe", "-o", "/")
    assert snapshot(tmp_path) == before


def test_a_file_and_a_symbolic_link_are_refused(tmp_path, capsys, no_heavy_work) -> None:
    (tmp_path / "file").write_text("data")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = snapshot(tmp_path)
    assert "is a file" in refused(capsys, "compile", str(SPEC), "-o", str(tmp_path / "file"))
    assert "symbolic link" in refused(capsys, "compile", str(SPEC), "-o", str(tmp_path / "link"))
    assert snapshot(tmp_path) == before


def test_bad_options_fail_before_any_work(tmp_path, capsys, no_heavy_work) -> None:
    out = str(tmp_path / "out")
    assert "tuning database not found" in refused(capsys, "compile", str(SPEC), "-o", out, "--tuning-db", "no.json")
    assert "--plugin file not found" in refused(capsys, "compile", str(SPEC), "-o", out, "--plugin", "no.py")
    assert "no option 'bits'" in refused(capsys, "compile", str(SPEC), "-o", out, "--passes", "quantize(bits=8)")
    for argv in (["--tune", "-1"], ["--batch", "0"], ["--seq", "-2"], ["--seed", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["compile", str(SPEC), "-o", out, *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and argv[0] in err[0]
    with pytest.raises(MocompileError, match="--batch must be a positive integer"):
        mocompile.compile(SPEC, out_dir=out, batch=0)
    assert not Path(out).exists()


def test_an_artifact_is_replaced_only_when_it_holds_nothing_else(tmp_path, capsys) -> None:
    old_umask = os.umask(0o027)
    try:
        art = mocompile.compile(SPEC, out_dir=tmp_path / "art", batch=1, seq=2)
    finally:
        os.umask(old_umask)
    for f in art.path.iterdir():  # the weights too (safetensors writes 0600 temporaries)
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o640 == 0o640 and not mode & 0o027, (f.name, oct(mode))
    (art.path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    msg = refused(capsys, "compile", str(SPEC), "-o", str(art.path), "--batch", "1", "--seq", "2")
    assert "did not write (notes.txt)" in msg
    assert snapshot(tmp_path) == before


def test_import_hf_never_writes_over_the_checkpoint(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                        num_hidden_layers=1, intermediate_size=32, num_local_experts=2,
                                        num_experts_per_tok=1, max_position_embeddings=64)
    ckpt = tmp_path / "ckpt"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(ckpt)
    capsys.readouterr()  # transformers' progress bars
    before = snapshot(tmp_path)
    assert "its own input" in refused(capsys, "import-hf", str(ckpt), "-o", str(ckpt / "config.json"))
    assert "its own input" in refused(capsys, "import-hf", str(ckpt), "-o", str(ckpt))
    assert "its own input" in refused(capsys, "import-hf", str(ckpt), "-o", str(tmp_path / "m.moe"),
                                      "--weights", str(ckpt / "model.safetensors"))
    assert snapshot(tmp_path) == before
    old_umask = os.umask(0o022)
    try:
        assert cli.main(["import-hf", str(ckpt), "-o", str(tmp_path / "m.moe"), "--weights", str(tmp_path / "m.st")]) == 0
    finally:
        os.umask(old_umask)
    for name in ("m.moe", "m.st"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.moe", "m.st"]  # no temporaries left
