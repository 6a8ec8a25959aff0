"""FPGA devices: what a design is estimated against (`--device NAME` or `--device FILE.toml`).

Presets give the part's full resources from AMD's data sheets: DSP slices (DSP48E2),
18 Kb block RAMs (each 36 Kb block counts as two), 288 Kb UltraRAMs, 6-input LUTs, the
kernel clock a design is built for, and the off-chip bandwidth streamed weights come from.
A TOML file names the same keys (all required but `uram` and `part`, which default to 0 and
"custom"); anything missing, unknown or not a positive number is one error line.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mocompile.errors import MocompileError


@dataclass(frozen=True)
class Device:
    name: str
    part: str
    dsp: int
    bram18: int
    uram: int
    lut: int
    clock_mhz: float
    offchip_gbps: float  # bandwidth of the memory streamed weights and spilled caches live in

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS = {
    # Alveo U280 (XCU280): 9,024 DSP, 2,016 BRAM36, 960 URAM, 1,303,680 LUT; 300 MHz kernels; 8 GB HBM2 at 460 GB/s.
    "alveo-u280": Device("alveo-u280", "xcu280-fsvh2892-2L-e", 9024, 4032, 960, 1303680, 300.0, 460.0),
    # ZCU104 (XCZU7EV): 1,728 DSP, 312 BRAM36, 96 URAM, 230,400 LUT; 200 MHz; 64-bit DDR4-2400 at 19.2 GB/s.
    "zcu104": Device("zcu104", "xczu7ev-ffvc1156-2-e", 1728, 624, 96, 230400, 200.0, 19.2),
}
INTEGER_KEYS = ("dsp", "bram18", "uram", "lut")
OPTIONAL = {"uram": 0, "part": "custom"}


def load_device(text: str) -> Device:
    """A preset by name, or a device described by a TOML file."""
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    why = None if path.suffix == ".toml" else f"unknown device {text!r} (presets: {', '.join(PRESETS)}; or a .toml file)"
    if why is None and not path.is_file():
        why = f"{path}: device file not found"
    if why:
        raise MocompileError(why)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MocompileError(f"{path}: not valid TOML ({e})") from None
    keys = [f.name for f in fields(Device)]
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise MocompileError(f"{path}: unknown key {unknown[0]!r} (a device has: {', '.join(keys)})")
    values = {**OPTIONAL, "name": path.stem, **data}
    missing = [k for k in keys if k not in values]
    if missing:
        raise MocompileError(f"{path}: missing key {missing[0]!r}")
    for k in keys:
        v = values[k]
        if k in ("name", "part"):
            if not isinstance(v, str) or not v:
                raise MocompileError(f"{path}: {k!r} must be a non-empty string (got {v!r})")
        elif k in INTEGER_KEYS:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and k != "uram"):
                raise MocompileError(f"{path}: {k!r} must be a positive integer (got {v!r})")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise MocompileError(f"{path}: {k!r} must be a positive number (got {v!r})")
    return Device(**{k: values[k] for k in keys})
