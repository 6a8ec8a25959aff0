"""`mocompile run-ep`: run an artifact compiled with `--ep` over N processes, expert parallel.

    mocompile run-ep ARTIFACT --nproc 2 [--out run.npz] [--check]
    torchrun --standalone --nproc-per-node 2 -m mocompile.distributed.worker ARTIFACT --out run.npz  # the same ranks

The ranks (mocompile/distributed/worker.py) split the batch by sequence, hold only their
experts and exchange tokens with all-to-all (runtime_ep.py). `--check` then compares what
they computed with the single-process artifact (which reads every weight, in this process):
the prefill's logits and those of the cached decode steps must agree within the
verification tolerance (verification.TOLERANCE, relative to the largest logit), since the
expert-parallel run sums each token's experts in the same slot order but through other
kernel calls, so equality to the last bit is not promised.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mocompile.artifact import placement_plan, read_manifest
from mocompile.errors import MocompileError
from mocompile.runtime_ep import check_rank_count, default_placement, placement_of


def add_parser(sub: Any, positive: Any) -> None:
    """Register the `run-ep` subcommand (`positive`: the CLI's positive integer type)."""
    from mocompile.distributed.worker import add_job_args

    p = sub.add_parser("run-ep", help="run an artifact compiled with --ep over N processes (expert parallelism on "
                                      "torch.distributed)")
    add_job_args(p)
    p.add_argument("--nproc", type=positive, default=None,
                   help="ranks to start (default: one per device of the artifact's placement plan, else 2)")
    p.add_argument("--check", action="store_true", help="compare with the single-process artifact")


def _nproc(a: argparse.Namespace, manifest: dict[str, Any]) -> int:
    """The ranks to start, after refusing what the ranks would refuse (before starting any)."""
    if "ep" not in manifest:
        raise MocompileError(f"{a.artifact}: has no expert-parallel pieces (compile it with --ep)")
    plan = placement_plan(manifest)
    how = default_placement(manifest, a.placement)
    nproc = a.nproc or (len(plan["devices"]) if plan and how == "plan" else 2)
    check_rank_count(manifest, nproc)
    placement_of(manifest, nproc, how)
    return nproc


def check_against_single(artifact: str | Path, run: Any) -> dict[str, float]:
    """Relative errors of the run's logits against the single-process artifact on the same ids."""
    from mocompile.runtime import load
    from mocompile.verification import TOLERANCE, relative_error

    single = load(artifact)
    name = single.token_input.name
    ids, prompt = run["ids"], int(run["prompt"])
    output = single.signature.outputs[0].name
    errors = {"prefill": relative_error(run["prefill"], single.run({name: ids})[output])[1],
              "decode": relative_error(run["decode"], single.run_cached({name: ids}, prompt)[output])[1]}
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    if bad:
        k, v = next(iter(bad.items()))
        raise MocompileError(f"run-ep: the {k} logits disagree with the single-process artifact: relative error "
                             f"{v:.3g} > {TOLERANCE:g}")
    return errors


def cmd_run_ep(a: argparse.Namespace) -> int:
    from mocompile.distributed.launcher import launch

    manifest = read_manifest(a.artifact, check_files=False)  # the ranks check the files they read
    nproc = _nproc(a, manifest)
    with tempfile.TemporaryDirectory(prefix="mocompile-run-ep-") as tmp:
        out = Path(a.out) if a.out else Path(tmp) / "run.npz"
        args = [str(a.artifact), "--out", str(out), "--batch", str(a.batch), "--seq", str(a.seq), "--seed",
                str(a.seed), "--timeout", str(a.timeout), *(["--tokens", a.tokens] if a.tokens else []),
                *(["--prompt", str(a.prompt)] if a.prompt is not None else []),
                *(["--placement", a.placement] if a.placement else []), "--dist-backend", a.dist_backend]
        launch(nproc, args)
        with np.load(out) as f:
            run = {k: f[k] for k in f.files}
    ranks = json.loads(str(run["ranks"]))
    batch, seq = run["ids"].shape
    print(f"run-ep: {nproc} ranks ({run['placement']} placement), batch {batch}, {seq} positions: prefill, then "
          f"{int(run['prompt'])} prompt positions and {seq - int(run['prompt'])} cached decode steps")
    for r in ranks:
        print(f"  rank {r['rank']}: {len(r['expert_files'])} expert weight files read")
    if a.check:
        errors = check_against_single(a.artifact, run)
        print(f"matches the single-process artifact: max relative error {errors['prefill']:.2g} (prefill), "
              f"{errors['decode']:.2g} (cached decode)")
    if a.out:
        print(f"logits -> {a.out}")
    return 0
