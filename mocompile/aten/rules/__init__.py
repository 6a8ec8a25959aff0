"""The batch-flow rules of ATen ops, one module per kind of op; importing the package
registers them all in `mocompile.aten.registry`."""

from mocompile.aten.rules import creation, index, layout, nn, pointwise, reduce, symbolic  # noqa: F401
