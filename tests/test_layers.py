"""Every import in the tree goes down the layers of docs/architecture.md (a module imports only
its own layer and the ones it builds on), and the runtime imports neither torch nor the
compiler: read from the source with `ast`, function-level imports included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"mocompile": "mocompile", "dsl": "mocompile.dsl", "passes": "mocompile.passes",
           "backends": "mocompile.backends"}

# module (or package prefix) -> layer; longest prefix wins
LAYER_OF = {
    "mocompile.errors": "foundation", "mocompile.ir.types": "foundation", "mocompile.files": "foundation", "mocompile.threads": "foundation",
    "mocompile.native_log": "foundation", "mocompile.cpu_features": "foundation", "mocompile.memory": "foundation",
    "mocompile.progress": "foundation", "mocompile.gpu_devices": "foundation",
    "mocompile.safetensors_io": "foundation", "mocompile.weight_arena": "foundation", "mocompile.arguments": "foundation", "mocompile.stream_source": "frontend",
    "mocompile.streamed_compile": "driver",
    "mocompile.dsl": "dsl",
    "mocompile.ir": "ir", "mocompile.signature": "ir", "mocompile.kv_cache": "ir", "mocompile.isolation": "ir",
    "mocompile.prefill": "ir",
    "mocompile.witness": "ir", "mocompile.calibration": "ir", "mocompile.blocks": "ir", "mocompile.calib_record": "ir",
    "mocompile.quality": "ir",
    "mocompile.frontend": "frontend", "mocompile.lower_fx": "frontend", "mocompile.fx_tables": "frontend",
    "mocompile.lower_tensor_code": "frontend",
    "mocompile.aten": "frontend",  # torch.export to Core ATen and its batch-flow rules: reads torch, builds on ir
    "mocompile.pass_manager": "passes", "mocompile.passes": "passes",
    "mocompile.placement": "passes", "mocompile.place_cli": "driver",  # expert placement: planner, and its command
    "mocompile.backends": "backends",
    "mocompile.artifact": "runtime", "mocompile.runtime": "runtime", "mocompile.runtime_inputs": "runtime",
    "mocompile.artifact_isolation": "runtime", "mocompile.hls_runtime": "runtime",
    "mocompile.vm_trace": "runtime", "mocompile.gpu_plan": "runtime", "mocompile.runtime_gpu": "runtime",
    "mocompile.runtime_opencl": "runtime", "mocompile.runtime_cuda": "runtime", "mocompile.runtime_iree": "runtime",
    "mocompile.runtime_ep": "runtime",
    "mocompile.distributed": "distributed",  # expert-parallel ranks over torch.distributed
    "mocompile.ep_build": "driver", "mocompile.run_ep_cli": "driver",
    "mocompile.report": "driver", "mocompile.report_sections": "driver", "mocompile.report_svg": "driver",
    "mocompile.isolation_check": "driver",  # lowers, runs passes and analyses: a driver of the others
    "mocompile.verification": "driver", "mocompile.compiler": "driver", "mocompile.cli": "driver",
    "mocompile.latency": "driver", "mocompile.dtype_option": "driver",
    "mocompile": "driver",  # the package's __init__ (the public API)
}
MAY_IMPORT = {
    "foundation": {"foundation"},
    "dsl": {"foundation", "dsl"},
    "ir": {"foundation", "ir"},
    "frontend": {"foundation", "dsl", "ir", "frontend"},
    "passes": {"foundation", "ir", "passes"},
    "backends": {"foundation", "ir", "backends"},
    "runtime": {"foundation", "ir", "runtime"},
    "distributed": {"foundation", "ir", "runtime", "distributed"},
    "driver": {"foundation", "dsl", "ir", "frontend", "passes", "backends", "runtime", "distributed", "driver"},
}


def layer(module: str) -> str:
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} has no layer in docs/architecture.md's table (add it to LAYER_OF)"
    return LAYER_OF[best]


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            out[".".join((package, *parts)).removesuffix(".__init__")] = f
    return out


def imports_of(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "mocompile":
            found |= {f"mocompile.{a.name}" for a in node.names}  # `from mocompile import runtime`
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "mocompile" or m.startswith("mocompile.")}


def test_imports_go_down_the_layers() -> None:
    wrong = []
    for module, path in sorted(modules().items()):
        own = layer(module)
        for target in sorted(imports_of(path, module)):
            if layer(target) not in MAY_IMPORT[own]:
                wrong.append(f"{module} ({own}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_loads_without_torch_or_the_compiler() -> None:
    code = ("import sys\n"
            "sys.modules['torch'] = None\n"  # any attempt to import torch fails
            "import mocompile.runtime, mocompile.artifact_isolation, mocompile.runtime_ep\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'mocompile' and m.split('.')[1:2] and "
            "m.split('.')[1] in ('compiler', 'passes', 'backends', 'dsl', 'frontend', 'lower_fx', 'cli')]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
