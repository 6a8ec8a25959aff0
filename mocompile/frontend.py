"""Where a compile starts: a spec (object or `.moe` file), a Hugging Face checkpoint directory
or a torch module, made into a `Source` (the reference torch module, its input types, where it
came from) and lowered to a verified IR graph.

The compiler, the isolation check and the CLI's `inspect --ir` all start here, so it sits
below them and knows nothing of passes, backends or artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mocompile.dsl.hf_import import is_checkpoint
from mocompile.dsl.summary import parameter_counts
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.types import TensorType
from mocompile.ir.verifier import VerifyError, verify
from mocompile.memory import check_fits

# Peak bytes per parameter while the float32 torch reference and the IR lowered from it
# coexist (each holds the weights in float32).
REFERENCE_BYTES_PER_PARAM = 8
# Peak bytes of a streamed compile per byte of artifact weights (see streamed_compile.py: the
# passes' low-bit results, then the backend's packed copy or the loaded artifact, one at a time,
# beside the float32 weights of the op being worked on).
STREAMED_ARTIFACT_COPIES = 2
# Peak bytes per parameter of a whole compile: the reference and IR above, the passes' new
# weights, the artifact's weight file and the verification runs. Measured: a 0.79B-parameter
# Mixtral-shaped checkpoint peaked at 16.2 GB (about 20.5 bytes per parameter).
COMPILE_BYTES_PER_PARAM = 20


def check_spec_fits(spec: Any, where: str, bytes_per_param: float, doing: str | None = None) -> None:
    """Refuse a model whose reference (or, streamed, whose artifact) would not fit this
    machine's free memory, with the figures, before any of it is allocated. `doing` says
    what needs the memory (default: working on it at `bytes_per_param`)."""
    n = parameter_counts(spec)["total"]
    doing = doing or f"working on it at about {bytes_per_param:g} bytes per parameter"
    check_fits(int(n * bytes_per_param), f"{spec.name} has {n:,} parameters, and {doing}", where)


@dataclass
class Source:
    """A model ready to lower: the torch module, its input types, and where it came from."""

    module: Any  # torch.nn.Module
    input_types: dict[str, TensorType]
    name: str
    meta: dict[str, Any] = field(default_factory=dict)
    int_high: dict[str, int] = field(default_factory=dict)  # token inputs: ids are in [0, high)
    # a streamed checkpoint: `module` lives on the meta device and its weights are these
    # LazyWeights (by parameter id), read from the checkpoint's files when asked for
    lazy: dict[int, Any] | None = None

    @property
    def streamed(self) -> bool:
        return self.lazy is not None


def source_from_spec(spec_or_path: Any, variant: str | None, weights: str | Path | None, seed: int,
                     bytes_per_param: int = REFERENCE_BYTES_PER_PARAM) -> Source:
    from mocompile.dsl import build_model, load_spec
    from mocompile.dsl.spec import Spec

    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    if variant is not None and variant not in {v.name for v in spec.variants}:
        known = ", ".join(v.name for v in spec.variants) or "none"
        raise MocompileError(f"{spec.source or spec.name}: no variant {variant!r} (known: {known})")
    check_spec_fits(spec, str(spec.source or spec.name), bytes_per_param)
    model = build_model(spec, seed=seed, variant=variant, weights=weights)
    high = {m.name: int(m.vocab) for m in model.spec.modalities if m.is_tokens}
    meta = {"name": spec.name, "spec_hash": spec.digest(), "variant": variant, "source": spec.source,
            "weights": str(weights) if weights else f"seed {seed}", "max_seq": spec.max_seq,
            # the elastic sub-models the spec declares (passes such as elastic build them from the graph)
            "variants": [{"name": v.name, "layers": None if v.layers is None else list(v.layers),
                          "experts": v.experts, "top_k": v.top_k} for v in spec.variants]}
    return Source(model, model.input_types(), model.spec.name, meta, high)


def source_from_hf(path: str | Path, bytes_per_param: float = REFERENCE_BYTES_PER_PARAM,
                   stream: bool = False) -> Source:
    """A Hugging Face checkpoint directory: its config imported as a spec, its weights read
    into the reference model, or with `stream` left in the checkpoint's files (a meta-device
    model and lazy IR weights, see stream_source.py; `bytes_per_param` is then the
    artifact's, and the compile is refused where STREAMED_ARTIFACT_COPIES of it do not fit)."""
    from mocompile.dsl.hf_import import import_checkpoint
    from mocompile.dsl.hf_weights import build_hf_model
    from mocompile.stream_source import lazy_weights

    ckpt = import_checkpoint(path)
    if stream:  # `bytes_per_param`: the artifact's
        check_spec_fits(ckpt.spec, str(path), STREAMED_ARTIFACT_COPIES * bytes_per_param,
                        f"compiling it streamed (an artifact of about {bytes_per_param:g} bytes per parameter)")
    else:
        check_spec_fits(ckpt.spec, str(path), bytes_per_param)
    model, lazy = lazy_weights(ckpt) if stream else (build_hf_model(ckpt), None)
    spec = ckpt.spec
    meta = {"name": spec.name, "spec_hash": spec.digest(), "variant": None, "source": str(ckpt.config_path),
            "weights": str(ckpt.path), "hf_architecture": ckpt.architecture, "hf_model_type": ckpt.family.model_type,
            "hf_source": str(Path(path).resolve()), "max_seq": spec.max_seq, **({"streamed": True} if stream else {})}
    return Source(model, model.input_types(), spec.name, meta, {"text": spec.vocab}, lazy)


def source_for(model: Any, variant: str | None, weights: str | Path | None, seed: int,
               bytes_per_param: float = REFERENCE_BYTES_PER_PARAM, stream: bool = False) -> Source:
    """A spec (object or `.moe` path) or a Hugging Face checkpoint directory (with `stream`,
    its weights left in its files), ready to lower; refused up front where building it needs
    more than `bytes_per_param` per parameter of free memory."""
    if isinstance(model, (str, Path)) and is_checkpoint(model):
        for option, value in (("weights", weights), ("variant", variant)):
            if value is not None:
                raise MocompileError(f"{model}: a Hugging Face checkpoint brings its own weights and has no variants "
                                     f"(drop --{option})")
        return source_from_hf(model, bytes_per_param, stream)
    if stream:
        raise MocompileError(f"{model}: only a Hugging Face checkpoint directory can be streamed (a spec's weights "
                             "are made in memory)")
    return source_from_spec(model, variant, weights, seed, bytes_per_param)


def source_from_module(module: Any, input_types: Mapping[str, TensorType] | None) -> Source:
    types = dict(input_types) if input_types is not None else getattr(module, "input_types", lambda: None)()
    if types is None:
        raise MocompileError(f"{type(module).__name__}: pass input_types={{name: TensorType}} to compile a plain torch module")
    high = {m.name: int(m.vocab) for m in getattr(getattr(module, "spec", None), "modalities", ()) if m.is_tokens}
    return Source(module, types, type(module).__name__, {"name": type(module).__name__}, high)


def lower_source(src: Source) -> Graph:
    from mocompile.lower_fx import lower_module

    graph = lower_module(src.module, src.input_types, src.name, ("logits",), src.lazy)
    try:
        verify(graph)
    except VerifyError as e:
        raise MocompileError(f"lowering {src.name} produced an invalid graph: {e}") from None
    graph.meta.update(src.meta)
    return graph
