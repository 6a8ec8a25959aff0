"""The HLS project an fpga artifact holds, and its C simulation.

    hls/firmware/<model>.cpp      the top function: one position of one sequence
    hls/firmware/parameters.h     fixed-point types, hls4ml dense configs, tables
    hls/firmware/weights.cpp      the weight arrays (C simulation: filled from weights.bin;
                                  synthesis: ROMs from weights_rom.h, which make_roms.py writes)
    hls/firmware/mocompile_hls.h  the kernels hls4ml has no layer for
    hls/firmware/nnet_utils/, ap_types/   hls4ml's dense templates and the ap_fixed headers
    hls/weights.bin, weights.json the arrays' integer codes and where each one is
    hls/csim_bridge.cpp           C entry points for the runtime (ctypes): load, run positions
    hls/build_prj.tcl, make_roms.py, build_csim.sh   synthesis and simulation builds
    csim/libcsim.so               the C simulation, built here with g++
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from mocompile.backends.fpga.cpp import Cpp
from mocompile.backends.fpga.design import Design, expands_low_bit, ident
from mocompile.backends.fpga.lowerings import kernel_for
from mocompile.backends.fpga.fixed import Fmt
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Value

HERE = Path(__file__).resolve().parent
GXX_FLAGS = ["-O1", "-std=c++14", "-fPIC", "-shared", "-w"]
NNET_ROOT = "nnet_dense.h"


def hls4ml_templates() -> Path:
    """hls4ml's Vivado templates (ap_types, nnet_utils) from the installed package."""
    try:
        import hls4ml
    except ImportError:
        raise MocompileError("the fpga target needs hls4ml (pip install 'mocompile[fpga]')") from None
    return Path(hls4ml.__file__).resolve().parent / "templates" / "vivado"


def _include_closure(folder: Path, root: str) -> list[str]:
    """The headers of `folder` that `root` includes, directly or not."""
    seen, todo = [], [root]
    while todo:
        name = todo.pop()
        if name in seen or not (folder / name).is_file():
            continue
        seen.append(name)
        for line in (folder / name).read_text().splitlines():
            if line.startswith("#include \""):
                todo.append(line.split('"')[1])
    return sorted(seen)


def per_position(v: Value) -> int:
    """Values of v at one position: its last axis, or 1 for [batch, seq] (ids)."""
    return 1 if v.type.rank == 2 else int(v.type.shape[-1])


def segment_of(graph: Graph) -> dict[int, int | None]:
    """Node (by id) -> the one graph input it depends on in a model of several inputs (it
    runs only at that segment's positions), or None."""
    deps: dict[int, set[int]] = {id(v): {i} for i, v in enumerate(graph.inputs)}
    out: dict[int, int | None] = {}
    for node in graph.nodes:
        found = set().union(*(deps.get(id(v), set()) for v in node.inputs))
        for v in node.outputs:
            deps[id(v)] = found
        out[id(node)] = next(iter(found)) if len(found) == 1 and len(graph.inputs) > 1 else None
    return out


def write_body(design: Design, cpp: Cpp) -> None:
    graph = design.graph
    ends = {id(v) for v in (*graph.inputs, *graph.outputs)}
    segments = segment_of(graph)
    for node in graph.nodes:
        for v in node.outputs:
            if id(v) not in ends and not expands_low_bit(v):
                cpp.line(f"{cpp.t(v)} {cpp.v(v)}[{per_position(v)}];")
        seg = segments[id(node)]
        cpp.line(f"// {node.op} {node.loc}" + (f" (positions of {graph.inputs[seg].name} only)" if seg is not None else ""))
        start = len(cpp.body)
        kernel_for(node).emit(node, design, cpp)
        if seg is not None:
            cpp.body[start:] = [f"if (seg == {seg}) {{", *("    " + line.replace("\n", "\n    ")
                                                            for line in cpp.body[start:]), "}"]


def _arg(cpp: Cpp, v: Value) -> str:
    return f"{cpp.t(v)} {cpp.v(v)}[{per_position(v)}]"


