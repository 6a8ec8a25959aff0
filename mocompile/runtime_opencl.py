"""The OpenCL device of the GPU runtime (gpu_plan.Device) through pyopencl: the artifact's
OpenCL C is built for the device at load time (as OpenCL always does), buffers live in the
device's memory, and each launch is an NDRange of grid x block work items in work-groups of
`block`. Any OpenCL device runs it; without a GPU, PoCL runs it on the CPU."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mocompile.errors import ArtifactError
from mocompile.gpu_devices import opencl_devices, pyopencl_module


class OpenclDevice:
    def __init__(self, source: str) -> None:
        cl = self.cl = pyopencl_module()
        devices = opencl_devices()
        if not devices:
            raise ArtifactError("no OpenCL device is available (install a GPU's OpenCL driver, or PoCL: "
                                "apt-get install pocl-opencl-icd)")
        self.name = devices[0].name
        self.ctx = cl.Context([devices[0]])
        self.queue = cl.CommandQueue(self.ctx)
        try:
            self.program = cl.Program(self.ctx, source).build()
        except cl.Error as e:
            raise ArtifactError(f"the OpenCL driver ({self.name}) rejected the artifact's kernels: "
                                f"{str(e).splitlines()[0]}") from None
        self._kernels: dict[str, Any] = {}

    def alloc(self, nbytes: int) -> Any:
        return self.cl.Buffer(self.ctx, self.cl.mem_flags.READ_WRITE, size=max(int(nbytes), 4))

    def upload(self, array: np.ndarray) -> Any:
        mf = self.cl.mem_flags
        return self.cl.Buffer(self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(array))

    def download(self, buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.cl.enqueue_copy(self.queue, out, buffer)
        return out

    def scalar(self, value: int, dtype: str) -> Any:
        return np.dtype(dtype).type(value)

    def launch(self, kernel: str, args: Sequence[Any], grid: Sequence[int], block: Sequence[int]) -> None:
        k = self._kernels.get(kernel)
        if k is None:
            k = self._kernels[kernel] = getattr(self.program, kernel)
        k.set_args(*args)
        size = tuple(g * b for g, b in zip(grid, block))
        self.cl.enqueue_nd_range_kernel(self.queue, k, size, tuple(block))
