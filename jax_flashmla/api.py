"""Public API with FlashMLA's (v1) signatures, usable inside ``jax.jit``."""

from __future__ import annotations

import math

import jax.numpy as jnp

from . import _checks, primitives
from ._device import resolve_num_sms
from .scheduler import METADATA_ROW, num_sm_parts


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, *,
                     num_sms: int | None = None):
    """Split-KV schedule for one decode step; compute it once per step and share it by all layers.

    Args:
      cache_seqlens: int32 ``[b]``, the KV length of each request.
      num_q_tokens_per_head_k: ``s_q * h_q // h_kv`` (query rows per KV head; FlashMLA's misnamed
        ``num_heads_per_head_k``).
      num_heads_k: ``h_kv``.
      num_sms: SM count to schedule for. Default: the target GPU's ``core_count``, else 132.

    Returns:
      ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])``.
      The result is valid only for these ``cache_seqlens`` values.
    """
    _checks.check_seqlens(cache_seqlens)
    _checks.check_metadata_args(num_q_tokens_per_head_k, num_heads_k)
    parts = num_sm_parts(resolve_num_sms(num_sms), num_q_tokens_per_head_k, num_heads_k)
    if cache_seqlens.shape[0] == 0:
        empty = jnp.zeros((parts, METADATA_ROW), jnp.int32).at[:, 1].set(-1)
        return empty, jnp.zeros((1,), jnp.int32)
    return primitives.bind_metadata(cache_seqlens, parts)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata=None, num_splits=None, softmax_scale=None,
                           causal: bool = False, *, num_sms: int | None = None,
                           is_fp8_kvcache: bool = False, kv_scale=None):
    """Absorbed MLA decode over a paged latent cache (FlashMLA semantics).

    Args:
      q: ``[b, s_q, h_q, 576]`` bfloat16 or float16.
      k_cache: ``[num_blocks, 64, h_kv, 576]``, same dtype as q; V is its first 512 channels.
      block_table: int32 ``[b, max_blocks_per_seq]``; entries past a request's length are ignored.
      cache_seqlens: int32 ``[b]``.
      head_dim_v: must be 512.
      tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata` for the same
        ``cache_seqlens``; pass ``None`` for both to compute them inside this call.
      softmax_scale: defaults to ``576 ** -0.5`` like FlashMLA. DeepSeek models need
        ``192 ** -0.5 * mscale ** 2``: pass it explicitly.
      causal: bottom-right aligned causal mask across the ``s_q`` query tokens (MTP).
      num_sms: SM count used to check that the metadata fits this call (see get_mla_metadata).
      is_fp8_kvcache: ``k_cache`` holds DeepSeek V3.2's 656-byte "FP8 with scale" tokens
        (``uint8 [num_blocks, 64, 1, 656]``, see :mod:`jax_flashmla.fp8`); q must be bf16.
      kv_scale: float32 scalar: ``k_cache`` is ``float8_e4m3fn [num_blocks, 64, h_kv, 576]``
        holding ``kv / kv_scale`` (per-tensor FP8); q must be bf16.
        FP8 caches run through the reference on CPU and through their own kernel on CUDA.

    Returns:
      ``(out [b, s_q, h_q, 512] in q's dtype, lse float32 [b, h_q, s_q])``; natural-log lse;
      rows with nothing to attend give ``out = 0``, ``lse = +inf``.
    """
    if (tile_scheduler_metadata is None) != (num_splits is None):
        raise ValueError("pass both tile_scheduler_metadata and num_splits, or neither")
    _checks.check_seqlens(cache_seqlens)
    _checks.require_rank("q", q, 4, "[batch, s_q, h_q, 576]")
    _checks.require_rank("k_cache", k_cache, 4, "[num_blocks, 64, h_kv, 576]")
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"h_q (q.shape[2] = {h_q}) must be a multiple of h_kv "
                         f"(k_cache.shape[2] = {h_kv})")
    q_rows = s_q * h_q // h_kv
    if tile_scheduler_metadata is None:
        tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, q_rows, h_kv,
                                                               num_sms=num_sms)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if is_fp8_kvcache and kv_scale is not None:
        raise ValueError("pass is_fp8_kvcache=True (656-byte tokens with their own scales) or "
                         "kv_scale (per-tensor float8_e4m3fn cache), not both")
    layout = ("fp8_with_scale" if is_fp8_kvcache else
              "fp8_per_tensor" if kv_scale is not None else "dense")
    if layout == "fp8_per_tensor":
        kv_scale = jnp.asarray(kv_scale, jnp.float32).reshape(())
    _checks.check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v,
                         tile_scheduler_metadata, num_splits, softmax_scale, layout)
    expected = num_sm_parts(resolve_num_sms(num_sms), q_rows, h_kv)
    got = tile_scheduler_metadata.shape[0]
    if got != expected:
        raise ValueError(
            f"tile_scheduler_metadata has {got} parts but this call (s_q={s_q}, h_q={h_q}, "
            f"h_kv={h_kv}) needs {expected}: compute it with get_mla_metadata(cache_seqlens, "
            f"num_q_tokens_per_head_k={q_rows}, num_heads_k={h_kv}) (and the same num_sms)")
    if b == 0:
        return (jnp.zeros((0, s_q, h_q, head_dim_v), q.dtype),
                jnp.zeros((0, h_q, s_q), jnp.float32))
    causal = bool(causal) and s_q > 1  # FlashMLA: causal is meaningless for one query token
    out, lse, _, _ = primitives.bind_decode(
        q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
        softmax_scale=float(softmax_scale), causal=causal, head_dim_v=head_dim_v, layout=layout,
        kv_scale=kv_scale)
    return out, lse


def deepseek_softmax_scale(qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64,
                           mscale: float = 1.0) -> float:
    """DeepSeek-V2/V3's softmax scale: ``(qk_nope + qk_rope) ** -0.5 * mscale ** 2``."""
    return (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 * mscale * mscale


def yarn_mscale(scaling_factor: float, mscale_all_dim: float = 1.0) -> float:
    """YaRN attention mscale (DeepSeek: 0.1 * mscale_all_dim * ln(factor) + 1 for factor > 1)."""
    if scaling_factor <= 1.0:
        return 1.0
    return 0.1 * mscale_all_dim * math.log(scaling_factor) + 1.0
