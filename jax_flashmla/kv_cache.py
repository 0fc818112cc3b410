"""Paged latent KV cache for absorbed-MLA decode: a pytree, a host page allocator, a JAX writer.

One layer's cache is ``pages [num_pages, 64, 1, 576]`` (bf16 or fp16): per token the RMS-normed
compressed KV latent ``c_kv`` (512 channels, also used as V by the kernel) followed by the roped
key part ``k_pe`` (64 channels). There is one latent "KV head" (``h_kv = 1``).

Roles:

- :class:`PagedMLACache` is what travels through ``jax.jit``. Writes are pure JAX
  (``.at[...].set``); they are in place only when the jitted step *donates* the cache argument
  (``jax.jit(step, donate_argnames=("caches",))``); without donation XLA copies the whole pool
  every step.
- :class:`PageAllocator` runs on the host (plain Python/NumPy) between steps. It owns the free
  list, maps sequences to pages and builds the small int32 arrays a step needs: ``slot_mapping``
  for the tokens being written, ``block_table`` and ``cache_seqlens`` for the decode kernel.
- Several layers: a tuple/list of per-layer caches (:func:`init_layer_caches`). Each layer's pool
  is then its own buffer, which the decode kernel can read without a copy. :func:`stack_caches`
  builds one ``[L, num_pages, ...]`` array for ``lax.scan`` models; slicing a layer out of it may
  cost a copy of that layer's pool per step on GPU (a custom call needs its own buffer), so prefer
  the list for serving.

Slot convention: token slot ``s = page_id * 64 + offset``; a negative slot (or page id) means
"do not write" (padding tokens). Block tables are padded with :data:`INVALID_PAGE`; the kernel
never reads entries past a request's length.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAGE_SIZE = 64
KV_LORA_RANK = 512
QK_ROPE_HEAD_DIM = 64
HEAD_DIM = KV_LORA_RANK + QK_ROPE_HEAD_DIM  # 576
#: Padding value of block tables and "no slot" marker of slot mappings.
INVALID_PAGE = -1


@dataclasses.dataclass(frozen=True)
class PagedMLACache:
    """One layer's paged latent cache; a pytree with one leaf, ``pages``.

    ``pages[p, o, 0, :512]`` is the normalized latent and ``pages[p, o, 0, 512:]`` the roped key
    part of the token stored at slot ``p * 64 + o``.
    """

    pages: jax.Array

    @classmethod
    def create(cls, num_pages: int, dtype=jnp.bfloat16, *, sharding=None) -> "PagedMLACache":
        """Zero-filled pool of ``num_pages`` pages (``sharding`` places it, e.g. over DP shards)."""
        shape = (int(num_pages), PAGE_SIZE, 1, HEAD_DIM)
        if sharding is not None:
            return cls(jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)())
        return cls(jnp.zeros(shape, dtype))

    @property
    def num_pages(self) -> int:
        return int(self.pages.shape[-4])

    @property
    def dtype(self):
        return self.pages.dtype

    @property
    def shape(self):
        return self.pages.shape

    def latent(self):
        """``[num_pages, 64, 512]`` view of the latent part (for tests and debugging)."""
        return self.pages[..., 0, :KV_LORA_RANK]

    def rope(self):
        """``[num_pages, 64, 64]`` view of the roped key part."""
        return self.pages[..., 0, KV_LORA_RANK:]


jax.tree_util.register_dataclass(PagedMLACache, data_fields=["pages"], meta_fields=[])


def _pages_of(cache):
    return cache.pages if isinstance(cache, PagedMLACache) else cache


def _like(cache, pages):
    return PagedMLACache(pages) if isinstance(cache, PagedMLACache) else pages


def check_token_entries(latent, rope) -> None:
    """New tokens' parts: latent ``[n, 512]`` and rope ``[n, 64]``."""
    if latent.ndim != 2 or latent.shape[1] != KV_LORA_RANK:
        raise ValueError(f"latent must be [n, {KV_LORA_RANK}], got {tuple(latent.shape)}")
    if rope.shape != (latent.shape[0], QK_ROPE_HEAD_DIM):
        raise ValueError(f"rope must be [n, {QK_ROPE_HEAD_DIM}] with latent's n = "
                         f"{latent.shape[0]}, got {tuple(rope.shape)}")


