"""Graphs and calibration data shared by the sparsity tests: the trained examples lowered to IR,
calibration sequences of the language they were trained on, and a tiny hand-built MoE graph
whose routing the tests control."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import numpy as np

from conftest import EXAMPLES
from mocompile.dsl import load_spec
from mocompile.frontend import lower_source, source_for
from mocompile.ir.graph import Graph
from mocompile.ir.types import TensorType


@lru_cache(maxsize=None)
def trainer():
    """examples/train_synthetic.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("train_synthetic", EXAMPLES / "train_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained(name: str) -> Graph:
    """An example lowered to IR with its trained weights."""
    return lower_source(source_for(EXAMPLES / f"{name}.moe", None, EXAMPLES / "weights" / f"{name}.safetensors", 0))


def text_calibration(name: str, sequences: int = 8, seq: int = 24) -> list[dict[str, np.ndarray]]:
    """Sequences of the synthetic language the example was trained on, one input dict each."""
    ids = trainer().calibration_tokens(load_spec(EXAMPLES / f"{name}.moe"), sequences, seq)
    return [{"text": ids[i:i + 1]} for i in range(sequences)]


def toy_moe(experts: int = 6, top_k: int = 2, hidden: int = 16, ffn: int = 12, vocab: int = 20,
            dead_expert: int | None = None) -> Graph:
    """ids -> embedding -> router.topk -> experts (+ residual) -> logits. The embedding table is
    positive, so a router row of large negative entries is never among a token's top_k:
    `dead_expert` gets such a row."""
    rng = np.random.default_rng(0)
    g = Graph("toy_moe")
    ids = g.add_input("text", TensorType(("batch", "seq"), "int64"))
    table = g.add_param("embed", rng.uniform(0.1, 1.0, (vocab, hidden)).astype(np.float32))
    w_router = rng.standard_normal((experts, hidden)).astype(np.float32)
    if dead_expert is not None:
        w_router[dead_expert] = -10.0
    router = g.add_param("layers.0.router", w_router)
    gate, up = (g.add_param(f"layers.0.{n}", rng.standard_normal((experts, ffn, hidden)).astype(np.float32) * 0.3)
                for n in ("gate", "up"))
    down = g.add_param("layers.0.down", rng.standard_normal((experts, hidden, ffn)).astype(np.float32) * 0.3)
    head = g.add_param("lm_head", rng.standard_normal((vocab, hidden)).astype(np.float32))
    x = g.add("embedding", ids, table, loc="embed")
    w, i = g.add_node("router.topk", [x, router], {"top_k": top_k}, loc="layers.0.ffn.router")
    y = g.add("experts", x, w, i, gate, up, down, loc="layers.0.ffn.experts")
    h = g.add("add", x, y, loc="layers.0")
    g.outputs.append(g.add("linear", h, head, loc="lm_head", name="logits"))
    return g


def toy_inputs(samples: int = 4, seq: int = 10, vocab: int = 20) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"text": rng.integers(0, vocab, (1, seq))} for _ in range(samples)]
