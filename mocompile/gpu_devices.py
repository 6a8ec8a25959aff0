"""Which GPUs this machine can run code on: OpenCL devices (pyopencl and a driver: a GPU's,
or PoCL on the CPU) and NVIDIA GPUs (cuda-python's driver API). Asked by the GPU backends
(can an artifact be verified here?) and by the GPU runtime (which device runs it); the
modules are imported only when asked, so neither is a dependency of the rest."""

from __future__ import annotations

from typing import Any

from mocompile.errors import ArtifactError


def pyopencl_module() -> Any:
    try:
        import pyopencl
    except ImportError as e:
        raise ArtifactError("running an OpenCL artifact needs pyopencl (pip install 'mocompile[opencl]') and an "
                            f"OpenCL driver (a GPU's, or PoCL: apt-get install pocl-opencl-icd): {e}") from None
    return pyopencl


def opencl_devices() -> list[Any]:
    """The OpenCL devices of every platform, GPUs first (empty without pyopencl or a driver)."""
    try:
        cl = pyopencl_module()
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except Exception:  # no pyopencl, no ICD loader, no platform
        return []
    return sorted(devices, key=lambda d: 0 if d.type & cl.device_type.GPU else 1)


def cuda_driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise ArtifactError(f"running a CUDA artifact needs cuda-python (pip install 'mocompile[cuda]'): {e}") from None
    return driver


def check_cuda(result: Any, what: str) -> Any:
    """The value(s) of a CUDA driver call's (error, value...) result; ArtifactError on an error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ArtifactError(f"CUDA driver: {what} failed ({err})")
    return rest[0] if len(rest) == 1 else rest


def cuda_device_problem(arch: str | None) -> str | None:
    """Why code for `arch` (sm_XY) cannot run here (no cuda-python, no driver or GPU, a GPU of
    another architecture: a cubin runs on its own), or None."""
    try:
        cu = cuda_driver()
        check_cuda(cu.cuInit(0), "cuInit")
        if check_cuda(cu.cuDeviceGetCount(), "cuDeviceGetCount") < 1:
            return "no NVIDIA GPU here"
        device = check_cuda(cu.cuDeviceGet(0), "cuDeviceGet")
        attr = cu.CUdevice_attribute
        major = check_cuda(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "attribute")
        minor = check_cuda(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "attribute")
    except ArtifactError as e:
        return f"no NVIDIA GPU here ({e})"
    except Exception as e:  # the bindings raise when the driver library itself is missing
        return f"no NVIDIA GPU here (no NVIDIA driver: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if arch and arch.startswith("sm_") and (major, minor) != divmod(int(arch[3:]), 10):
        return f"built for {arch}; this GPU is sm_{major}{minor} (a cubin runs on its own architecture)"
    return None