def slot_indices(slot_mapping, block_ids, offsets, n: int, num_pages: int):
    """(page ids, in-page offsets) of ``n`` token slots for a ``mode="drop"`` scatter.

    Takes ``slot_mapping`` (``page * 64 + offset``) or ``block_ids`` + ``offsets``; negative
    entries mean "skip". JAX wraps negative indices like NumPy, so skipped tokens get the
    out-of-range page id ``num_pages`` instead, which ``mode="drop"`` discards.
    """
    if (slot_mapping is None) == (block_ids is None and offsets is None):
        raise ValueError("pass either slot_mapping or (block_ids, offsets)")
    if slot_mapping is not None:
        slots = jnp.asarray(slot_mapping, jnp.int32).reshape(-1)
        skip = slots < 0
        block_ids, offsets = slots // PAGE_SIZE, slots % PAGE_SIZE
    else:
        if block_ids is None or offsets is None:
            raise ValueError("pass both block_ids and offsets")
        block_ids = jnp.asarray(block_ids, jnp.int32).reshape(-1)
        offsets = jnp.asarray(offsets, jnp.int32).reshape(-1)
        skip = block_ids < 0
    if block_ids.shape[0] != n:
        raise ValueError(f"{block_ids.shape[0]} slots for {n} tokens")
    return jnp.where(skip, num_pages, block_ids), offsets


def write_tokens(cache, latent, rope, slot_mapping=None, *, block_ids=None, offsets=None):
    """Writes ``n`` tokens' ``[latent | rope]`` entries into the paged cache (pure JAX).

    Args:
      cache: :class:`PagedMLACache` or a raw ``[num_pages, 64, 1, 576]`` array; the result has
        the same type.
      latent: ``[n, 512]`` normalized ``c_kv``; cast to the cache dtype.
      rope: ``[n, 64]`` roped ``k_pe``.
      slot_mapping: int ``[n]``, ``page * 64 + offset``; negative entries are skipped.
      block_ids, offsets: alternative to ``slot_mapping`` (both int ``[n]``); a negative block id
        is skipped.

    Call it inside a jitted step that donates the cache so the scatter updates the pool in place.
    Duplicate slots in one call write an unspecified one of the duplicates.
    """
    pages = _pages_of(cache)
    num_pages, page, h_kv, d = pages.shape
    if (page, h_kv, d) != (PAGE_SIZE, 1, HEAD_DIM):
        raise ValueError(f"cache must be [num_pages, {PAGE_SIZE}, 1, {HEAD_DIM}], "
                         f"got {tuple(pages.shape)}")
    check_token_entries(latent, rope)
    block_ids, offsets = slot_indices(slot_mapping, block_ids, offsets, latent.shape[0],
                                      num_pages)
    entries = jnp.concatenate([latent.astype(pages.dtype), rope.astype(pages.dtype)], axis=-1)
    # A plain "set" scatter into the donated pool is in place (no copy of the pool). Note that
    # XLA:CPU has no native bf16 scatter and upcasts the pool to f32 around it; GPU and fp16 on
    # CPU scatter in place.
    pages = pages.at[block_ids, offsets, 0].set(entries, mode="drop",
                                                indices_are_sorted=False, unique_indices=False)
    return _like(cache, pages)