def top_signature(design: Design, cpp: Cpp) -> str:
    """The step function: one position's inputs (and, with several inputs, which one it is
    from), its position, the KV caches, its outputs."""
    g = design.graph
    args = [_arg(cpp, v) for v in g.inputs] + (["int seg"] if len(g.inputs) > 1 else []) + ["int pos"]
    args += [f"{c.ctype} {c.name}[{cpp.capacity * c.width}]" for c in cpp.caches]
    args += [_arg(cpp, v) for v in g.outputs]
    return f"void {ident_model(design)}_step({', '.join(args)})"


def ident_model(design: Design) -> str:
    return ident(design.graph.name)


def _types(design: Design, cpp: Cpp) -> list[str]:
    g = design.graph
    out, seen = [], set()
    for v in [*g.inputs, *(o for n in g.nodes for o in n.outputs)]:
        if v.type.dtype.startswith("float") and v.name not in seen and not expands_low_bit(v):
            seen.add(v.name)
            out.append(f"typedef {design.fmt(v).cpp()} {cpp.t(v)};")
    return out


def _lut_text(cpp: Cpp) -> list[str]:
    out = []
    for name, lut in sorted(cpp.luts.items()):
        t = lut.table()
        out.append(f"static const int32_t LUT_{name}[{t.size}] = {{{', '.join(str(int(x)) for x in t)}}};")
    return out


def write_sources(design: Design, cpp: Cpp, fw: Path) -> None:
    model = ident_model(design)
    head = "#ifndef PARAMETERS_H_\n#define PARAMETERS_H_\n\n#include <stdint.h>\n\n#include \"mocompile_hls.h\"\n\n"
    weights_decl = [f"extern {a.ctype} {a.name}[{a.codes.size}];" for a in cpp.arrays.values()]
    (fw / "parameters.h").write_text(head + "\n".join(_types(design, cpp) + cpp.decls + _lut_text(cpp) + weights_decl)
                                     + "\n\n#endif\n")
    sig = top_signature(design, cpp)
    (fw / f"{model}.h").write_text(f"#ifndef {model.upper()}_H_\n#define {model.upper()}_H_\n\n#include \"parameters.h\"\n\n"
                                   f"{sig};\n\n#endif\n")
    body = "\n".join("    " + line.replace("\n", "\n    ") for line in cpp.body)
    (fw / f"{model}.cpp").write_text(
        f"// {design.graph.name}: one position of one sequence, every layer in order; the KV caches hold the\n"
        f"// earlier positions. Written by mocompile's fpga target.\n#include \"{model}.h\"\n\n{sig} {{\n{body}\n}}\n")
    defs = "\n".join(f"{a.ctype} {a.name}[{a.codes.size}];" for a in cpp.arrays.values())
    loads, offset = [], 0
    for a in cpp.arrays.values():
        loads.append(f"    mc_set(blob + {offset}, {a.name}, {a.codes.size}, {a.bits});")
        offset += a.codes.size * a.bits // 8
    (fw / "weights.cpp").write_text(f"""// The design's constant arrays. Synthesis (or -DMC_WEIGHT_ROMS): ROMs initialised by
// weights_rom.h (make_roms.py). C simulation: filled from weights.bin by mc_load_weights.
#include "parameters.h"

#if defined(__SYNTHESIS__) || defined(MC_WEIGHT_ROMS)
#include "weights_rom.h"
#else
{defs}

template <class T> static void mc_put(T &d, int64_t c) {{ d = mc::from_code<T>(c); }}
static void mc_put(int16_t &d, int64_t c) {{ d = (int16_t)c; }}
static void mc_put(int32_t &d, int64_t c) {{ d = (int32_t)c; }}
template <class T> static void mc_set(const uint8_t *src, T *dst, int n, int bits) {{
    for (int i = 0; i < n; i++) {{
        int64_t c = bits == 16 ? ((const int16_t *)src)[i] : bits == 32 ? ((const int32_t *)src)[i] : ((const int64_t *)src)[i];
        mc_put(dst[i], c);
    }}
}}

extern "C" void mc_load_weights(const uint8_t *blob) {{
{chr(10).join(loads)}
}}
#endif
""")


