"""Built-in passes; importing this package registers them with the pass manager."""

from mocompile.passes import dce, fold_constants, isolation, place, quantize  # noqa: F401
