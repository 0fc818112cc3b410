"""Device-side test data and checks for the GPU tests (FlashMLA's recipe, at FlashMLA's sizes).

FlashMLA's dense grid has thousands of (b, s_k, varlen) cases per head configuration. Requests are
independent, so we *merge* all (b, s_k, varlen) sub-cases of one (dtype, s_q, h_q, h_kv, causal)
configuration into one batch over one page pool: one compile and one kernel call per
configuration. Data are generated on the device (pools reach several GB) with the recipe of
``mla_testdata.make_case``: lengths from ``make_seqlens``, a random page permutation per sub-case,
``randn / 10`` clipped, NaN in every page no request uses and in the tail of each last page,
block-table entries past the needed blocks set to ``INVALID_BLOCK_ID``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as fm
from jax_flashmla.bench import randn_over_10
from mla_testdata import HEAD_DIM_QK, INVALID_BLOCK_ID, PAGE_SIZE, make_seqlens

#: FlashMLA's head pairs: h_q in {1,3,9,63,64,126,128} x h_kv in {1,2,3,8}, h_q % h_kv == 0.
HEAD_PAIRS = [(h_q, h_kv) for h_q in (1, 3, 9, 63, 64, 126, 128) for h_kv in (1, 2, 3, 8)
              if h_q % h_kv == 0]
DENSE_SUBCASES = [(b, s_k, varlen, 0.0) for b in (1, 2, 6, 64) for s_k in (20, 140, 4096)
                  for varlen in (False, True)]
CORNER_SUBCASES = [(128, 4096, True, 0.5)]


def _roundup(x, m):
    return -(-x // m) * m


def build_tables(rng, subcases, s_q):
    """Host side: seqlens, block table and the per-token validity of a merged page pool."""
    lens, tables, pages = [], [], 0
    for b, s_k, varlen, zero_frac in subcases:
        sl = make_seqlens(rng, b, s_q, s_k, varlen, zero_frac)
        width = max(_roundup(int(sl.max()), 256), 256) // PAGE_SIZE
        tables.append(rng.permutation(b * width).astype(np.int64).reshape(b, width) + pages)
        lens.append(sl)
        pages += b * width
    seqlens = np.concatenate(lens).astype(np.int32)
    width = max(t.shape[1] for t in tables)
    table = np.full((seqlens.shape[0], width), INVALID_BLOCK_ID, np.int64)
    row = 0
    for t in tables:
        table[row:row + t.shape[0], :t.shape[1]] = t
        row += t.shape[0]
    # Pool rounded up to whole generation chunks; the extra pages are unused (NaN) pages.
    valid = np.zeros((_roundup(pages, _POOL_CHUNK), PAGE_SIZE), bool)
    for i, n in enumerate(seqlens):
        needed = -(-int(n) // PAGE_SIZE)
        ids = table[i, :needed]
        counts = np.clip(int(n) - PAGE_SIZE * np.arange(needed), 0, PAGE_SIZE)
        valid[ids] = np.arange(PAGE_SIZE)[None, :] < counts[:, None]
        table[i, needed:] = INVALID_BLOCK_ID
    return seqlens, table.astype(np.int32), valid


_POOL_CHUNK = 256  # pages generated per step: keeps the random-bits intermediate small


@functools.partial(jax.jit, static_argnames=("h_kv", "dtype"))
def _poisoned_pool(key, valid, h_kv, dtype):
    """randn/10 clipped pages in chunks (a single draw of a multi-GB pool needs 2x that in bits)."""
    chunks = valid.shape[0] // _POOL_CHUNK
    shape = (_POOL_CHUNK, PAGE_SIZE, h_kv, HEAD_DIM_QK)

    def chunk(args):
        i, ok = args
        x = randn_over_10(jax.random.fold_in(key, i), shape, jnp.float32)
        return jnp.where(ok[:, :, None, None], x, jnp.nan).astype(dtype)

    pool = jax.lax.map(chunk, (jnp.arange(chunks), valid.reshape(chunks, _POOL_CHUNK, PAGE_SIZE)))
    return pool.reshape(chunks * _POOL_CHUNK, PAGE_SIZE, h_kv, HEAD_DIM_QK)


def make_merged(seed, subcases, s_q, h_q, h_kv, dtype):
    """Device arrays (q, k_cache, block_table, cache_seqlens) for merged sub-cases."""
    rng = np.random.default_rng(seed)
    seqlens, table, valid = build_tables(rng, subcases, s_q)
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = randn_over_10(kq, (seqlens.shape[0], s_q, h_q, HEAD_DIM_QK), jnp.dtype(dtype))
    pool = _poisoned_pool(kk, jnp.asarray(valid), h_kv, jnp.dtype(dtype))
    return q, pool, jnp.asarray(table), jnp.asarray(seqlens)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal"))
def reference_per_request(q, k_cache, block_table, cache_seqlens, softmax_scale, causal):
    """The float32 reference, one request at a time (bounds memory on large pools)."""
    def one(args):
        qi, bti, sli = args
        out, lse = fm.mla_decode_reference(qi[None], k_cache, bti[None], sli[None], 512,
                                           softmax_scale, causal)
        return out[0].astype(jnp.float32), lse[0]
    return jax.lax.map(one, (q, block_table, cache_seqlens))


@jax.jit
def _compare(actual, ref, abs_tol, rel_tol):
    """FlashMLA's check_is_allclose statistics, computed on the device."""
    a = actual.astype(jnp.float32)
    r = ref.astype(jnp.float32)
    special_mismatch = (jnp.sum(jnp.isnan(a) != jnp.isnan(r))
                        + jnp.sum(jnp.isposinf(a) != jnp.isposinf(r))
                        + jnp.sum(jnp.isneginf(a) != jnp.isneginf(r)))
    special = ~jnp.isfinite(a)
    a = jnp.where(special, 0.0, a)
    r = jnp.where(special, 0.0, r)
    err = jnp.abs(a - r)
    bad = ~((err < abs_tol) | (err / (jnp.abs(r) + 1e-6) < rel_tol))
    # 1 - 2 sum(a r) / sum(a^2 + r^2), written as sum((a - r)^2) / sum(a^2 + r^2): the same
    # value without float32 cancellation.
    cos = jnp.sum((a - r) ** 2) / jnp.maximum(jnp.sum(a * a + r * r), 1e-12)
    return special_mismatch, jnp.sum(bad), jnp.max(err), cos


def assert_close_device(actual, ref, abs_tol, rel_tol, cos_tol, name):
    mism, nbad, maxerr, cos = (float(v) for v in _compare(actual, ref, abs_tol, rel_tol))
    assert mism == 0, f"{name}: NaN/inf positions differ at {int(mism)} elements"
    assert nbad == 0, (f"{name}: {int(nbad)}/{actual.size} elements outside abs {abs_tol} / "
                       f"rel {rel_tol} (max abs err {maxerr:.3e})")
    assert cos < cos_tol, f"{name}: cos_diff {cos:.3e} >= {cos_tol:.1e}"
    return maxerr, cos
