"""Rows between ranks over torch.distributed: the `Transport` of runtime_ep.py.

Every exchange is two `all_to_all_single` calls: the row counts, then the rows (float32,
one width per exchange) with those splits. gloo runs them on CPU tensors; with NCCL (ranks
with a GPU each) the same calls run on device tensors (the rows are copied there and back,
since the expert programs are CPU programs today). A peer that exits or stops answering makes
the collective fail within the process group's timeout (init_process_group's `timeout`,
which gloo applies to every operation); that failure becomes one MocompileError line naming
this rank and what it was doing, never a hang.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mocompile.distributed import PEER_FAILURE
from mocompile.errors import MocompileError


class TorchTransport:
    """This process's rank in the default process group (env:// rendezvous: MASTER_ADDR,
    MASTER_PORT, as torchrun and the run-ep launcher set them)."""

    def __init__(self, rank: int, size: int, timeout_s: float, backend: str = "gloo") -> None:
        self.rank, self.size, self.timeout_s, self.backend = rank, size, timeout_s, backend
        self.what = "joining the process group"
        self.device = torch.device("cpu")
        if backend == "nccl":
            if not torch.cuda.is_available() or not dist.is_nccl_available():
                raise MocompileError(f"rank {rank}: --dist-backend nccl needs CUDA GPUs and a torch built with NCCL")
            self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
            torch.cuda.set_device(self.device)
        try:
            dist.init_process_group(self.backend, rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:
            raise self._failed(e) from None
        self.what = "an all-to-all"

    def _failed(self, e: BaseException) -> MocompileError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return MocompileError(f"rank {self.rank}: {self.what} failed: {PEER_FAILURE} within {self.timeout_s:g} s "
                              f"({self.backend}: {first[:200]})")

    def exchange(self, send: Sequence[np.ndarray]) -> list[np.ndarray]:
        """send[r] to rank r; what each rank sent here, by rank."""
        width = send[0].shape[1]
        counts = torch.tensor([len(a) for a in send], dtype=torch.int64, device=self.device)
        received = torch.empty_like(counts)
        rows = torch.from_numpy(np.ascontiguousarray(np.concatenate(send), np.float32)).to(self.device)
        try:
            dist.all_to_all_single(received, counts)
            split = received.cpu().tolist()
            out = torch.empty((sum(split), width), dtype=torch.float32, device=self.device)
            dist.all_to_all_single(out, rows, output_split_sizes=split, input_split_sizes=counts.cpu().tolist())
        except Exception as e:
            raise self._failed(e) from None
        return np.split(out.cpu().numpy(), np.cumsum(split)[:-1])

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, obj)
        except Exception as e:
            raise self._failed(e) from None
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
