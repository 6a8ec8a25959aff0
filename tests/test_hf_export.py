"""The Mixtral export the llama.cpp benchmark column converts from (dsl/hf_export.py): a spec
written as a Hugging Face checkpoint imports back, through our own importer, to the same spec
and bit-identical parameters; transformers reads the same checkpoint to the same logits; a
spec Mixtral cannot express is refused with the feature it lacks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mocompile.dsl import build_model, load_spec
from mocompile.dsl.hf_export import export_mixtral, mixtral_blocker
from mocompile.dsl.hf_import import import_checkpoint
from mocompile.dsl.hf_weights import build_hf_model
from mocompile.errors import MocompileError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    spec = load_spec(EXAMPLES / "mixtral_tiny.moe")
    model = build_model(spec, seed=3)
    out = export_mixtral(spec, model, tmp_path_factory.mktemp("ckpt") / "mixtral_tiny")
    return spec, model, out


def test_export_imports_back_to_the_same_spec_and_weights(exported):
    spec, model, out = exported
    ckpt = import_checkpoint(out)
    assert replace(ckpt.spec, name=spec.name, source="") == replace(spec, source="")
    back = build_hf_model(ckpt)
    want = dict(model.named_parameters())
    got = dict(back.named_parameters())
    assert set(got) == set(want)
    for name, p in want.items():
        assert torch.equal(got[name], p), name
    # the per-expert tensors llama.cpp's converter stacks are there under Mixtral's names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 8


def test_transformers_reads_the_export_to_the_reference_logits(exported):
    transformers = pytest.importorskip("transformers")
    spec, model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, spec.vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(text=ids)
        got = hf(ids).logits
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()


@pytest.mark.parametrize("example, reason", [
    ("deepseek_tiny", "not every layer is the same MoE block"),
    ("latent_tiny", "latent attention"),
    ("unified_tiny", "modalities"),
])
def test_specs_mixtral_cannot_express_are_refused(example, reason, tmp_path):
    spec = load_spec(EXAMPLES / f"{example}.moe")
    assert reason in mixtral_blocker(spec)
    with pytest.raises(MocompileError, match=f"{example}: cannot be written as a Mixtral checkpoint: .*{reason}"):
        export_mixtral(spec, None, tmp_path / example)
    assert not (tmp_path / example).exists()


def test_a_routing_feature_mixtral_lacks_is_named():
    spec = load_spec(EXAMPLES / "mixtral_tiny.moe")
    bent = replace(spec, moes=(replace(spec.moes[0], scoring="sigmoid"),))
    assert mixtral_blocker(bent) == "block sparse: scoring = 'sigmoid' (Mixtral has softmax routing)"
    assert mixtral_blocker(spec) is None
