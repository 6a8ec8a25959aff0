"""The `mocompile` command. Every user-facing failure is one line on stderr and exit 1; a
usage error (an unknown option, a negative count) exits 2 before any work starts;
`check-isolation` exits 3 when the model leaks between samples or isolation is unknown; an
internal error (a compiler bug) exits 70; a closed stdout (`| head`) ends quietly with 141. Set MOCOMPILE_DEBUG=1 to see the traceback of
an internal error and TVM's own log lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from mocompile.arguments import COUNT, POSITIVE
from mocompile.errors import MocompileError
from mocompile.native_log import native_log_filter

EXIT_NOT_ISOLATED = 3  # check-isolation: the model leaks between samples, or isolation could not be shown
EXIT_INTERNAL = 70  # a compiler bug (BSD's EX_SOFTWARE), told apart from argparse's usage errors (2)
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (128 + SIGPIPE, what a shell reports for cat | head)




class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line: `mocompile: error: ...`, exit 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_shape_args(p: argparse.ArgumentParser, batch: int, seq: int) -> None:
    p.add_argument("--batch", type=POSITIVE, default=batch, help=f"batch size (default {batch})")
    p.add_argument("--seq", type=POSITIVE, default=seq, help=f"positions per input segment (default {seq})")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mocompile", description="Compile mixture-of-experts models.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="compile a .moe spec or a Hugging Face checkpoint into an artifact directory")
    c.add_argument("spec", help="a .moe spec file, or a Hugging Face checkpoint directory (config.json + safetensors)")
    c.add_argument("-o", "--out", required=True, help="artifact directory to write")
    c.add_argument("--target", default="cpu", help="code generation target and its options (default cpu, this "
                                                   "machine's CPU; cpu [-mcpu=NAME] [-mattr=+f,-f] [-num-cores=N])")
    c.add_argument("--device", help="with --target fpga: alveo-u280, zcu104 or a device .toml file")
    c.add_argument("--variant", help="elastic sub-model declared in the spec")
    c.add_argument("--passes", default="", help='pass pipeline, e.g. "dce,fold-constants"')
    c.add_argument("--weights", help="safetensors file with the full model's weights (default: from --seed)")
    c.add_argument("--seed", type=COUNT, default=0, help="seed of the deterministic weights and test inputs")
    c.add_argument("--plugin", action="append", default=[], help="Python file registering extra passes")
    c.add_argument("--tune", type=COUNT, default=0, metavar="N",
                   help="spend N measured trials tuning the matmul kernels on this machine (MetaSchedule for the "
                        "dense ones, a tile search for the per-expert ones) and keep the fastest (the tuning "
                        "database is saved in the artifact and reused when compiling into the same directory)")
    c.add_argument("--tuning-db", metavar="FILE", help="tuning database to reuse (and, with --tune, to extend)")
    c.add_argument("--calib", metavar="FILE.npy|TEXT", help="calibration token ids [n, seq] for the data-driven passes "
                                                       "(or plain text, for a checkpoint directory with a tokenizer.json; "
                                                       "default: random tokens, which the manifest records)")
    c.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="how matmul and embedding weights are stored "
                   "(widened to float32 in the kernels; with a quantize pass, those it leaves float; "
                   "default: bf16 for a bf16 checkpoint, else fp32)")
    c.add_argument("--require-isolation", action="store_true",
                   help="fail unless no sample of a batch can influence another sample's output")
    c.add_argument("--ep", action="store_true", help="also write the expert-parallel pieces `mocompile run-ep` runs")
    c.add_argument("--stream", action="store_true",
                   help="(checkpoint directory) leave the weights in the checkpoint's files and read them one tensor "
                        "at a time: compiles models whose float32 weights do not fit in memory, verifying layer by layer")
    _add_shape_args(c, 2, 8)

    h = sub.add_parser("import-hf", help="write the spec (and optionally the weights) of a Hugging Face MoE checkpoint")
    h.add_argument("checkpoint", help="checkpoint directory: config.json and *.safetensors (with or without an index)")
    h.add_argument("-o", "--out", required=True, help=".moe spec file to write")
    h.add_argument("--weights", help="also write the weights, renamed for the spec, to this safetensors file")

    r = sub.add_parser("run", help="run an artifact on random inputs and time it")
    r.add_argument("artifact")
    r.add_argument("--seed", type=COUNT, default=0)
    r.add_argument("--repeat", type=POSITIVE, default=10, help="timed calls (default 10)")
    r.add_argument("--generate", type=COUNT, default=0, metavar="N",
                   help="greedy-decode N tokens after a random prompt of --seq tokens, through the KV cache")
    _add_shape_args(r, 1, 8)

    b = sub.add_parser("check-isolation", help="prove that no sample of a batch can influence another sample's output")
    b.add_argument("path", help="a .moe spec or Hugging Face checkpoint (static proof, witness of a leak) or an "
                                "artifact directory (recorded verdict, differential run)")
    b.add_argument("--variant", help="with a spec: the elastic sub-model to check")
    b.add_argument("--passes", default="", help="with a spec: pass pipeline to run before the check")
    b.add_argument("--plugin", action="append", default=[], help="Python file registering extra passes")
    b.add_argument("--seed", type=COUNT, default=0, help="seed of the weights and test inputs")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_shape_args(b, 3, 8)

    pl = sub.add_parser("passes", help="list the passes a pipeline may use, with their options")
    pl.add_argument("--plugin", action="append", default=[], help="Python file registering extra passes")

    rp = sub.add_parser("report", help="write an HTML report of an artifact (model, passes, expert load, profile, "
                                       "isolation, verification)")
    rp.add_argument("artifact", help="an artifact directory")
    rp.add_argument("-o", "--out", help="HTML file to write (default: ARTIFACT.report.html beside the directory)")
    rp.add_argument("--no-run", action="store_true", help="only what the files say: no expert load, no profile")

    i = sub.add_parser("inspect", help="summarise a spec or an artifact")
    i.add_argument("path", help="a .moe spec, a Hugging Face checkpoint directory or an artifact directory")
    i.add_argument("--ir", action="store_true", help="print the IR")
    i.add_argument("--kernels", action="store_true", help="list a GPU artifact's kernels with their launch shapes")
    i.add_argument("--variant", help="with a spec: the elastic sub-model to show")
    from mocompile.place_cli import add_parser as add_place  # expert placement (mocompile/place_cli.py)

    add_place(sub, POSITIVE, COUNT)
    from mocompile.run_ep_cli import add_parser as add_run_ep  # expert-parallel runs (mocompile/run_ep_cli.py)

    add_run_ep(sub, POSITIVE)
    return ap


def _flips_note(checks: list[dict]) -> str:
    """How many values on a rounding boundary the reference rounded the artifact's way."""
    flips = sum(c.get("rounding_flips", 0) for c in checks)
    return f"; {flips} value(s) on a rounding boundary rounded the artifact's way" if flips else ""


