"""Causal / full multi-head attention with rotary positions and grouped-query heads.

Kernels:
- `rope_table`: cos/sin[S, 2, D/2] for positions past..past+S-1 (one libm sincos per entry,
  instead of one per element of q and k);
- `attention_keys`: K -> Kt[B, Hkv, D, L] at key positions past..past+S-1 (rope applied,
  transposed) so that for a fixed head-dim index the keys are contiguous and a query scores
  KB keys with plain vector FMAs;
- `cache_rows`: V rows into a value cache at positions past..past+S-1;
- `attention`: QB query rows of one head per parallel task (one row when a call has fewer, as a
  decode step does), keys in blocks of KB with an
  online softmax (running max and sum, flash-attention style): no S x S score matrix.

One set of kernels serves both calling modes. A plain forward passes past = 0 and fresh
Kt [.., padded(S)] / V; a cached step (the artifact's `step` function: prefill, then one
token at a time) passes the number of positions already cached and the cache tensors, which
attention_keys / cache_rows update in place (call_tir_inplace), so earlier positions are
never recomputed. Key blocks past the last visible key are masked before the softmax, so
whatever a buffer holds there (padding, stale cache rows) is never used.

Rope follows the interpreter (ir/ops/attention.py): angle = float32(pos) * inv_freq[i] with
inv_freq computed by numpy at compile time and passed in as a constant table (so both sides
round identically), out = x*cos + rotate_half(x)*sin.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np
from tvm import tirx

from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.kernels_math import exp

KB = 64  # keys per block: four 16-lane vectors of independent FMA chains
QB = 4  # queries per task: each loaded key / value vector is used QB times
NEG_INF = tirx.FloatImm("float32", float("-inf"))


@dataclass(frozen=True)
class AttentionSpec:
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool
    causal: bool

    def tag(self) -> str:
        return f"h{self.heads}kv{self.kv_heads}d{self.head_dim}{'_rope' if self.rope else ''}{'_causal' if self.causal else ''}"


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[D/2], bit-identical to the interpreter's rope_tables."""
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)


def padded_len(s):
    return (s + KB - 1) // KB * KB


@functools.cache
def rope_table(head_dim: int) -> tirx.PrimFunc:
    """inv_freq[D/2], the first position `past` and the count s (shape arguments) ->
    cs[s, 2, D/2]: (cos, sin) of positions past..past+s-1."""
    half = head_dim // 2
    s = U.dim("s")
    past = U.dim("past")
    with U.kernel(f"rope_table_d{head_dim}") as kern:
        inv_freq = U.arg("inv_freq", (half,))
        U.scalar_arg(past)
        U.scalar_arg(s)
        cs = U.arg("cs", (s, 2, half))
        def position(pos):
            with U.serial(0, half) as i:
                angle = tirx.Cast("float32", past + pos) * inv_freq[i]
                U.store(cs, (pos, 0, i), tirx.cos(angle))
                U.store(cs, (pos, 1, i), tirx.sin(angle))

        U.parallel_for(s, 64 * s * half, position)  # sincos costs ~ as much as moving 64 bytes
    return kern.func


def _rope(load, d, head_dim: int, cs, pos):
    """Element d of the rotated head vector x (x[c] = load(c)) at position pos."""
    half = head_dim // 2
    i = tirx.floormod(d, half)
    rotated = tirx.Select(d < half, -load(tirx.min(d + half, head_dim - 1)), load(tirx.max(d - half, 0)))
    return load(d) * cs[pos, 0, i] + rotated * cs[pos, 1, i]


