"""Upper bounds on the sizes a `.moe` spec may declare, checked while the spec is parsed.

They exist so that a mistyped or hostile number fails as a located SpecError at the number,
before anything is computed from it: `[moe] * 10**40` would otherwise raise Python's
OverflowError, `[moe] * 10**9` would build a billion-entry list, and `experts = 10**9`
would make the group checks walk a billion experts. Each bound is well above the sizes of
released models (noted beside it), so real models stay accepted.
"""

from __future__ import annotations

MAX_INT_DIGITS = 64  # integer literals longer than this are refused by the lexer-level check
MAX_LAYERS = 4096  # also the longest list a spec may build (layers and variant layer lists); real: <= ~200
MAX_HIDDEN = 65536  # width of the residual stream, and head_dim / MLA ranks; real: <= ~25k
MAX_FFN_HIDDEN = 262144  # inner width of an ffn block or an expert; real: <= ~75k
MAX_HEADS = 4096  # query / key-value heads; real: <= ~128
MAX_VOCAB = 4_194_304  # token vocabulary and feature width of a modality; real: <= ~1M
MAX_EXPERTS = 4096  # experts of a moe block, and top_k / shared experts / routing groups; real: <= ~400
MAX_SEQ = 16_777_216  # max_seq, 2**24; real: <= ~10M
