"""``jax.shard_map`` wrappers for multi-device absorbed-MLA decode.

The decode primitive has no partitioning rule, so a sharded operand handed to it directly makes XLA
all-gather it first. These wrappers run the op per device instead:

- **Data parallel** (:func:`data_parallel_decode`): requests, their block tables and seqlens, and
  the cache's *page* axis are split together over one mesh axis. Each shard owns a pool of
  ``num_pages / n_shards`` pages, and its block-table rows hold *shard-local* page ids (use one
  :class:`~jax_flashmla.kv_cache.PageAllocator` per shard, each over the local pool size).
- **Head parallel** (:func:`head_parallel_decode`): query heads are split, the latent cache (one KV
  head in MLA) is replicated; every device reads the whole cache for its heads.
- :func:`sharded_decode` does either or both (a 2-D mesh).

The scheduler metadata is computed *inside* each shard: its shapes depend on the local batch
(``num_splits [b_local + 1]``) and on the local head count (``num_sm_parts``). No collective is
needed in either layout; outputs stay sharded like ``q``.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from .api import flash_mla_with_kvcache, get_mla_metadata
from .kv_cache import PagedMLACache, write_tokens

HEAD_DIM_V = 512


def _pages(cache):
    return cache.pages if isinstance(cache, PagedMLACache) else cache


def _local_decode(q, pages, block_table, cache_seqlens, *, softmax_scale, causal, num_sms):
    _, s_q, h_q, _ = q.shape
    h_kv = pages.shape[2]
    md, ns = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, num_sms=num_sms)
    return flash_mla_with_kvcache(q, pages, block_table, cache_seqlens, HEAD_DIM_V, md, ns,
                                  softmax_scale=softmax_scale, causal=causal, num_sms=num_sms)


def sharded_decode(q, k_cache, block_table, cache_seqlens, *, mesh, softmax_scale: float,
                   batch_axis=None, head_axis=None, causal: bool = False,
                   num_sms: int | None = None):
    """:func:`flash_mla_with_kvcache` with requests over ``batch_axis`` and/or heads over
    ``head_axis`` of ``mesh`` (``None``: not split).

    With ``batch_axis``, ``k_cache`` ([num_pages, 64, 1, 576] or a PagedMLACache) is split on its
    page axis and ``block_table`` must hold shard-local ids; ``b`` and ``num_pages`` must divide
    by the axis size. With ``head_axis``, ``h_q`` must divide by it.

    Returns ``(out [b, s_q, h_q, 512], lse [b, h_q, s_q])`` sharded as
    ``P(batch_axis, None, head_axis, None)`` and ``P(batch_axis, head_axis, None)``.
    """
    if batch_axis is None and head_axis is None:
        raise ValueError("give batch_axis, head_axis or both")
    pages = _pages(k_cache)
    if batch_axis is not None:
        n = mesh.shape[batch_axis]
        if q.shape[0] % n or pages.shape[0] % n:
            raise ValueError(f"batch ({q.shape[0]}) and num_pages ({pages.shape[0]}) must divide "
                             f"by the size of mesh axis {batch_axis!r} ({n})")
    if head_axis is not None and q.shape[2] % mesh.shape[head_axis]:
        raise ValueError(f"h_q ({q.shape[2]}) must divide by the size of mesh axis "
                         f"{head_axis!r} ({mesh.shape[head_axis]})")

    def body(q, pages, block_table, cache_seqlens):
        return _local_decode(q, pages, block_table, cache_seqlens, softmax_scale=softmax_scale,
                             causal=causal, num_sms=num_sms)

    b = batch_axis
    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(b, None, head_axis, None), P(b), P(b), P(b)),
        out_specs=(P(b, None, head_axis, None), P(b, head_axis, None)),
        # The primitive has no varying-manual-axes rule; nothing here needs the check.
        check_vma=False)
    return fn(q, pages, block_table, cache_seqlens)


def data_parallel_decode(q, k_cache, block_table, cache_seqlens, *, mesh, axis_name,
                         softmax_scale: float, causal: bool = False, num_sms: int | None = None):
    """Requests and the cache's pages split together over ``axis_name`` (shard-local ids)."""
    return sharded_decode(q, k_cache, block_table, cache_seqlens, mesh=mesh,
                          softmax_scale=softmax_scale, batch_axis=axis_name, causal=causal,
                          num_sms=num_sms)


def head_parallel_decode(q, k_cache, block_table, cache_seqlens, *, mesh, axis_name,
                         softmax_scale: float, causal: bool = False, num_sms: int | None = None):
    """Query heads split over ``axis_name``; cache, block table and seqlens replicated."""
    return sharded_decode(q, k_cache, block_table, cache_seqlens, mesh=mesh,
                          softmax_scale=softmax_scale, head_axis=axis_name, causal=causal,
                          num_sms=num_sms)


def data_parallel_write_tokens(cache, latent, rope, slot_mapping, *, mesh, axis_name):
    """:func:`~jax_flashmla.kv_cache.write_tokens` per data-parallel shard.

    ``latent [n, 512]``, ``rope [n, 64]`` and ``slot_mapping [n]`` are split over ``axis_name``
    in order (shard ``i`` gets the ``i``-th ``n / n_shards`` tokens, e.g. its requests' new
    tokens), and each shard's slots index its local pages. Donate ``cache`` in the enclosing jit.
    """
    def body(pages, latent, rope, slots):
        return write_tokens(pages, latent, rope, slots)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(axis_name),) * 4, out_specs=P(axis_name),
                       check_vma=False)
    pages = fn(_pages(cache), latent, rope, slot_mapping)
    return PagedMLACache(pages) if isinstance(cache, PagedMLACache) else pages