def write_blob(cpp: Cpp, hls: Path) -> list[dict[str, Any]]:
    entries, offset = [], 0
    with open(hls / "weights.bin", "wb") as f:
        for a in cpp.arrays.values():
            data = a.codes.astype({16: np.int16, 32: np.int32, 64: np.int64}[a.bits])
            f.write(data.tobytes())
            entries.append({"name": a.name, "ctype": a.ctype, "offset": offset, "count": int(a.codes.size),
                            "bits": a.bits, "frac": a.frac})
            offset += data.nbytes
    (hls / "weights.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def write_bridge(design: Design, cpp: Cpp, hls: Path) -> None:
    g = design.graph
    model = ident_model(design)
    lines = [f"#include \"firmware/{model}.h\"", "", "extern \"C\" void mc_load_weights(const uint8_t *blob);", ""]
    lines += [f"static {c.ctype} {c.name}[{cpp.capacity * c.width}];" for c in cpp.caches]
    lines += ["", "// The next positions of one sequence starting at `start`: counts[i] positions of input i, the",
              "// inputs in order (a multimodal model's segments); inputs[i] holds them (int64 ids or float32",
              "// features), caches[j] is the j-th KV cache as codes, outputs[o] gets float32 rows in that order.",
              "extern \"C\" int mc_run(int start, const int *counts, const void *const *inputs, int16_t *const *caches,",
              "                        float *const *outputs) {",
              "    int end = start;",
              f"    for (int i = 0; i < {len(g.inputs)}; i++) end += counts[i];"]
    for j, c in enumerate(cpp.caches):
        lines.append(f"    for (int i = 0; i < start * {c.width}; i++) {c.name}[i] = mc::from_code<{c.ctype}>(caches[{j}][i]);")
    for v in g.inputs:
        lines.append(f"    {cpp.t(v)} {cpp.v(v)}[{per_position(v)}];")
        lines.append(f"    for (int f = 0; f < {per_position(v)}; f++) {cpp.v(v)}[f] = 0;")
    for v in g.outputs:
        lines.append(f"    {cpp.t(v)} {cpp.v(v)}[{v.type.shape[-1]}];")
    lines.append("    for (int seg = 0, row = 0; seg < %d; seg++) {" % len(g.inputs))
    lines.append("        for (int p = 0; p < counts[seg]; p++, row++) {")
    for i, v in enumerate(g.inputs):
        n = per_position(v)
        src = "((const float *)inputs[%d])" % i if v.type.dtype.startswith("float") else "((const int64_t *)inputs[%d])" % i
        cast = "" if v.type.dtype.startswith("float") else "(int)"
        lines.append(f"            if (seg == {i}) for (int f = 0; f < {n}; f++) {cpp.v(v)}[f] = {cast}{src}[p * {n} + f];")
    call = [cpp.v(v) for v in g.inputs] + (["seg"] if len(g.inputs) > 1 else []) + ["start + row"]
    call += [c.name for c in cpp.caches] + [cpp.v(v) for v in g.outputs]
    lines.append(f"            {model}_step({', '.join(call)});")
    for o, v in enumerate(g.outputs):
        n = v.type.shape[-1]
        lines.append(f"            for (int f = 0; f < {n}; f++) outputs[{o}][row * {n} + f] = "
                     f"(float){cpp.v(v)}[f].to_double();")
    lines += ["        }", "    }"]
    for j, c in enumerate(cpp.caches):
        lines.append(f"    for (int i = start * {c.width}; i < end * {c.width}; i++) caches[{j}][i] = "
                     f"(int16_t)mc::code_of({c.name}[i]);")
    lines += ["    return 0;", "}", ""]
    (hls / "csim_bridge.cpp").write_text("\n".join(lines))


def write_build_scripts(design: Design, hls: Path, part: str, clock_mhz: float) -> None:
    model = ident_model(design)
    (hls / "build_prj.tcl").write_text(f"""# Vitis HLS synthesis of {design.graph.name} (run: vitis_hls -f build_prj.tcl, after python3 make_roms.py)
open_project -reset {model}_prj
set_top {model}_step
add_files firmware/{model}.cpp -cflags "-std=c++14 -Ifirmware -Ifirmware/ap_types"
add_files firmware/weights.cpp -cflags "-std=c++14 -Ifirmware -Ifirmware/ap_types"
open_solution -reset solution1 -flow_target vivado
set_part {{{part}}}
create_clock -period {1000.0 / clock_mhz:.3f} -name default
config_array_partition -complete_threshold 2
csynth_design
export_design -format ip_catalog
exit
""")
    (hls / "make_roms.py").write_text('''"""Write firmware/weights_rom.h: every constant array of weights.bin with its values, the
initialisers synthesis turns into ROMs (BRAM/URAM). Standard library only."""
import json
import struct
from pathlib import Path

here = Path(__file__).resolve().parent
blob = (here / "weights.bin").read_bytes()
out = ["// Written by make_roms.py from weights.bin."]
for a in json.loads((here / "weights.json").read_text()):
    fmt = {16: "h", 32: "i", 64: "q"}[a["bits"]]
    codes = struct.unpack_from(f"<{a['count']}{fmt}", blob, a["offset"])
    vals = codes if a["frac"] is None else [repr(c / 2.0 ** a["frac"]) for c in codes]
    out.append(f"{a['ctype']} {a['name']}[{a['count']}] = {{{', '.join(map(str, vals))}}};")
(here / "firmware" / "weights_rom.h").write_text("\\n".join(out) + "\\n")
''')
    (hls / "build_csim.sh").write_text(f"""#!/bin/sh
# The C simulation as a shared library (what mocompile's runtime loads): g++ only, no FPGA tools.
cd "$(dirname "$0")" && mkdir -p ../csim && \\
g++ {' '.join(GXX_FLAGS)} -Ifirmware -Ifirmware/ap_types firmware/{model}.cpp firmware/weights.cpp csim_bridge.cpp \\
    -o ../csim/libcsim.so
""")


def write_project(design: Design, out_dir: Path, capacity: int, part: str, clock_mhz: float) -> Cpp:
    """Write the HLS project of `design` under out_dir/hls; return what was written."""
    hls = out_dir / "hls"
    fw = hls / "firmware"
    fw.mkdir(parents=True)
    templates = hls4ml_templates()
    shutil.copytree(templates / "ap_types", fw / "ap_types")
    (fw / "nnet_utils").mkdir()
    for name in _include_closure(templates / "nnet_utils", NNET_ROOT):
        shutil.copy(templates / "nnet_utils" / name, fw / "nnet_utils" / name)
    shutil.copy(HERE / "hls" / "mocompile_hls.h", fw / "mocompile_hls.h")
    cpp = Cpp(design, capacity)
    write_body(design, cpp)
    write_sources(design, cpp, fw)
    write_blob(cpp, hls)
    write_bridge(design, cpp, hls)
    write_build_scripts(design, hls, part, clock_mhz)
    return cpp


def build_csim(out_dir: Path) -> Path:
    """g++ the C simulation (build_csim.sh); one clear line if it fails."""
    script = out_dir / "hls" / "build_csim.sh"
    if shutil.which("g++") is None:
        raise MocompileError("the fpga target's C simulation needs g++ (apt-get install g++)")
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        first = next((line for line in r.stderr.splitlines() if "error" in line), r.stderr.strip()[:300])
        raise MocompileError(f"g++ could not build the C simulation of {out_dir}: {first}")
    return out_dir / "csim" / "libcsim.so"


def cache_entries(cpp: Cpp) -> list[dict[str, Any]]:
    return [{"name": c.name, "width": c.width, "format": Fmt.to_json(c.fmt)} for c in cpp.caches]
