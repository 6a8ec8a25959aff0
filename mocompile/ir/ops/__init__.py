"""Built-in IR ops. Each module registers its ops on import; adding an op is one block in
one of these files (or a new file imported here)."""

from mocompile.ir.ops import attention, elementwise, layout, moe, moe_remote, nn, quant, reduce, shape, widen  # noqa: F401