def cmd_compile(a: argparse.Namespace) -> int:
    from mocompile.compiler import compile, stderr_progress

    if a.device and a.target.split()[:1] != ["fpga"]:
        raise MocompileError(f"--device {a.device}: only --target fpga takes a device")
    target = f"{a.target} -device={a.device}" if a.device else a.target
    art = compile(a.spec, target=target, passes=a.passes, out_dir=a.out, variant=a.variant, weights=a.weights,
                  seed=a.seed, batch=a.batch, seq=a.seq, plugins=tuple(a.plugin), progress=stderr_progress,
                  require_isolation=a.require_isolation, tune=a.tune, tuning_db=a.tuning_db, calibration=a.calib,
                  ep=a.ep, dtype=a.dtype, stream=a.stream)
    v = art.manifest["verification"]
    print(f"compiled {art.manifest['model']['name']}"
          f"{' (variant ' + a.variant + ')' if a.variant else ''} for {a.target} -> {art.path}"
          f" (weights {art.manifest['weight_dtype']})")
    for report in art.manifest["passes"]:
        if report.get("summary"):
            print(f"{report['pass']}: {report['summary']}")
    if v["status"] != "verified":
        print(f"NOT VERIFIED by running it: the artifact cannot run on this machine ({v['reason']})")
        for check in v["checked"]:
            print(f"  checked instead: {check}")
        print(f"batch isolation: {art.manifest['isolation']['verdict']}")
        return 0
    print(f"verified against the {v['reference']}: max relative error {v['max_rel_error']:.2e} "
          f"(tolerance {v['tolerance']:g}{_flips_note(v['checks'])}), "
          f"max abs error {max(c['max_abs_error'] for c in v['checks']):.2e}")
    dec = art.manifest.get("decode_verification")
    if dec:
        print(f"cached decoding verified: prompt {dec['prompt']} + {dec['new_tokens']} tokens one at a time match "
              f"{dec['reference']}, max relative error {dec['max_rel_error']:.2e}{_flips_note([dec])}")
    pre = art.manifest.get("prefill_verification")
    if pre:
        print(f"prompt prefill (last position only) verified: equal bit for bit to the cached step's last position "
              f"over {pre['positions']} positions")
    if "ep" in art.manifest:  # compile --ep
        ep = art.manifest["ep"]["verification"]
        print(f"expert-parallel pieces ({len(art.manifest['ep']['layers'])} MoE layer(s) cut out, one weight file per "
              f"expert) verified: max relative error {ep['max_rel_error']:.3g}"
              f"{', cached decode ' + format(ep['decode']['max_rel_error'], '.3g') if 'decode' in ep else ''}")
    drift = art.manifest.get("drift_from_fp32")
    if drift:
        top1 = [c["top1_agreement"] for c in drift["checks"] if "top1_agreement" in c]
        print(f"drift from the fp32 model: max relative error {drift['max_rel_error']:.2e}"
              + (f", top-1 agreement {min(top1):.1%}" if top1 else ""))
    fpga = art.manifest["program"].get("summary")
    if fpga:
        print(f"fpga estimate: {fpga['dsp']:,} DSP, {fpga['bram18']:,} BRAM18, {fpga['uram']:,} URAM, {fpga['lut']:,} "
              f"LUT; {fpga['cycles_per_token']['at_full_cache']:,} cycles per token with a full KV cache"
              f"{'' if fpga['fits_on_chip'] else ' (weights stream from off-chip memory: see fpga_report.txt)'}")
    print(f"batch isolation: {art.manifest['isolation']['verdict']}")
    return 0