def emit_key_rows(kt, rows: int, b, s, past, value) -> None:
    """kt[bi, r, d, past + j] = value(bi, r, d, j) for j < s: one (bi, r, d) row per task, its
    keys contiguous so the stores vectorize (the reads gather with the projection's stride)."""
    width = kt.shape[2]

    def row(task):
        bi, r, d = task // (rows * width), task // width % rows, task % width
        with U.serial(0, (s + 15) // 16) as j0:
            with U.vectorized(0, 16) as jj:
                j = j0 * 16 + jj
                with U.when(j < s):
                    U.store(kt, (bi, r, d, past + j), value(bi, r, d, j))

    U.parallel_for(b * rows * width, 8 * b * rows * width * s, row)


@functools.cache
def attention_keys(spec: AttentionSpec) -> tirx.PrimFunc:
    """k[B, S, Hkv*D] (+ cs from rope_table), past -> kt[B, Hkv, D, L] at positions past.."""
    b, s, past, length = U.dim("b"), U.dim("s"), U.dim("past"), U.dim("kt_len")
    D, hkv = spec.head_dim, spec.kv_heads
    with U.kernel(f"attention_keys_{spec.tag()}") as kern:
        k = U.arg("k", (b, s, hkv * D))
        cs = U.arg("cs", (s, 2, D // 2)) if spec.rope else None
        U.scalar_arg(past)
        kt = U.arg("kt", (b, hkv, D, length))

        def value(bi, h, d, j):
            def load(c):
                return k[bi, j, h * D + c]

            return _rope(load, d, D, cs, j) if spec.rope else load(d)

        emit_key_rows(kt, hkv, b, s, past, value)
    return kern.func


@functools.cache
def cache_rows(width: int) -> tirx.PrimFunc:
    """x[B, S, W], past -> cache[B, L, W] with rows past..past+S-1 replaced (in place)."""
    b, s, past, length = U.dim("b"), U.dim("s"), U.dim("past"), U.dim("cache_len")
    lanes = U.lanes_for(width)
    with U.kernel(f"cache_rows_w{width}") as kern:
        x = U.arg("x", (b, s, width))
        U.scalar_arg(past)
        cache = U.arg("cache", (b, length, width))

        def row(task):
            bi, j = task // s, task % s
            with U.serial(0, width // lanes) as c:
                with U.vectorized(0, lanes) as l:
                    U.store(cache, (bi, past + j, c * lanes + l), x[bi, j, c * lanes + l])

        U.parallel_for(b * s, 8 * b * s * width, row)
    return kern.func


@functools.cache
def attention(spec: AttentionSpec) -> tirx.PrimFunc:
    """q[B, S, H*D] at positions past.., kt[B, Hkv, D, Lk] and v[B, Lv, Hkv*D] holding keys and
    values of positions 0..past+S-1 (+ cs), past -> out[B, S, H*D].

    A task is QB consecutive queries of one head: each key vector loaded from kt and v
    serves QB queries (the per-query state is unrolled in Python, one scratch buffer per
    query, so it stays in registers); a call with fewer than QB queries runs one per task
    (query_blocks). Rows past the end compute on the last row and are not stored.
    """
    b, s, past = U.dim("b"), U.dim("s"), U.dim("past")
    kt_len, v_len = U.dim("kt_len"), U.dim("v_len")
    D, H, hkv = spec.head_dim, spec.heads, spec.kv_heads
    group = H // hkv
    lanes = U.lanes_for(D)
    scale = U.f32(1.0 / np.sqrt(D))
    with U.kernel(f"attention_{spec.tag()}") as kern:
        q = U.arg("q", (b, s, H * D))
        kt = U.arg("kt", (b, hkv, D, kt_len))
        v = U.arg("v", (b, v_len, hkv * D))
        cs = U.arg("cs", (s, 2, D // 2)) if spec.rope else None
        U.scalar_arg(past)
        out = U.arg("out", (b, s, H * D))
        def query_block(bi, h, i0, slots):
            kvh = h // group

            def load_query(i, d):
                def load(c):
                    return q[bi, i, h * D + c]

                return _rope(load, d, D, cs, i) if spec.rope else load(d)

            emit_attend(load_query, scale, kt, v, out, bi=bi, kv_head=kvh, v_col=kvh * D, out_col=h * D, s=s,
                        past=past, i0=i0, qk_dim=D, v_dim=D, lanes=lanes, causal=spec.causal, slots=slots)

        # work ~ FLOPs / 2: scores and weighted values, 2 * 2 * s * (past + s) * D per head (~half if causal)
        query_blocks(b, H, s, b * H * s * (past + s) * D * (1 if spec.causal else 2), query_block)
    return kern.func


def query_blocks(b, heads: int, s, work_bytes, query_block) -> None:
    """The parallel loop over attention tasks: QB consecutive queries of one head per task
    when the call has at least QB queries (each key and value vector loaded then serves QB of
    them), else one query per task (a decode step: QB slots would all repeat its one query).
    `query_block(bi, head, i0, slots)` emits a task. A query's arithmetic is the same in both
    branches, so its result does not depend on which one runs."""
    with U.if_else(s >= QB) as (then, orelse):
        for branch, slots in ((then, QB), (orelse, 1)):
            with branch():
                n_qb = (s + slots - 1) // slots

                def task(t, slots=slots, n_qb=n_qb):
                    query_block(t // (heads * n_qb), t // n_qb % heads, t % n_qb * slots, slots)

                U.parallel_for(b * heads * n_qb, work_bytes, task)


def _emit_softmax_block(score, run, acc, j0, limit, head_dim: int) -> None:
    """Online-softmax step for one query: mask keys >= limit, turn scores into exp(s - max),
    rescale the running sum and accumulator to the new max."""
    with U.vectorized(0, KB) as jj:
        U.store(score, (jj,), tirx.Select(j0 + jj < limit, score[jj], NEG_INF))
    U.emit_reduce(run, (2,), lambda jj: score[jj], KB, tirx.max)
    new_max = tirx.max(run[0], run[2])
    U.store(run, (3,), exp(run[0] - new_max))
    U.store(run, (0,), new_max)
    with U.vectorized(0, KB) as jj:
        U.store(score, (jj,), exp(score[jj] - run[0]))
    U.emit_reduce(run, (2,), lambda jj: score[jj], KB, lambda a, c: a + c)
    U.store(run, (1,), run[1] * run[3] + run[2])
    with U.vectorized(0, head_dim) as d:
        U.store(acc, (d,), acc[d] * run[3])


def emit_attend(load_query, scale, kt, v, out, *, bi, kv_head, v_col, out_col, s, past, i0, qk_dim: int, v_dim: int,
                lanes: int, causal: bool, slots: int = QB) -> None:
    """The body both attention kernels share, for `slots` queries [i0, i0+slots) of one head (query
    row i sits at position past + i): load each query (`load_query(row, channel)`, rope
    applied) scaled into registers, then scores against the visible keys block by block
    (kt[bi, kv_head]: positions 0..past+i if causal, all past+s otherwise), online softmax,
    weighted values (v[bi, :, v_col:]), and the store into out[bi, i, out_col:]. Rows past
    the end compute on the last row and are not stored."""
    rows = [tirx.min(i0 + qi, s - 1) for qi in range(slots)]  # clamped query positions
    qrow = [U.local((qk_dim,)) for _ in range(slots)]
    acc = [U.local((v_dim,)) for _ in range(slots)]
    score = [U.scratch((KB,)) for _ in range(slots)]
    run = [U.scratch((4,)) for _ in range(slots)]  # running max, running sum, block max, correction
    for qi in range(slots):
        with U.serial(0, qk_dim) as d:
            U.store(qrow[qi], (d,), load_query(rows[qi], d) * scale)
        with U.vectorized(0, v_dim) as d:
            U.store(acc[qi], (d,), U.f32(0))
        U.store(run[qi], (0,), NEG_INF)
        U.store(run[qi], (1,), U.f32(0))
    limit = [past + r + 1 for r in rows] if causal else [past + s] * slots  # keys query qi may see: [0, limit[qi])
    n_keys = past + (tirx.min(i0 + slots, s) if causal else s)  # the block needs [0, n_keys)
    with U.serial(0, (n_keys + KB - 1) // KB) as kb:
        j0 = kb * KB
        for qi in range(slots):
            with U.vectorized(0, KB) as jj:
                U.store(score[qi], (jj,), U.f32(0))
        with U.serial(0, qk_dim) as d:
            for qi in range(slots):
                with U.vectorized(0, KB) as jj:
                    U.store(score[qi], (jj,), score[qi][jj] + qrow[qi][d] * kt[bi, kv_head, d, j0 + jj])
        for qi in range(slots):
            _emit_softmax_block(score[qi], run[qi], acc[qi], j0, limit[qi], v_dim)
        with U.serial(0, tirx.min(KB, n_keys - j0)) as jj:
            with U.serial(0, v_dim // lanes) as c:
                with U.vectorized(0, lanes) as lane:
                    d = c * lanes + lane
                    vv = v[bi, j0 + jj, v_col + d]
                    for qi in range(slots):
                        U.store(acc[qi], (d,), acc[qi][d] + score[qi][jj] * vv)
    for qi in range(slots):
        with U.when(i0 + qi < s):
            with U.vectorized(0, v_dim) as d:
                U.store(out, (bi, i0 + qi, out_col + d), acc[qi][d] / run[qi][1])
