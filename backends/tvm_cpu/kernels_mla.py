"""Multi-head latent attention (DeepSeek-V2/V3), the `attention.mla` core, as two kernels
shaped like kernels_attention's (whose rope, block size and online-softmax step they reuse):

- `latent_keys`: k_nope[B, S, H*dn] and the shared rotary key k_rope[B, S, dr] ->
  Kt[B, H, dn+dr, L] at positions past..: per head [k_nope | rope(k_rope)], transposed, so a
  query scores KB keys with plain vector FMAs;
- `latent_attention`: QB (query row, head) slots per task, q = [q_nope | rope(q_rope)] scaled
  by 1/sqrt(dn+dr), causal, keys in blocks of KB with an online softmax; values and output
  have their own head width dv.

Rope is the rotate-half form over the dr rotary channels, with the cos/sin table of
`rope_table(dr)` (the importer has already de-interleaved checkpoints that rotate pairs).
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.kernel_math import latent_channel
from mocompile.backends.tvm_common.specs import LatentSpec
from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.kernels_attention import Slot, emit_attend, emit_key_rows, query_blocks


@functools.cache
def latent_keys(spec: LatentSpec) -> tirx.PrimFunc:
    """k_nope[B, S, H*dn], k_rope[B, S, dr], cs[S, 2, dr/2], past -> kt[B, H, dn+dr, L] at
    positions past.. (see kernels_attention for the two calling modes)."""
    H, dn, dr = spec.heads, spec.nope_dim, spec.rope_dim
    with U.kernel(f"latent_keys_{spec.tag()}") as kern:
        b, s, past, k_nope, k_rope, cs, kt = C.latent_keys(spec)

        def value(bi, h, d, j):
            return latent_channel(lambda c: k_nope[bi, j, h * dn + c], lambda c: k_rope[bi, j, c], d, dn, dr, cs, j)

        emit_key_rows(kt, H, b, s, past, value)
    return kern.func


@functools.cache
def latent_attention(spec: LatentSpec) -> tirx.PrimFunc:
    """q[B, S, H*(dn+dr)], kt (from latent_keys), v[B, S, H*dv], cs -> out[B, S, H*dv], causal.

    A task attends for QB (query row, head) slots (query_blocks): QB consecutive rows of one
    head in a prompt, QB heads of one row in a decode step.
    """
    H, dn, dr, dq, dv = spec.heads, spec.nope_dim, spec.rope_dim, spec.qk_dim, spec.v_dim
    lanes = U.lanes_for(dv)
    scale = U.f32(1.0 / np.sqrt(dq))
    with U.kernel(f"latent_attention_{spec.tag()}") as kern:
        b, s, past, q, kt, v, cs, out = C.latent_attention(spec)

        def slot(bi, h, row, live):
            def load_query(d):
                return latent_channel(lambda c: q[bi, row, h * dq + c], lambda c: q[bi, row, h * dq + dn + c],
                                     d, dn, dr, cs, row)

            return Slot(row, live, h, h * dv, h * dv, load_query)

        def attend(bi, slots):
            emit_attend(slots, scale, kt, v, out, bi=bi, s=s, past=past, qk_dim=dq, v_dim=dv, lanes=lanes, causal=True)

        # work ~ FLOPs / 2: causal scores and weighted values, s * (past + s) * (dq + dv) per head
        query_blocks(b, H, s, b * H * s * (past + s) * (dq + dv) // 2, slot, attend)
    return kern.func