def cmd_import_hf(a: argparse.Namespace) -> int:
    """Import a checkpoint: the spec always, checked against the weights' headers; the
    weights themselves (streamed through the reference model) only with --weights."""
    from mocompile.dsl.hf_import import import_checkpoint, spec_text
    from mocompile.files import refuse_overwriting_inputs, write_atomically

    ckpt = import_checkpoint(a.checkpoint)
    out = Path(a.out)
    read = [p for p in Path(a.checkpoint).iterdir() if p.is_file()]  # config, weights, index, tokenizer
    refuse_overwriting_inputs(out, read, "the spec")
    if a.weights:
        refuse_overwriting_inputs(Path(a.weights), read, "the weights")
        if Path(a.weights).expanduser().resolve() == out.expanduser().resolve():
            raise MocompileError(f"{out}: given as both the spec (-o) and the --weights file; name two files")
        from mocompile.dsl.hf_weights import build_hf_model, save_weights

        save_weights(build_hf_model(ckpt), a.weights)
    else:
        from mocompile.dsl.hf_weights import check_checkpoint

        check_checkpoint(ckpt)
    write_atomically(out, lambda tmp: tmp.write_text(spec_text(ckpt), encoding="utf-8"), "spec")
    print(f"imported {ckpt.architecture} ({ckpt.family.name}, {len(ckpt.spec.layers)} layers) -> {out}")
    if a.weights:
        print(f"weights -> {a.weights} (compile with: mocompile compile {out} --weights {a.weights} -o OUT)")
    return 0


