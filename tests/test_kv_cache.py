"""Paged latent cache: pytree, host allocator, write_tokens, and in-place writes under donation."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla.kv_cache import (INVALID_PAGE, OutOfPagesError, PageAllocator, PagedMLACache,
                                   init_layer_caches, read_tokens, stack_caches, unstack_caches,
                                   write_tokens, write_tokens_layers)


def _entries(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 512)).astype(np.float32),
            rng.standard_normal((n, 64)).astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Pytree
# ------------------------------------------------------------------------------------------------
def test_cache_is_a_pytree():
    c = PagedMLACache.create(3, jnp.float16)
    assert c.shape == (3, 64, 1, 576) and c.dtype == jnp.float16 and c.num_pages == 3
    leaves, treedef = jax.tree.flatten(c)
    assert len(leaves) == 1 and leaves[0] is c.pages
    assert isinstance(jax.tree.unflatten(treedef, leaves), PagedMLACache)
    out = jax.jit(lambda c: jax.tree.map(lambda p: p + 1, c))(c)
    assert isinstance(out, PagedMLACache) and float(out.pages[0, 0, 0, 0]) == 1.0

    layers = init_layer_caches(3, 2)
    assert isinstance(layers, tuple) and len(jax.tree.leaves(layers)) == 3
    stacked = stack_caches(layers)
    assert stacked.shape == (3, 2, 64, 1, 576)
    assert [u.shape for u in unstack_caches(stacked)] == [(2, 64, 1, 576)] * 3


# ------------------------------------------------------------------------------------------------
# write_tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_write_tokens_slot_mapping(dtype):
    lat, rope = _entries(5)
    slots = np.array([0, 63, 64, -1, 3 * 64 + 7], np.int32)        # -1: padding, skipped
    cache = PagedMLACache.create(4, dtype)
    out = jax.jit(write_tokens)(cache, lat, rope, slots)

    want = np.zeros((4 * 64, 576), np.float32)
    for i, s in enumerate(slots):
        if s >= 0:
            want[s] = np.concatenate([lat[i], rope[i]])
    want = np.asarray(jnp.asarray(want, dtype), np.float32)        # rounding of the cache dtype
    got = np.asarray(out.pages, np.float32).reshape(4 * 64, 576)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(out.latent(), np.float32).reshape(-1, 512),
                                  want[:, :512])
    np.testing.assert_array_equal(np.asarray(out.rope(), np.float32).reshape(-1, 64),
                                  want[:, 512:])
    np.testing.assert_array_equal(np.asarray(read_tokens(out, slots), np.float32),
                                  np.where((slots >= 0)[:, None], want[np.maximum(slots, 0)], 0))


def test_write_tokens_block_ids_offsets_and_raw_array():
    lat, rope = _entries(3, seed=1)
    blocks, offs = np.array([2, -1, 0], np.int32), np.array([5, 9, 63], np.int32)
    raw = jnp.full((3, 64, 1, 576), 7.0, jnp.bfloat16)
    out = write_tokens(raw, lat, rope, block_ids=blocks, offsets=offs)
    assert isinstance(out, jax.Array)
    ref = np.full((3, 64, 576), 7.0, np.float32)
    ref[2, 5] = np.concatenate([lat[0], rope[0]])
    ref[0, 63] = np.concatenate([lat[2], rope[2]])
    np.testing.assert_array_equal(np.asarray(out[:, :, 0], np.float32),
                                  np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float32))


def test_write_tokens_argument_errors():
    lat, rope = _entries(2)
    cache = PagedMLACache.create(1)
    with pytest.raises(ValueError, match="either"):
        write_tokens(cache, lat, rope)
    with pytest.raises(ValueError, match="both"):
        write_tokens(cache, lat, rope, block_ids=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"latent must be \[n, 512\]"):
        write_tokens(cache, lat[:, :100], rope, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="cache must be"):
        write_tokens(jnp.zeros((1, 32, 1, 576)), lat, rope, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="slots for"):
        write_tokens(cache, lat, rope, np.zeros(3, np.int32))


# ------------------------------------------------------------------------------------------------
# Donation: in place, and no copy of the pool in the compiled HLO
# ------------------------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")


def _ops_with_shape(hlo: str, shape):
    """(dtype, opcode) of every top-level (ENTRY) instruction whose result has ``shape``.

    Instructions inside fusions are skipped: what is allocated is the fusion's result.
    """
    dims = ",".join(str(d) for d in shape)
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[:entry.index("\n}")]
    out = []
    for line in entry.splitlines():
        m = _INSTR.match(line)
        if m and m.group(2) == dims:
            out.append((m.group(1), m.group(3)))
    return out


def _write_step(cache, lat, rope, slots):
    return write_tokens(cache, lat, rope, slots)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_donated_write_is_in_place(dtype):
    cache = PagedMLACache.create(64, dtype)
    lat, rope = _entries(4)
    slots = jnp.asarray([1, 700, -1, 4095], jnp.int32)
    step = jax.jit(_write_step, donate_argnums=(0,))
    compiled = step.lower(cache, lat, rope, slots).compile()
    hlo = compiled.as_text()
    assert "input_output_alias" in hlo
    ops = _ops_with_shape(hlo, cache.shape)
    # Never an explicit copy of the pool.
    assert not [o for o in ops if o[1] == "copy"], ops
    if dtype == jnp.float16:
        # The whole step is: parameter -> one scatter fusion, no pool-sized temporary.
        assert sorted(o[1] for o in ops) == ["fusion", "parameter"], ops
        assert compiled.memory_analysis().temp_size_in_bytes < cache.pages.nbytes // 16
    # (bf16 on XLA:CPU: no native bf16 scatter, so XLA upcasts the pool to f32 around the
    # scatter; that is a CPU-only artifact: the output still aliases the donated input.)

    before = cache.pages.unsafe_buffer_pointer()
    out = step(cache, lat, rope, slots)
    assert out.pages.unsafe_buffer_pointer() == before
    assert cache.pages.is_deleted()
    np.testing.assert_array_equal(np.asarray(read_tokens(out, slots[:2]), np.float32)[:, :512],
                                  np.asarray(jnp.asarray(lat[:2], dtype), np.float32))


def test_without_donation_the_pool_is_copied():
    """Shows the HLO check above can see a copy: without donation XLA copies the pool."""
    cache = PagedMLACache.create(64, jnp.float16)
    lat, rope = _entries(2)
    hlo = jax.jit(_write_step).lower(cache, lat, rope, jnp.asarray([0, 1], jnp.int32)) \
        .compile().as_text()
    assert ("f16", "copy") in _ops_with_shape(hlo, cache.shape)


def test_donated_decode_step_over_layers_is_in_place():
    """A server-like step: write the new token into every layer, then decode it."""
    n_layers, b, h = 2, 2, 4
    caches = init_layer_caches(n_layers, 8, jnp.bfloat16)
    alloc = PageAllocator(8)
    for s, n in enumerate((30, 80)):
        alloc.allocate(s, n)
    slots = np.concatenate(alloc.allocate_batch([0, 1], [1, 1]))
    bt = jnp.asarray(alloc.block_table([0, 1], 4))
    sl = jnp.asarray(alloc.cache_seqlens([0, 1]))
    rng = np.random.default_rng(0)
    lat = jnp.asarray(rng.standard_normal((n_layers, b, 512)), jnp.float32)
    rope = jnp.asarray(rng.standard_normal((n_layers, b, 64)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, 1, h, 576)), jnp.bfloat16)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(caches, q, lat, rope, slots, bt, sl):
        md, ns = fm.get_mla_metadata(sl, h, 1)            # once per step, shared by all layers
        caches = write_tokens_layers(caches, lat, rope, slots)
        outs = [fm.flash_mla_with_kvcache(q, c.pages, bt, sl, 512, md, ns,
                                          softmax_scale=192 ** -0.5)[0] for c in caches]
        return caches, jnp.stack(outs)

    args = (caches, q, lat, rope, jnp.asarray(slots), bt, sl)
    hlo = step.lower(*args).compile().as_text()
    assert not [o for o in _ops_with_shape(hlo, caches[0].shape) if o[1] == "copy"]
    before = [c.pages.unsafe_buffer_pointer() for c in caches]
    new, _ = step(*args)
    assert [c.pages.unsafe_buffer_pointer() for c in new] == before
    for layer in range(n_layers):
        got = np.asarray(read_tokens(new[layer], slots), np.float32)[:, :512]
        np.testing.assert_array_equal(got, np.asarray(lat[layer].astype(jnp.bfloat16),
                                                      np.float32))


# ------------------------------------------------------------------------------------------------
# Host allocator
# ------------------------------------------------------------------------------------------------
def test_allocator_allocate_extend_free():
    a = PageAllocator(6)
    s0 = a.allocate("a", 70)                     # 2 pages
    np.testing.assert_array_equal(s0, np.concatenate([np.arange(64), 64 + np.arange(6)]))
    s1 = a.allocate("b", 1)
    assert a.pages("b") == [2] and s1.tolist() == [128]
    s2 = a.allocate("a", 60)                     # 70 + 60 = 130 -> a third page
    assert a.pages("a") == [0, 1, 3] and a.seqlen("a") == 130
    np.testing.assert_array_equal(s2[:58], 64 + np.arange(6, 64))
    np.testing.assert_array_equal(s2[58:], 3 * 64 + np.arange(2))
    assert a.num_free_pages == 2

    bt = a.block_table(["b", "a"], max_blocks=4)
    np.testing.assert_array_equal(bt, [[2, INVALID_PAGE, INVALID_PAGE, INVALID_PAGE],
                                       [0, 1, 3, INVALID_PAGE]])
    assert bt.dtype == np.int32
    np.testing.assert_array_equal(a.cache_seqlens(["b", "a"]), [1, 130])
    assert a.cache_seqlens(["a"]).dtype == np.int32
    with pytest.raises(ValueError, match="max_blocks"):
        a.block_table(["a"], max_blocks=2)

    a.free("a")
    assert a.num_free_pages == 5 and "a" not in a
    a.allocate("c", 64 * 5)
    assert sorted(a.pages("c")) == [0, 1, 3, 4, 5]


def test_allocator_out_of_pages_changes_nothing():
    a = PageAllocator(3)
    a.allocate("x", 100)
    with pytest.raises(OutOfPagesError):
        a.allocate("y", 129)
    assert "y" not in a and a.num_free_pages == 1
    with pytest.raises(OutOfPagesError):
        a.allocate_batch(["x", "z"], [29, 64])       # x and z each need a page; 1 is free
    assert a.seqlen("x") == 100 and "z" not in a and a.num_free_pages == 1
    assert a.can_allocate("x", 28 + 64) and not a.can_allocate("x", 28 + 65)


def test_allocator_padded_slots_for_prefill():
    a = PageAllocator(4)
    a.allocate(0, 3)
    a.allocate(1, 66)
    slots = a.padded_slots([0, 1], [0, 0], 66).reshape(2, 66)
    np.testing.assert_array_equal(slots[0, :3], [0, 1, 2])
    assert (slots[0, 3:] == INVALID_PAGE).all()
    np.testing.assert_array_equal(slots[1], np.concatenate([64 + np.arange(64),
                                                            128 + np.arange(2)]))
