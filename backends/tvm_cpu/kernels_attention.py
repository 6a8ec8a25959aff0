"""Causal / full multi-head attention with rotary positions and grouped-query heads.

Kernels:
- `rope_table`: cos/sin[S, 2, D/2] for positions past..past+S-1 (one libm sincos per entry,
  instead of one per element of q and k);
- `attention_keys`: K -> Kt[B, Hkv, D, L] at key positions past..past+S-1 (rope applied,
  transposed) so that for a fixed head-dim index the keys are contiguous and a query scores
  KB keys with plain vector FMAs. Kt's storage is chunked (key_chunks): TAIL positions of
  all D channels together, each channel's TAIL keys one cache line, so the keys a step reads
  are one contiguous run whatever the cache capacity;
- `cache_rows`: V rows into a value cache at positions past..past+S-1;
- `attention`: QB (query row, head) slots per parallel task (QB rows of one head in a prompt,
  QB heads of one row in a decode step), keys in blocks of KB with an
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.specs import AttentionSpec, rope_inv_freq  # noqa: F401
from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_common.kernel_math import exp
from mocompile.backends.tvm_common.kernel_math import rope as _rope

KB = 64  # keys per block: four 16-lane vectors of independent FMA chains
TAIL = 16  # keys per chunk of the key layout (key_chunks): one cache line per channel
QB = 4  # slots per task: QB query rows of a prompt share each loaded key / value vector; a
# decode step's task takes QB heads instead (independent chains, see query_blocks)
NEG_INF = tirx.FloatImm("float32", float("-inf"))


def padded_len(s):
    return (s + KB - 1) // KB * KB


@functools.cache
def rope_table(head_dim: int) -> tirx.PrimFunc:
    """inv_freq[D/2], the first position `past` and the count s (shape arguments) ->
    cs[s, 2, D/2]: (cos, sin) of positions past..past+s-1."""
    half = head_dim // 2
    with U.kernel(f"rope_table_d{head_dim}") as kern:
        past, s, inv_freq, cs = C.rope_table(head_dim)
        def position(pos):
            with U.serial(0, half) as i:
                angle = tirx.Cast("float32", past + pos) * inv_freq[i]
                U.store(cs, (pos, 0, i), tirx.cos(angle))
                U.store(cs, (pos, 1, i), tirx.sin(angle))

        U.parallel_for(s, 64 * s * half, position)  # sincos costs ~ as much as moving 64 bytes
    return kern.func


def key_chunks(kt: tirx.Buffer) -> tirx.Buffer:
    """kt[B, H, D, L] as it is stored: [B, H, L / TAIL, D, TAIL], key (d, j) at [j // TAIL, d,
    j % TAIL]. The positions a step reads (0..past) are then one contiguous run of its head's
    slab, streamed whole; rows of L keys would touch a few lines of every D-th stretch of
    L * 4 bytes (and pull in the neighbouring, unused lines), more so the larger the cache."""
    b, heads, width, length = kt.shape
    return U.reshaped(kt, (b, heads, length // TAIL, width, TAIL))


def emit_key_rows(kt, rows: int, b, s, past, value) -> None:
    """Key (bi, r, d) of position past + j = value(bi, r, d, j) for j < s (into key_chunks).
    With at least a vector of keys, one (bi, r, d) row per task, a masked vector store per
    chunk (the reads gather with the projection's stride); with fewer (a decode step's one key
    per row), one (bi, r) head per task, a scalar store per channel: a vector per row would
    mostly be masked lanes, and a task per channel costs more than its one store."""
    width = kt.shape[2]
    chunks = key_chunks(kt)
    work = 8 * b * rows * width * s
    with U.if_else(s >= TAIL) as (then, orelse):
        with then():
            def row(task):
                bi, r, d = task // (rows * width), task // width % rows, task % width
                first = past // TAIL
                with U.serial(first, (past + s + TAIL - 1) // TAIL) as c:
                    with U.vectorized(0, TAIL) as l:
                        j = c * TAIL + l - past
                        with U.when(tirx.all(j >= 0, j < s)):
                            U.store(chunks, (bi, r, c, d, l), value(bi, r, d, j))

            U.parallel_for(b * rows * width, work, row)
        with orelse():
            def head(task):
                bi, r = task // rows, task % rows
                with U.serial(0, width) as d:
                    with U.serial(0, s) as j:
                        pos = past + j
                        U.store(chunks, (bi, r, pos // TAIL, d, pos % TAIL), value(bi, r, d, j))

            U.parallel_for(b * rows, work, head)


@functools.cache
def attention_keys(spec: AttentionSpec) -> tirx.PrimFunc:
    """k[B, S, Hkv*D] (+ cs from rope_table), past -> kt[B, Hkv, D, L] at positions past.."""
    hkv = spec.kv_heads
    with U.kernel(f"attention_keys_{spec.tag()}") as kern:
        b, s, past, k, cs, kt = C.attention_keys(spec)
        emit_key_rows(kt, hkv, b, s, past, C.attention_key_value(spec, k, cs))
    return kern.func


@functools.cache
def cache_rows(width: int) -> tirx.PrimFunc:
    """x[B, S, W], past -> cache[B, L, W] with rows past..past+S-1 replaced (in place)."""
    lanes = U.lanes_for(width)
    with U.kernel(f"cache_rows_w{width}") as kern:
        b, s, past, x, cache = C.cache_rows(width)

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

    A task attends for QB (query row, head) slots at once (query_blocks): QB consecutive rows
    of one head in a prompt, QB heads of one row in a decode step.
    """
    D, H, hkv = spec.head_dim, spec.heads, spec.kv_heads
    group = H // hkv
    lanes = U.lanes_for(D)
    scale = U.f32(1.0 / np.sqrt(D))
    with U.kernel(f"attention_{spec.tag()}") as kern:
        b, s, past, q, kt, v, cs, out = C.attention(spec)

        def slot(bi, h, row, live):
            def load_query(d):
                def load(c):
                    return q[bi, row, h * D + c]

                return _rope(load, d, D, cs, row) if spec.rope else load(d)

            kvh = h // group
            return Slot(row, live, kvh, kvh * D, h * D, load_query)

        def attend(bi, slots):
            emit_attend(slots, scale, kt, v, out, bi=bi, s=s, past=past, qk_dim=D, v_dim=D, lanes=lanes,
                        causal=spec.causal)

        # work ~ FLOPs / 2: scores and weighted values, 2 * 2 * s * (past + s) * D per head (~half if causal)
        query_blocks(b, H, s, b * H * s * (past + s) * D * (1 if spec.causal else 2), slot, attend)
    return kern.func


