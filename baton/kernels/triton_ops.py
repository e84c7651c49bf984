"""The Triton implementations of every op in `reference.py`, under the same names.

`ops.py` picks this module for CUDA tensors. The kernels live in one file per family:
`triton_cache.py` (store/gather/scatter by slot), `triton_attention.py` (prefill and decode
attention over the paged cache), `triton_elementwise.py` (norms, rotary, silu_and_mul).
"""

from baton.kernels.triton_attention import decode_attention, prefill_attention
from baton.kernels.triton_cache import gather_kv, scatter_kv, store_kv
from baton.kernels.triton_elementwise import (
    fused_add_rms_norm,
    rms_norm,
    rms_norm_fp8,
    rotary_embedding,
    silu_and_mul,
    silu_and_mul_fp8,
)

__all__ = [
    "decode_attention",
    "fused_add_rms_norm",
    "gather_kv",
    "prefill_attention",
    "rms_norm",
    "rms_norm_fp8",
    "rotary_embedding",
    "scatter_kv",
    "silu_and_mul",
    "silu_and_mul_fp8",
    "store_kv",
]
