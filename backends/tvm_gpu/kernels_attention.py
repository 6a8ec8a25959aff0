"""GPU attention with the KV cache: grouped-query attention with rope, and latent (MLA) attention.

Keys: the [B, H, D, L] key tensors the lowering passes around (a plain forward's fresh keys,
or the step's key cache) are stored position-major on the GPU, [B, H, L, D] in the same
memory (`_keys_view`), so that a thread scoring one key reads that key's D channels in a row.

`attention` runs one block per (sample, query row, head) with KT threads: the query (roped,
scaled) is staged in shared memory; keys are visited in tiles of KT, thread t scoring key
j0 + t; the tile's maximum and exponent sum come from block reductions and update a running
maximum and sum (online softmax, flash-attention style: no score matrix is ever stored); each
thread accumulates the output channels d = t, t + KT, ... from the tile's probabilities (kept
in shared memory) and the value rows. Causal rows stop at their own position, so no masked
key is read. One set of kernels serves a plain forward (past = 0, fresh keys and values) and a
cached step (past positions already in the caches, which `attention_keys` / `cache_rows`
extend in place first).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.kernel_math import exp, latent_channel, rope
from mocompile.backends.tvm_common.specs import AttentionSpec, LatentSpec
from mocompile.backends.tvm_gpu import gpu_util as G

KT = 64  # keys per tile = threads per block
KB = 64  # a cache's capacity is a multiple of this many positions (the manifest's step.block)
NEG_INF = tirx.FloatImm("float32", float("-inf"))


def padded_len(s):
    return (s + KB - 1) // KB * KB


def _keys_view(kt: tirx.Buffer) -> tirx.Buffer:
    b, heads, width, length = kt.shape
    return T.decl_buffer((b, heads, length, width), kt.dtype, data=kt.data)


def _max(a, b):
    return tirx.max(a, b)


def _add(a, b):
    return a + b


def _emit_keys(kt, heads: int, width: int, b, s, past, value: Callable) -> None:
    """keys[bi, h, past + j, d] = value(bi, h, d, j): one block per (sample, position)."""
    keys = _keys_view(kt)
    threads = G.threads_for(heads * width)
    with G.grid(b * s) as task:
        with G.block(threads) as tid:
            bi, j = task // s, task % s
            G.strided(tid, heads * width, threads,
                      lambda c: G.store(keys, (bi, c // width, past + j, c % width), value(bi, c // width, c % width, j)))


def _emit_attention(q_load: Callable, kt, v, out, heads: int, kv_of: Callable, qk_dim: int, v_dim: int,
                    b, s, past, causal: bool) -> None:
    """out[bi, row, h*v_dim + d] = softmax(q . keys) @ values for every (bi, row, h)."""
    keys = _keys_view(kt)
    scale = G.f32(1.0 / np.sqrt(qk_dim))
    per_thread = -(-v_dim // KT)
    with G.grid(b * s * heads) as task:
        qs = G.shared((qk_dim,))
        probs = G.shared((KT,))
        red = G.shared((KT,))
        with G.block(KT) as tid:
            bi, row, h = task // (s * heads), task // heads % s, task % heads
            kvh = kv_of(h)
            stats = G.local((4,))  # running max, running sum, tile max / correction, score
            acc = G.local((per_thread,))
            G.strided(tid, qk_dim, KT, lambda d: G.store(qs, (d,), q_load(bi, row, h, d) * scale))
            for c in range(per_thread):
                G.store(acc, (c,), G.f32(0))
            G.store(stats, (0,), NEG_INF)
            G.store(stats, (1,), G.f32(0))
            G.barrier()
            n = past + row + 1 if causal else past + s
            with G.serial(0, (n + KT - 1) // KT) as tile:
                j = tile * KT + tid
                G.store(stats, (3,), NEG_INF)
                with G.when(j < n):
                    dot = G.local((1,))
                    G.store(dot, (0,), G.f32(0))
                    with G.serial(0, qk_dim) as d:
                        G.store(dot, (0,), dot[0] + qs[d] * keys[bi, kvh, j, d])
                    G.store(stats, (3,), dot[0])
                G.store(red, (tid,), stats[3])
                tile_max = G.block_reduce(red, tid, KT, _max)
                G.store(stats, (2,), tirx.max(stats[0], tile_max))  # the new running max
                G.barrier()  # every thread has read red[0]
                p = exp(stats[3] - stats[2])
                G.store(probs, (tid,), p)
                G.store(red, (tid,), p)
                tile_sum = G.block_reduce(red, tid, KT, _add)
                corr = exp(stats[0] - stats[2])
                G.store(stats, (1,), stats[1] * corr + tile_sum)
                for c in range(per_thread):
                    d = tid + c * KT
                    with G.when(d < v_dim):
                        part = G.local((1,))
                        G.store(part, (0,), G.f32(0))
                        with G.serial(0, KT) as t:
                            with G.when(tile * KT + t < n):
                                G.store(part, (0,), part[0] + probs[t] * v[bi, tile * KT + t, kvh * v_dim + d])
                        G.store(acc, (c,), acc[c] * corr + part[0])
                G.store(stats, (0,), stats[2])
                G.barrier()  # probs and red are rewritten by the next tile
            for c in range(per_thread):
                d = tid + c * KT
                with G.when(d < v_dim):
                    G.store(out, (bi, row, h * v_dim + d), acc[c] / stats[1])


@functools.cache
def attention_keys(spec: AttentionSpec) -> tirx.PrimFunc:
    """k[B, S, Hkv*D] (+ cs from rope_table), past -> kt[B, Hkv, D, L] at positions past.."""
    D, hkv = spec.head_dim, spec.kv_heads
    with G.kernel(f"attention_keys_{spec.tag()}") as kern:
        b, s, past, k, cs, kt = C.attention_keys(spec)
        _emit_keys(kt, hkv, D, b, s, past, C.attention_key_value(spec, k, cs))
    return kern.func


@functools.cache
def attention(spec: AttentionSpec) -> tirx.PrimFunc:
    """q[B, S, H*D], kt[B, Hkv, D, Lk], v[B, Lv, Hkv*D] (+ cs), past -> out[B, S, H*D]."""
    D, H, hkv = spec.head_dim, spec.heads, spec.kv_heads
    group = H // hkv
    with G.kernel(f"attention_{spec.tag()}") as kern:
        b, s, past, q, kt, v, cs, out = C.attention(spec)

        def q_load(bi, row, h, d):
            def load(c):
                return q[bi, row, h * D + c]

            return rope(load, d, D, cs, row) if spec.rope else load(d)

        _emit_attention(q_load, kt, v, out, H, lambda h: h // group, D, D, b, s, past, spec.causal)
    return kern.func


@functools.cache
def latent_keys(spec: LatentSpec) -> tirx.PrimFunc:
    """k_nope[B, S, H*dn], k_rope[B, S, dr], cs[S, 2, dr/2], past -> kt[B, H, dn+dr, L] at past.."""
    H, dn, dr, dq = spec.heads, spec.nope_dim, spec.rope_dim, spec.qk_dim
    with G.kernel(f"latent_keys_{spec.tag()}") as kern:
        b, s, past, k_nope, k_rope, cs, kt = C.latent_keys(spec)

        def value(bi, h, d, j):
            return latent_channel(lambda c: k_nope[bi, j, h * dn + c], lambda c: k_rope[bi, j, c], d, dn, dr, cs, j)

        _emit_keys(kt, H, dq, b, s, past, value)
    return kern.func


@functools.cache
def latent_attention(spec: LatentSpec) -> tirx.PrimFunc:
    """q[B, S, H*(dn+dr)], kt (from latent_keys), v[B, Lv, H*dv], cs, past -> out[B, S, H*dv], causal."""
    H, dn, dr, dq, dv = spec.heads, spec.nope_dim, spec.rope_dim, spec.qk_dim, spec.v_dim
    with G.kernel(f"latent_attention_{spec.tag()}") as kern:
        b, s, past, q, kt, v, cs, out = C.latent_attention(spec)

        def q_load(bi, row, h, d):
            return latent_channel(lambda c: q[bi, row, h * dq + c], lambda c: q[bi, row, h * dq + dn + c],
                                 d, dn, dr, cs, row)

        _emit_attention(q_load, kt, v, out, H, lambda h: h, dq, dv, b, s, past, True)
    return kern.func
