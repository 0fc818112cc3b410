"""Pure-JAX paged MLA decode with FlashMLA's conventions (float32 math).

This is the CPU implementation of ``flash_mla_with_kvcache`` and the oracle for the GPU tests. It
gathers every page of every request (memory O(b * max_blocks * 64 * 576)), so it is meant for
tests and small problems, not for serving.

Conventions (FlashMLA dense decode):
- V is the first ``head_dim_v`` channels of the cache; head folding with ``ng = h_q // h_kv``
  (query head ``h`` reads KV head ``h // ng``).
- ``causal`` with ``s_q > 1`` is bottom-right aligned: query token ``i`` sees keys
  ``j <= seqlen - s_q + i``. For ``s_q == 1`` causal changes nothing.
- Keys past ``cache_seqlens`` are never used: masking *selects*, so NaN or garbage in unused pages,
  in the tail of the last page, or invalid block ids past the end never reach the output.
- ``lse`` is the natural-log log-sum-exp of the scaled logits, float32 ``[b, h_q, s_q]``.
  A row with nothing to attend gets ``out = 0`` and ``lse = +inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAGE_SIZE = 64


def mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                         softmax_scale: float, causal: bool):
    """Returns ``(out [b, s_q, h_q, head_dim_v] in q.dtype, lse float32 [b, h_q, s_q])``."""
    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    ng = h_q // h_kv
    s_k = max_blocks * page

    # Gather pages; clamp ids so that invalid entries (past the end) read *some* page, which the
    # mask below then drops without letting its values (NaN included) into the arithmetic.
    ids = jnp.clip(block_table, 0, num_blocks - 1)
    kv = k_cache[ids].astype(jnp.float32)                     # [b, max_blocks, page, h_kv, d]
    kv = kv.reshape(b, s_k, h_kv, d)
    pos = jnp.arange(s_k, dtype=jnp.int32)
    seqlens = cache_seqlens.astype(jnp.int32)
    in_range = pos[None, :] < seqlens[:, None]                 # [b, s_k]
    kv = jnp.where(in_range[:, :, None, None], kv, 0.0)        # select, never multiply NaN

    qf = q.astype(jnp.float32).reshape(b, s_q, h_kv, ng, d)
    logits = jnp.einsum("bshgd,bkhd->bhgsk", qf, kv,
                        precision=jax.lax.Precision.HIGHEST) * jnp.float32(softmax_scale)

    valid = in_range[:, None, None, None, :]                   # [b, 1, 1, 1, s_k]
    if causal and s_q > 1:
        limit = seqlens[:, None] - s_q + jnp.arange(s_q, dtype=jnp.int32)[None, :]   # [b, s_q]
        valid = valid & (pos[None, None, :] <= limit[:, :, None])[:, None, None, :, :]
    logits = jnp.where(valid, logits, -jnp.inf)

    row_max = jnp.max(logits, axis=-1, keepdims=True)
    empty = row_max == -jnp.inf
    safe_max = jnp.where(empty, 0.0, row_max)
    p = jnp.where(valid, jnp.exp(logits - safe_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    lse = jnp.where(empty, jnp.inf, jnp.log(jnp.where(empty, 1.0, denom)) + safe_max)[..., 0]
    probs = p / jnp.where(empty, 1.0, denom)
    out = jnp.einsum("bhgsk,bkhv->bshgv", probs, kv[..., :head_dim_v],
                     precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(b, s_q, h_q, head_dim_v).astype(q.dtype)
    lse = lse.reshape(b, h_q, s_q)                             # (h_kv, ng) -> h_q
    return out, lse
