"""Built-in passes; importing this package registers them with the pass manager."""

from mocompile.passes import dce, fold_constants, isolation, place, quantize  # noqa: F401
from mocompile.passes import contextual_sparsity, elastic, prune_experts, prune_neurons, skip_layers, top_k  # noqa: F401
from mocompile.passes import weight_dtype  # noqa: F401