@dataclass(frozen=True)
class Slot:
    """One (query row, head) pair a task attends for: `load_query(d)` is channel d of its query
    (rope applied), kt[bi, kv_head] / v[bi, :, v_col:] its keys and values, out[bi, row,
    out_col:] where its result goes if `live` (rows past the end compute on the last row)."""
    row: tirx.PrimExpr
    live: tirx.PrimExpr
    kv_head: tirx.PrimExpr
    v_col: tirx.PrimExpr
    out_col: tirx.PrimExpr
    load_query: Callable[[tirx.PrimExpr], tirx.PrimExpr]


def head_block(heads: int) -> int:
    """Heads per decode task: the largest divisor of `heads` up to QB."""
    return max(n for n in range(1, QB + 1) if heads % n == 0)


def query_blocks(b, heads: int, s, work_bytes, slot, attend) -> None:
    """The parallel loop over attention tasks, each `attend(bi, slots)` for QB slots made by
    `slot(bi, head, row, live)`. A single query's scores, softmax and weighted sum are chains
    of dependent vector ops, so a task interleaves QB independent ones: in a call with at least
    QB queries, QB consecutive rows of one head (each key and value vector loaded then serves
    all of them); in a decode step, QB heads of one row. A slot's arithmetic is the same in
    either grouping, so a row's result does not depend on which one runs."""
    with U.if_else(s >= QB) as (then, orelse):
        with then():
            n_qb = (s + QB - 1) // QB

            def rows_task(t):
                bi, h, i0 = t // (heads * n_qb), t // n_qb % heads, t % n_qb * QB
                attend(bi, [slot(bi, h, tirx.min(i0 + qi, s - 1), i0 + qi < s) for qi in range(QB)])

            U.parallel_for(b * heads * n_qb, work_bytes, rows_task)
        with orelse():
            hb = head_block(heads)
            n_hb = heads // hb

            def heads_task(t):
                bi, h0, row = t // (n_hb * s), t // s % n_hb * hb, t % s
                attend(bi, [slot(bi, h0 + k, row, tirx.const(True)) for k in range(hb)])

            U.parallel_for(b * n_hb * s, work_bytes, heads_task)


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