def read_tokens(cache, slot_mapping):
    """Gathers ``[n, 576]`` entries at ``slot_mapping`` (tests/debugging; negative slots give 0)."""
    pages = _pages_of(cache)
    slots = jnp.asarray(slot_mapping, jnp.int32).reshape(-1)
    blk = jnp.clip(slots // PAGE_SIZE, 0, pages.shape[0] - 1)
    got = pages[blk, slots % PAGE_SIZE, 0]
    return jnp.where((slots >= 0)[:, None], got, jnp.zeros((), pages.dtype))


# ------------------------------------------------------------------------------------------------
# Several layers
# ------------------------------------------------------------------------------------------------
def init_layer_caches(num_layers: int, num_pages: int, dtype=jnp.bfloat16, *,
                      sharding=None) -> tuple[PagedMLACache, ...]:
    """A tuple of per-layer pools (a pytree; donate it as one argument)."""
    return tuple(PagedMLACache.create(num_pages, dtype, sharding=sharding)
                 for _ in range(num_layers))


def write_tokens_layers(caches: Sequence, latents, ropes, slot_mapping):
    """Writes ``latents[l] [n, 512]`` / ``ropes[l] [n, 64]`` into layer ``l`` (same slots)."""
    if len(caches) != len(latents) or len(caches) != len(ropes):
        raise ValueError("need one latent and one rope array per layer")
    return type(caches)(write_tokens(c, lt, rp, slot_mapping)
                        for c, lt, rp in zip(caches, latents, ropes))


def stack_caches(caches: Sequence[PagedMLACache]) -> PagedMLACache:
    """``[L, num_pages, 64, 1, 576]`` (for ``lax.scan`` over layers; see the module note)."""
    return PagedMLACache(jnp.stack([_pages_of(c) for c in caches]))


def unstack_caches(stacked: PagedMLACache) -> tuple[PagedMLACache, ...]:
    pages = _pages_of(stacked)
    return tuple(PagedMLACache(pages[i]) for i in range(pages.shape[0]))


# ------------------------------------------------------------------------------------------------
# Host-side page allocator
# ------------------------------------------------------------------------------------------------
class OutOfPagesError(RuntimeError):
    """Raised when a request needs more pages than the pool has free."""


class PageAllocator:
    """Free-list page allocator for one page pool (one per data-parallel shard).

    All layers share the allocation: page ``p`` of a sequence holds the same tokens in every
    layer's pool. Methods that change state check first and raise without changing anything, so
    a scheduler can catch :class:`OutOfPagesError` and preempt.
    """

    def __init__(self, num_pages: int, page_size: int = PAGE_SIZE):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        # Pop from the end: hand out low page ids first (easier to read in tests).
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._pages: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    # -- queries --------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._lens

    def seqlen(self, seq_id) -> int:
        return self._lens[seq_id]

    def pages(self, seq_id) -> list[int]:
        return list(self._pages[seq_id])

    def pages_needed(self, seq_id, num_new_tokens: int) -> int:
        cur = self._lens.get(seq_id, 0)
        have = len(self._pages.get(seq_id, ()))
        return max(-(-(cur + int(num_new_tokens)) // self.page_size) - have, 0)

    def can_allocate(self, seq_id, num_new_tokens: int) -> bool:
        return self.pages_needed(seq_id, num_new_tokens) <= len(self._free)

    def slots(self, seq_id, start: int, stop: int) -> np.ndarray:
        """Slots of token positions ``[start, stop)`` of an allocated sequence."""
        pages = self._pages[seq_id]
        if not 0 <= start <= stop <= len(pages) * self.page_size:
            raise ValueError(f"positions [{start}, {stop}) not allocated for {seq_id!r}")
        pos = np.arange(start, stop, dtype=np.int64)
        ids = np.asarray(pages, np.int64)[pos // self.page_size] if len(pos) else pos
        return (ids * self.page_size + pos % self.page_size).astype(np.int32)

    # -- updates --------------------------------------------------------------------------------
    def allocate(self, seq_id, num_new_tokens: int) -> np.ndarray:
        """Appends ``num_new_tokens`` to ``seq_id`` (new or existing); returns their slots."""
        n = int(num_new_tokens)
        if n < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {n}")
        need = self.pages_needed(seq_id, n)
        if need > len(self._free):
            raise OutOfPagesError(f"{seq_id!r} needs {need} more pages, {len(self._free)} free")
        pages = self._pages.setdefault(seq_id, [])
        start = self._lens.get(seq_id, 0)
        for _ in range(need):
            pages.append(self._free.pop())
        self._lens[seq_id] = start + n
        return self.slots(seq_id, start, start + n)

    def allocate_batch(self, seq_ids: Sequence, num_new_tokens: Sequence[int]) -> list[np.ndarray]:
        """All-or-nothing :meth:`allocate` for several sequences."""
        total = sum(self.pages_needed(s, n) for s, n in zip(seq_ids, num_new_tokens))
        if total > len(self._free):
            raise OutOfPagesError(f"batch needs {total} pages, {len(self._free)} free")
        return [self.allocate(s, n) for s, n in zip(seq_ids, num_new_tokens)]

    def free(self, seq_id) -> None:
        """Returns a sequence's pages to the pool (their contents are left as they are)."""
        pages = self._pages.pop(seq_id)
        del self._lens[seq_id]
        self._free.extend(reversed(pages))

    # -- step inputs ----------------------------------------------------------------------------
    def block_table(self, seq_ids: Iterable, max_blocks: int | None = None,
                    pad: int = INVALID_PAGE) -> np.ndarray:
        """int32 ``[b, max_blocks]``; keep ``max_blocks`` fixed across steps to avoid retracing."""
        seq_ids = list(seq_ids)
        rows = [self._pages[s] for s in seq_ids]
        need = max((len(r) for r in rows), default=0)
        width = max(need, 1) if max_blocks is None else int(max_blocks)
        if need > width:
            raise ValueError(f"a sequence uses {need} pages, more than max_blocks={width}")
        table = np.full((len(rows), width), pad, np.int32)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
        return table

    def cache_seqlens(self, seq_ids: Iterable) -> np.ndarray:
        return np.asarray([self._lens[s] for s in seq_ids], np.int32).reshape(-1)

    def padded_slots(self, seq_ids: Sequence, starts: Sequence[int], width: int) -> np.ndarray:
        """int32 ``[b * width]`` slots of positions ``start .. start + width`` per sequence,
        with :data:`INVALID_PAGE` where a position is beyond the sequence's length (padding of a
        right-padded prefill batch)."""
        out = np.full((len(seq_ids), int(width)), INVALID_PAGE, np.int32)
        for i, (s, st) in enumerate(zip(seq_ids, starts)):
            stop = min(self._lens[s], st + int(width))
            out[i, :stop - st] = self.slots(s, st, stop)
        return out.reshape(-1)
