"""Row gathers: out[r, :] = table[index[r], :]. Serves embedding lookups (index = token ids)
and the MoE dispatch (index = the token each expert-sorted row copies)."""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.panel_math import table_value
from mocompile.backends.tvm_cpu import tir_util as U


@functools.cache
def gather_rows(hidden: int, index_dtype: str = "int32", table_rows: int | None = None,
                table_dtype: str = "float32") -> tirx.PrimFunc:
    """table[n, hidden], index[p] -> out[p, hidden]. Indices are clamped into the table, so a
    bad id reads a wrong row instead of memory outside the table. A bfloat16 or float16 table
    (uint16 bits) is widened to float32 as its rows are copied."""
    lanes = U.lanes_for(hidden)
    with U.kernel(C.gather_rows_name(hidden, index_dtype, table_rows, table_dtype)) as kern:
        n, p, table, index, out = C.gather_rows(hidden, index_dtype, table_rows, table_dtype)

        def row(r):
            src = tirx.min(tirx.max(U.i64(index[r]), 0), n - 1)
            with U.serial(0, hidden // lanes) as c:
                with U.vectorized(0, lanes) as l:
                    U.store(out, (r, c * lanes + l), table_value(table_dtype, table[src, c * lanes + l]))

        U.parallel_for(p, 8 * p * hidden, row)
    return kern.func