def _artifact_isolation(a: argparse.Namespace):
    """The verdict recorded at compile time, plus a differential run of the compiled code."""
    from mocompile.artifact_isolation import check_artifact
    from mocompile.runtime import load

    return check_artifact(load(a.path), a.batch, a.seq, a.seed)


def cmd_check_isolation(a: argparse.Namespace) -> int:
    if a.batch < 2:
        raise MocompileError(f"--batch must be at least 2 to compare samples (got {a.batch})")
    from mocompile.dsl.hf_import import is_checkpoint

    if Path(a.path).is_dir() and not is_checkpoint(a.path):
        report = _artifact_isolation(a)
    else:
        from mocompile.isolation_check import check_spec
        from mocompile.pass_manager import load_plugin

        for plugin in a.plugin:
            load_plugin(plugin)
        report, _ = check_spec(a.path, a.variant, seed=a.seed, batch=a.batch, seq=a.seq, passes=a.passes)
    print(json.dumps(report.to_json(), indent=2) if a.json else report.format())
    runs = [report.differential, (report.differential or {}).get("cached_step")]
    dynamic_ok = all(d["bitwise_identical"] for d in runs if d is not None)
    return 0 if report.verdict == "isolated" and dynamic_ok else EXIT_NOT_ISOLATED


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np

    from mocompile.runtime import load, random_inputs

    art = load(a.artifact)
    inputs = random_inputs(art.signature, a.batch, a.seq, a.seed)
    if a.generate:
        return _generate(art, inputs, a.generate)
    try:
        outputs = art.run(inputs)
    except ValueError as e:
        raise MocompileError(f"{a.artifact}: {e}") from None
    for name, arr in inputs.items():
        print(f"input  {name}: {arr.dtype}{list(arr.shape)}")
    for name, arr in outputs.items():
        finite = bool(np.isfinite(arr).all())
        print(f"output {name}: {arr.dtype}{list(arr.shape)} mean {arr.mean():.4g} std {arr.std():.4g} "
              f"min {arr.min():.4g} max {arr.max():.4g}{'' if finite else ' (NON-FINITE VALUES)'}")
    seconds = art.time_run(inputs, repeat=max(1, a.repeat))
    print(f"time per call: {seconds * 1e3:.3f} ms (median of {a.repeat}, batch {a.batch}, seq {a.seq})")
    return 0


def _generate(art: Any, prompt: dict, new_tokens: int) -> int:
    """Prefill the prompt, then decode token by token through the cache, timing both."""
    import numpy as np

    positions = sum(a.shape[1] for a in prompt.values())  # a multimodal prompt: every segment, tokens first
    batch = next(iter(prompt.values())).shape[0]
    times: list[float] = []
    try:
        cache = art.new_cache(batch, positions + new_tokens)  # refuses artifacts without a step function
        ids = prompt[art.token_input.name]
        tokens = art.generate(prompt, new_tokens, cache=cache, timings=times)
    except ValueError as e:
        raise MocompileError(f"{art.path}: {e}") from None
    for b, row in enumerate(tokens):
        print(f"sample {b}: prompt {ids[b].tolist()} -> {row.tolist()}")
    segments = ", ".join(f"{k} {a.shape[1]}" for k, a in prompt.items())
    decode = (f"{np.median(times[1:]) * 1e3:.3f} ms per token (median of {len(times) - 1}" if len(times) > 1
              else "no single-token step (one token comes from the prefill")
    print(f"prefill of {positions} positions ({segments}): {times[0] * 1e3:.3f} ms; decode: {decode}, batch "
          f"{batch}, KV cache of {cache.capacity} positions)")
    return 0


