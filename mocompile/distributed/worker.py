"""One rank of `mocompile run-ep` (or of a torchrun launch):

    torchrun --standalone --nproc-per-node 2 -m mocompile.distributed.worker ARTIFACT --out out.npz

The rank comes from the environment torchrun (and the run-ep launcher) set: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT. The job: a batch of token ids (`--tokens FILE.npy`,
else random ones of `--batch` x `--seq` from `--seed`) split over the ranks by sequence; a
plain forward over every position (the prefill), then the same ids through a KV cache: the
first `--prompt` positions at once, then one cached decode step per further position. Rank 0
writes the logits of both, gathered in batch order, with the ids and which experts each rank
held, to `--out` (.npz: ids, prefill, decode, ranks as JSON).

MOCOMPILE_EP_FAULT=RANK:CALL:exit|hang (for tests of failure handling): that rank exits
(status 3, no message) or sleeps for ever when it is asked for its CALL-th experts call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mocompile.arguments import POSITIVE
from mocompile.artifact import read_manifest
from mocompile.errors import MocompileError
from mocompile.runtime_ep import PLACEMENTS, ExpertParallelRank, default_placement, open_rank
from mocompile.signature import random_inputs

DEFAULT_TIMEOUT_S = 60.0  # seconds a rank waits for the others at any exchange before it fails
FAULT_ENV = "MOCOMPILE_EP_FAULT"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text!r})")
    return value


def add_job_args(p: argparse.ArgumentParser) -> None:
    """The options of one run (shared by `mocompile run-ep` and this module's command line)."""
    p.add_argument("artifact", help="an artifact compiled with --ep")
    p.add_argument("--placement", choices=PLACEMENTS, default=None,
                   help="plan: the artifact's place-pass plan, one rank per device (the default where it has one); "
                        "round-robin: expert e of each layer on rank e mod N")
    p.add_argument("--tokens", metavar="FILE.npy", help="token ids [batch, seq] (default: random, from --seed)")
    p.add_argument("--batch", type=POSITIVE, default=2, help="sequences of the random batch (default 2)")
    p.add_argument("--seq", type=POSITIVE, default=8, help="positions of each random sequence (default 8)")
    p.add_argument("--prompt", type=POSITIVE, default=None,
                   help="positions prefilled into the KV cache before decoding one at a time (default: seq - 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist-backend", choices=("gloo", "nccl"), default="gloo",
                   help="torch.distributed backend of the exchanges (default gloo; nccl: ranks with one GPU each, "
                        "the rows moved through device memory)")
    p.add_argument("--out", metavar="FILE.npz", help="where rank 0 writes the ids, logits and placement")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds a rank waits for the others before failing (default {DEFAULT_TIMEOUT_S:g})")


def _fault(rank: ExpertParallelRank, me: int) -> None:
    """Arm the failure hook of MOCOMPILE_EP_FAULT on this rank."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    who, call, how = spec.split(":")
    if int(who) != me:
        return
    serve = rank.serve

    def faulty(*args: Any) -> np.ndarray:
        if rank.calls + 1 >= int(call):
            if how == "exit":
                os._exit(3)
            while True:
                time.sleep(3600)
        return serve(*args)

    rank.serve = faulty  # type: ignore[method-assign]


def job_inputs(a: argparse.Namespace, rank: ExpertParallelRank) -> tuple[str, np.ndarray, int]:
    """(token input name, ids [batch, seq], prompt) of the run."""
    model = rank.model
    if len(model.signature.inputs) != 1:
        raise MocompileError(f"run-ep feeds token ids; this model takes {len(model.signature.inputs)} inputs")
    name = model.token_input.name
    ids = np.load(a.tokens) if a.tokens else random_inputs(model.signature, a.batch, a.seq, a.seed)[name]
    if ids.ndim != 2 or not ids.size:
        raise MocompileError(f"{a.tokens}: token ids must be [batch, seq] (got shape {list(ids.shape)})")
    ids = ids.astype(model.token_input.dtype)
    prompt = a.prompt if a.prompt is not None else max(1, ids.shape[1] - 4)
    if not 1 <= prompt <= ids.shape[1]:
        raise MocompileError(f"--prompt {prompt}: must be in 1..{ids.shape[1]} (the sequence length)")
    return name, ids, prompt


def run_job(rank: ExpertParallelRank, name: str, ids: np.ndarray, prompt: int) -> dict[str, np.ndarray]:
    """This rank's part of the job; the outputs of the whole batch (gathered, on every rank)."""
    transport = rank.transport
    mine = ids[np.array_split(np.arange(ids.shape[0]), transport.size)[transport.rank]]
    output = rank.model.signature.outputs[0].name
    if mine.shape[0]:
        prefill = rank.model.run({name: mine})[output]
        decode = rank.model.run_cached({name: mine}, prompt)[output]
    else:  # no sequence here: take part in the prefill and in every cached step
        for _ in range(1 + 1 + ids.shape[1] - prompt):
            rank.idle_forward()
        prefill = decode = None
    parts = transport.gather((prefill, decode))
    return {"prefill": np.concatenate([p for p, _ in parts if p is not None]),
            "decode": np.concatenate([d for _, d in parts if d is not None])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mocompile.distributed.worker", description="one rank of mocompile run-ep")
    add_job_args(p)
    a = p.parse_args(argv)
    me, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    from mocompile.distributed.transport import TorchTransport  # torch, only in a rank's process

    rank = None
    try:
        manifest = read_manifest(a.artifact, check_files=False)  # each rank checks the files it reads
        how = default_placement(manifest, a.placement)
        transport = TorchTransport(me, size, a.timeout, a.dist_backend)
        rank = open_rank(a.artifact, manifest, transport, how)
        _fault(rank, me)
        name, ids, prompt = job_inputs(a, rank)
        outs = run_job(rank, name, ids, prompt)
        held = transport.gather(rank.experts.files)
        if me == 0 and a.out:
            ranks = [{"rank": r, "expert_files": files} for r, files in enumerate(held)]
            np.savez(Path(a.out), ids=ids, prompt=np.array(prompt), placement=np.array(how),
                     ranks=np.array(json.dumps(ranks)), **outs)
        transport.close()
    except Exception as e:  # one line, never a traceback: the launcher reports it for the run
        failure = (rank.failure if rank is not None else None) or e  # an error inside the program is only text there
        if not isinstance(failure, MocompileError):
            failure = MocompileError(f"internal error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}")
        message = str(failure) if str(failure).startswith(f"rank {me}:") else f"rank {me}: {failure}"
        print(f"mocompile: error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
