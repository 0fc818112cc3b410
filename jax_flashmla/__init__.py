"""jax_flashmla: FlashMLA-class MLA decode kernels for Hopper as JAX primitives."""

from . import export  # registers PagedMLACache for jax.export serialization
from ._ffi import build_info, is_built_with_cuda
from .api import (deepseek_softmax_scale, flash_mla_with_kvcache, get_mla_metadata,
                  yarn_mscale)
from .kv_cache import PageAllocator, PagedMLACache, write_tokens
from .reference import mla_decode_reference
from .scheduler import num_sm_parts, schedule_numpy

__version__ = "0.1.0"

__all__ = [
    "PageAllocator",
    "PagedMLACache",
    "build_info",
    "deepseek_softmax_scale",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "is_built_with_cuda",
    "mla_decode_reference",
    "num_sm_parts",
    "schedule_numpy",
    "write_tokens",
    "yarn_mscale",
]