def emit_attend(slots: Sequence[Slot], scale, kt, v, out, *, bi, s, past, qk_dim: int, v_dim: int, lanes: int,
                causal: bool) -> None:
    """The body every attention kernel shares, for `slots` (query row, head) pairs of batch row
    bi (query row i sits at position past + i): load each query scaled into registers, then
    scores against the visible keys block by block (positions 0..past+i if causal, all past+s
    otherwise), online softmax, weighted values, and the store of the live slots. The slots'
    dependency chains are interleaved op by op."""
    n = len(slots)
    keys = key_chunks(kt)
    qrow = [U.local((qk_dim,)) for _ in range(n)]
    acc = [U.local((v_dim,)) for _ in range(n)]
    score = [U.scratch((KB,)) for _ in range(n)]
    run = [U.scratch((4,)) for _ in range(n)]  # running max, running sum, block max, correction
    for qi, sl in enumerate(slots):
        with U.serial(0, qk_dim) as d:
            U.store(qrow[qi], (d,), sl.load_query(d) * scale)
        with U.vectorized(0, v_dim) as d:
            U.store(acc[qi], (d,), U.f32(0))
        U.store(run[qi], (0,), NEG_INF)
        U.store(run[qi], (1,), U.f32(0))
    last_row = functools.reduce(tirx.max, [sl.row for sl in slots])
    limit = [past + sl.row + 1 for sl in slots] if causal else [past + s] * n  # keys slot qi may see: [0, limit[qi])
    n_keys = past + (last_row + 1 if causal else s)  # the task needs [0, n_keys)

    def add_scores(dst, at, j0, c, qi: int, d) -> None:
        """dst[at..at+TAIL) += slot qi's query channel d x key channel d of chunk c (keys j0 + TAIL*c ..)."""
        with U.vectorized(0, TAIL) as l:
            key = keys[bi, slots[qi].kv_head, j0 // TAIL + c, d, l]
            U.store(dst, (at + l,), dst[at + l] + qrow[qi][d] * key)

    with U.serial(0, (n_keys + KB - 1) // KB) as kb:  # blocks of keys [j0, j0 + KB), keys >= n_keys masked
        j0 = kb * KB
        for qi in range(n):
            with U.vectorized(0, KB) as jj:
                U.store(score[qi], (jj,), U.f32(0))
        with U.if_else(n_keys - j0 >= KB) as (then, orelse):
            with then():  # a full block: every slot's KB / TAIL chunks, QB x 4 independent chains
                with U.serial(0, qk_dim) as d:
                    for qi in range(n):
                        for c in range(KB // TAIL):
                            add_scores(score[qi], c * TAIL, j0, c, qi, d)
            with orelse():  # the last block: only the chunks holding keys (a decode step one past a
                # block boundary reads one chunk, not KB keys); the lanes left are masked below
                with U.serial(0, (n_keys - j0 + TAIL - 1) // TAIL) as c:
                    chunk = [U.scratch((TAIL,)) for _ in range(n)]  # (a fixed place: kept in a register)
                    for qi in range(n):
                        with U.vectorized(0, TAIL) as l:
                            U.store(chunk[qi], (l,), U.f32(0))
                    with U.serial(0, qk_dim) as d:
                        for qi in range(n):
                            add_scores(chunk[qi], 0, j0, c, qi, d)
                    for qi in range(n):
                        with U.vectorized(0, TAIL) as l:
                            U.store(score[qi], (c * TAIL + l,), chunk[qi][l])
        for qi in range(n):
            _emit_softmax_block(score[qi], run[qi], acc[qi], j0, limit[qi], v_dim)
        with U.serial(0, tirx.min(KB, n_keys - j0)) as jj:
            with U.serial(0, v_dim // lanes) as c:
                with U.vectorized(0, lanes) as lane:
                    d = c * lanes + lane
                    for qi, sl in enumerate(slots):
                        U.store(acc[qi], (d,), acc[qi][d] + score[qi][jj] * v[bi, j0 + jj, sl.v_col + d])
    for qi, sl in enumerate(slots):
        with U.when(sl.live):
            with U.vectorized(0, v_dim) as d:
                U.store(out, (bi, sl.row, sl.out_col + d), acc[qi][d] / run[qi][1])
