"""The CUDA device of the GPU runtime (gpu_plan.Device) through the CUDA driver API
(cuda-python's `cuda.bindings.driver`): the artifact's cubin (nvcc, at compile time) is
loaded into the device's primary context, buffers are device allocations, and each launch is
cuLaunchKernel with the plan's grid and block. No torch, no TVM."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mocompile.errors import ArtifactError
from mocompile.gpu_devices import check_cuda as _check
from mocompile.gpu_devices import cuda_driver


class CudaDevice:
    def __init__(self, cubin: bytes) -> None:
        cu = self.cu = cuda_driver()
        _check(cu.cuInit(0), "cuInit")
        self.device = _check(cu.cuDeviceGet(0), "cuDeviceGet")
        self.name = _check(cu.cuDeviceGetName(128, self.device), "cuDeviceGetName").split(b"\0")[0].decode()
        self.context = _check(cu.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        _check(cu.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        self.module = _check(cu.cuModuleLoadData(cubin), "cuModuleLoadData")
        self._functions: dict[str, Any] = {}

    def alloc(self, nbytes: int) -> Any:
        return _check(self.cu.cuMemAlloc(max(int(nbytes), 4)), "cuMemAlloc")

    def upload(self, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        ptr = self.alloc(array.nbytes)
        _check(self.cu.cuMemcpyHtoD(ptr, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")
        return ptr

    def download(self, buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        _check(self.cu.cuCtxSynchronize(), "cuCtxSynchronize")
        _check(self.cu.cuMemcpyDtoH(out.ctypes.data, buffer, out.nbytes), "cuMemcpyDtoH")
        return out

    def scalar(self, value: int, dtype: str) -> Any:
        return np.array(value, dtype=dtype)

    def launch(self, kernel: str, args: Sequence[Any], grid: Sequence[int], block: Sequence[int]) -> None:
        fn = self._functions.get(kernel)
        if fn is None:
            fn = self._functions[kernel] = _check(self.cu.cuModuleGetFunction(self.module, kernel.encode()),
                                                  f"cuModuleGetFunction({kernel})")
        # kernelParams: an array of pointers, each to one argument's value
        holders = [a if isinstance(a, np.ndarray) else np.array([int(a)], dtype=np.uint64) for a in args]
        params = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
        _check(self.cu.cuLaunchKernel(fn, *[int(g) for g in grid], *[int(b) for b in block], 0, 0, params.ctypes.data, 0),
               f"cuLaunchKernel({kernel})")
