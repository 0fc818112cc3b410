"""Trace-time validation shared by the public API and the primitives' abstract evaluation.

Every check names the argument and what was expected, so a bad call fails while tracing with a
Python traceback instead of inside a kernel.
"""

from __future__ import annotations

import numpy as np

HEAD_DIM_QK = 576
HEAD_DIM_V = 512
PAGE_SIZE = 64
FP8_WITH_SCALE_BYTES = 656

#: KV-cache layouts: the cache in q's dtype; DeepSeek V3.2's 656-byte "FP8 with scale" tokens
#: (uint8/int8/float8_e4m3fn bytes, one KV head); float8_e4m3fn with one per-tensor scale.
KV_LAYOUTS = ("dense", "fp8_with_scale", "fp8_per_tensor")
_FP8_BYTE_DTYPES = ("uint8", "int8", "float8_e4m3fn")
#: Largest batch the on-device scheduler handles (it stages seqlens in shared memory).
MAX_BATCH = 32768


def _dtype_name(x) -> str:
    return np.dtype(x.dtype).name


def _is_half(dtype) -> bool:
    return np.dtype(dtype).name in ("bfloat16", "float16")


def require_rank(name: str, x, rank: int, layout: str) -> None:
    if len(x.shape) != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}")


def _require_int32(name: str, x) -> None:
    if np.dtype(x.dtype) != np.int32:
        raise TypeError(f"{name} must be int32, got {_dtype_name(x)}")


def check_seqlens(cache_seqlens, name: str = "cache_seqlens") -> int:
    require_rank(name, cache_seqlens, 1, "[batch]")
    _require_int32(name, cache_seqlens)
    b = int(cache_seqlens.shape[0])
    if b > MAX_BATCH:
        raise ValueError(f"{name} has batch {b}; the scheduler supports at most {MAX_BATCH}")
    return b


def check_metadata_args(num_q_tokens_per_head_k, num_heads_k) -> None:
    for name, v in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k),
                    ("num_heads_k", num_heads_k)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or int(v) < 1:
            raise ValueError(f"{name} must be a positive static Python int, got {v!r}")


def _check_cache_layout(q, k_cache, layout: str) -> None:
    """dtype and last dim of k_cache (and q's dtype) for one of KV_LAYOUTS."""
    if layout not in KV_LAYOUTS:
        raise ValueError(f"kv layout must be one of {KV_LAYOUTS}, got {layout!r}")
    d_k, h_kv = int(k_cache.shape[3]), int(k_cache.shape[2])
    if layout == "dense":
        if not _is_half(q.dtype):
            raise TypeError(f"q must be bfloat16 or float16, got {_dtype_name(q)}")
        if np.dtype(k_cache.dtype) != np.dtype(q.dtype):
            raise TypeError(f"k_cache must have q's dtype {_dtype_name(q)}, got "
                            f"{_dtype_name(k_cache)}")
        expected_d = HEAD_DIM_QK
    else:
        if _dtype_name(q) != "bfloat16":
            raise TypeError(f"q must be bfloat16 with an FP8 KV cache, got {_dtype_name(q)}")
        if layout == "fp8_with_scale":
            if _dtype_name(k_cache) not in _FP8_BYTE_DTYPES:
                raise TypeError("k_cache with is_fp8_kvcache=True must hold the 656-byte tokens as "
                                f"one of {_FP8_BYTE_DTYPES}, got {_dtype_name(k_cache)}")
            if h_kv != 1:
                raise ValueError("k_cache with is_fp8_kvcache=True must have one KV head "
                                 f"(k_cache.shape[2] = 1), got {h_kv}")
            expected_d = FP8_WITH_SCALE_BYTES
        else:
            if _dtype_name(k_cache) != "float8_e4m3fn":
                raise TypeError("k_cache with kv_scale must be float8_e4m3fn, got "
                                f"{_dtype_name(k_cache)}")
            expected_d = HEAD_DIM_QK
    if d_k != expected_d:
        raise ValueError(f"k_cache head dim (k_cache.shape[3]) must be {expected_d}, got {d_k}")


def check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                 num_splits, softmax_scale, layout: str = "dense") -> dict:
    """Validates a decode call; returns the derived static sizes."""
    require_rank("q", q, 4, "[batch, s_q, h_q, 576]")
    require_rank("k_cache", k_cache, 4, "[num_blocks, 64, h_kv, 576 (656 for FP8 with scale)]")
    b, s_q, h_q, d = (int(v) for v in q.shape)
    num_blocks, page, h_kv, _ = (int(v) for v in k_cache.shape)
    if d != HEAD_DIM_QK:
        raise ValueError(f"q head dim (q.shape[3]) must be {HEAD_DIM_QK}, got {d}")
    _check_cache_layout(q, k_cache, layout)
    if page != PAGE_SIZE:
        raise ValueError(f"k_cache page size (k_cache.shape[1]) must be {PAGE_SIZE}, got {page}")
    if int(head_dim_v) != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    if s_q < 1 or h_q < 1:  # b == 0 is allowed: the API returns empty outputs without a call
        raise ValueError(f"q must have non-empty s_q and h_q, got shape {tuple(q.shape)}")
    if num_blocks < 1 or h_kv < 1:
        raise ValueError(f"k_cache must have at least one block and one KV head, got "
                         f"shape {tuple(k_cache.shape)}")
    if h_q % h_kv:
        raise ValueError(f"h_q (q.shape[2] = {h_q}) must be a multiple of h_kv "
                         f"(k_cache.shape[2] = {h_kv})")
    require_rank("block_table", block_table, 2, "[batch, max_blocks_per_seq]")
    _require_int32("block_table", block_table)
    if int(block_table.shape[0]) != b:
        raise ValueError(f"block_table batch ({block_table.shape[0]}) must equal q batch ({b})")
    if int(block_table.shape[1]) < 1:
        raise ValueError("block_table must have at least one column")
    if check_seqlens(cache_seqlens) != b:
        raise ValueError(f"cache_seqlens batch ({cache_seqlens.shape[0]}) must equal q batch ({b})")
    require_rank("tile_scheduler_metadata", tile_scheduler_metadata, 2, "[num_sm_parts, 8]")
    _require_int32("tile_scheduler_metadata", tile_scheduler_metadata)
    if int(tile_scheduler_metadata.shape[1]) != 8 or int(tile_scheduler_metadata.shape[0]) < 1:
        raise ValueError("tile_scheduler_metadata must have shape [num_sm_parts >= 1, 8], got "
                         f"{tuple(tile_scheduler_metadata.shape)}")
    require_rank("num_splits", num_splits, 1, "[batch + 1]")
    _require_int32("num_splits", num_splits)
    if int(num_splits.shape[0]) != b + 1:
        raise ValueError(f"num_splits must have shape [batch + 1] = [{b + 1}], got "
                         f"{tuple(num_splits.shape)}: metadata computed for another batch size")
    if softmax_scale is not None and not (float(softmax_scale) > 0.0
                                          and np.isfinite(float(softmax_scale))):
        raise ValueError(f"softmax_scale must be a finite positive float, got {softmax_scale!r}")
    return dict(b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, ng=h_q // h_kv,
                q_seq_per_hk=s_q * h_q // h_kv,
                num_sm_parts=int(tile_scheduler_metadata.shape[0]))