def _inspect_spec(a: argparse.Namespace) -> int:
    from mocompile.dsl import load_spec, resolve_variant
    from mocompile.dsl.hf_import import import_checkpoint, is_checkpoint
    from mocompile.dsl.summary import parameter_counts

    hf = is_checkpoint(a.path)
    spec = import_checkpoint(a.path).spec if hf else load_spec(a.path)
    if a.variant:
        try:
            spec = resolve_variant(spec, a.variant).spec
        except KeyError as e:
            raise MocompileError(str(e.args[0])) from None
    if a.ir:
        from mocompile.frontend import lower_source, source_for
        from mocompile.ir.printer import format_graph

        print(format_graph(lower_source(source_for(a.path, a.variant, None, 0))))
        return 0
    counts = parameter_counts(spec)
    print(f"model {spec.name}  ({spec.source})")
    m = spec.mla
    heads = (f"latent attention (q rank {m.q_lora_rank or '-'}, kv rank {m.kv_lora_rank}, qk dim "
             f"{m.qk_nope_head_dim}+{m.qk_rope_head_dim} rope, v dim {m.v_head_dim})" if m else
             f"kv {spec.kv_heads}, dim {spec.head_dim}")
    print(f"  hidden {spec.hidden}, heads {spec.heads} ({heads}), {len(spec.layers)} layers: {' '.join(spec.layers)}")
    print(f"  modalities: {', '.join(m.name + (f' (vocab {m.vocab})' if m.is_tokens else f' (features {m.features})') for m in spec.modalities)}")
    for moe in spec.moes:
        groups = ", ".join(f"{g.modality} {g.start}..{g.end}" for g in moe.groups) or "shared pool"
        print(f"  moe {moe.name}: {moe.experts} experts, top-{moe.top_k}, hidden {moe.expert_hidden}, "
              f"{moe.shared_experts} shared, {moe.scoring} scoring, groups: {groups}")
    if spec.variants:
        print(f"  variants: {', '.join(v.name for v in spec.variants)}")
    for k, v in counts.items():
        print(f"  {k.replace('_', ' '):<18} {v:>14,}")
    return 0


def _inspect_artifact(a: argparse.Namespace) -> int:
    from mocompile.artifact import read_manifest

    manifest = read_manifest(a.path)
    report = manifest["program"].get("report")
    if a.kernels:
        from mocompile.gpu_plan import describe_launches

        print("\n".join(describe_launches(manifest)))
    elif a.ir:
        print((Path(a.path) / "ir.txt").read_text(), end="")
    elif report:  # a target's own summary (fpga: kernels, precisions, resources, latency)
        print((Path(a.path) / report).read_text(), end="")
    else:
        print(json.dumps(manifest, indent=2))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from mocompile.dsl.hf_import import is_checkpoint

    return _inspect_artifact(a) if Path(a.path).is_dir() and not is_checkpoint(a.path) else _inspect_spec(a)


def cmd_passes(a: argparse.Namespace) -> int:
    from mocompile.pass_manager import describe_passes, load_plugin

    for plugin in a.plugin:
        load_plugin(plugin)
    print(describe_passes())
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from mocompile.report import write_report

    print(f"report -> {write_report(a.artifact, a.out, measure=not a.no_run)}")
    return 0


def cmd_run_ep(a: argparse.Namespace) -> int:
    from mocompile.run_ep_cli import cmd_run_ep as run_ep

    return run_ep(a)


def cmd_place(a: argparse.Namespace) -> int:
    from mocompile.place_cli import cmd_place as place

    return place(a)


COMMANDS = {"report": cmd_report, "passes": cmd_passes, "compile": cmd_compile, "import-hf": cmd_import_hf, "run": cmd_run,
            "inspect": cmd_inspect, "check-isolation": cmd_check_isolation, "place": cmd_place,
            "run-ep": cmd_run_ep}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = bool(os.environ.get("MOCOMPILE_DEBUG"))
    try:
        with native_log_filter(enabled=not debug):
            return COMMANDS[args.command](args)
    except BrokenPipeError:  # `mocompile ... | head`: the reader left; end quietly, as cat would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return EXIT_BROKEN_PIPE
    except MocompileError as e:
        print(f"mocompile: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mocompile: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a compiler bug: say so in one line unless debugging
        if debug:
            raise
        print(f"mocompile: internal error: {type(e).__name__}: {e} (set MOCOMPILE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
