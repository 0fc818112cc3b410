"""Shared test data, float64 oracle and tolerance check for jax_flashmla tests (CPU and GPU).

Everything here is deliberately independent of ``jax_flashmla`` (no imports from the library), so
that it can judge both the pure-JAX reference (CPU) and the CUDA kernels (GPU).

* :func:`make_case` builds inputs with FlashMLA's dense-decode test recipe
  (``tests/test_flash_mla_dense_decoding.py``): variable lengths, a randomly permuted block table,
  ``randn / 10`` data, and NaN poisoning of every cache position that must never be read.
* :func:`oracle_decode` is a per-request float64 NumPy implementation of MLA decode.
* :func:`check_close` is FlashMLA's ``check_is_allclose`` comparison (inf/NaN positions, elementwise
  abs-or-rel tolerance, and a cosine-difference bound).

Tolerances used by FlashMLA's dense decode test (study doc section 6.1) are exported as
``OUT_TOL`` and ``LSE_TOL`` (``dict(abs_tol=..., rel_tol=..., cos_tol=...)``).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

HEAD_DIM_QK = 576
HEAD_DIM_V = 512
PAGE_SIZE = 64
#: FlashMLA's test fills block-table entries past a request's needed blocks with this page id.
INVALID_BLOCK_ID = 2147480000

#: FlashMLA dense-decode tolerances (tests/kernelkit/compare.py::check_is_allclose arguments).
OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536, cos_tol=1e-7)

_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def np_dtype(dtype) -> np.dtype:
    """NumPy dtype for ``"bfloat16"``/``"float16"``, a NumPy dtype, or a jnp dtype."""
    if isinstance(dtype, str):
        return _DTYPES[dtype]
    return np.dtype(dtype)


class MLACase(NamedTuple):
    """Inputs of one decode call (NumPy arrays; ``jnp.asarray`` them for device placement).

    ``q`` ``[b, s_q, h_q, 576]`` and ``k_cache`` ``[num_blocks, 64, h_kv, 576]`` in the requested
    half dtype; ``block_table`` int32 ``[b, max_blocks]``; ``cache_seqlens`` int32 ``[b]``.
    """

    q: np.ndarray
    k_cache: np.ndarray
    block_table: np.ndarray
    cache_seqlens: np.ndarray


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def make_seqlens(rng: np.random.Generator, b: int, s_q: int, s_k: int, varlen: bool,
                 zero_len_fraction: float = 0.0) -> np.ndarray:
    """FlashMLA's lengths: ``max(round(Normal(s_k, s_k / 2)), s_q)`` if varlen, else ``s_k``.

    With ``zero_len_fraction > 0``, ``max(1, round(fraction * b))`` randomly chosen requests get
    length 0 (FlashMLA's corner test uses about half); so a positive fraction always produces at
    least one zero-length request.
    """
    if varlen:
        lens = np.maximum(np.rint(rng.normal(s_k, s_k / 2, size=b)), s_q).astype(np.int64)
    else:
        lens = np.full((b,), s_k, np.int64)
    if zero_len_fraction > 0 and b > 0:
        n_zero = min(b, max(1, int(round(zero_len_fraction * b))))
        lens[rng.choice(b, size=n_zero, replace=False)] = 0
    return lens.astype(np.int32)


def make_case(b: int, s_q: int, s_k: int, h_q: int, h_kv: int, varlen: bool, dtype, seed: int,
              zero_len_fraction: float = 0.0, *, seqlens=None) -> MLACase:
    """FlashMLA-style, NaN-poisoned decode inputs.

    Recipe (FlashMLA ``tests/test_flash_mla_dense_decoding.py``):

    * lengths from :func:`make_seqlens` (or the explicit ``seqlens``, which overrides it);
    * ``max_seqlen_pad = roundup(max(lengths), 256)`` (at least 256, so that the block table is
      never empty), ``max_blocks = max_seqlen_pad / 64``;
    * ``block_table`` = a random permutation of ``arange(b * max_blocks)``, reshaped
      ``[b, max_blocks]``; the page pool has ``b * max_blocks`` pages;
    * ``q`` and ``k_cache`` = ``randn / 10`` clipped to ``[-1, 1]``, cast to ``dtype``;
    * NaN poisoning: every page no request uses is NaN, the tail of each request's last partial page
      is NaN, and block-table entries past each request's ``ceil(len / 64)`` needed blocks are set
      to :data:`INVALID_BLOCK_ID`.

    A correct decode never reads any poisoned value, so its output contains no NaN.
    """
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    if seqlens is None:
        lens = make_seqlens(rng, b, s_q, s_k, varlen, zero_len_fraction)
    else:
        lens = np.asarray(seqlens, np.int32).reshape(-1)
        assert lens.shape[0] == b, (lens.shape, b)
    max_len = int(lens.max()) if b else 0
    max_seqlen_pad = max(_roundup(max_len, 256), 256)
    max_blocks = max_seqlen_pad // PAGE_SIZE
    num_blocks = max(b * max_blocks, 1)

    block_table = rng.permutation(b * max_blocks).astype(np.int32).reshape(b, max_blocks)

    q = np.clip(rng.standard_normal((b, s_q, h_q, HEAD_DIM_QK), np.float32) / 10, -1, 1)
    k = np.clip(rng.standard_normal((num_blocks, PAGE_SIZE, h_kv, HEAD_DIM_QK), np.float32) / 10,
                -1, 1)

    used = np.zeros((num_blocks,), bool)
    for i in range(b):
        n = int(lens[i])
        needed = -(-n // PAGE_SIZE)
        used[block_table[i, :needed]] = True
        if n % PAGE_SIZE:
            k[block_table[i, needed - 1], n % PAGE_SIZE:] = np.nan
        block_table[i, needed:] = INVALID_BLOCK_ID
    k[~used] = np.nan
    return MLACase(q.astype(dt), k.astype(dt), block_table, lens)


def oracle_decode(q, k_cache, block_table, cache_seqlens, softmax_scale: float, causal: bool):
    """Float64 MLA decode, one request at a time.

    Returns ``(out float64 [b, s_q, h_q, 512], lse float64 [b, h_q, s_q])``:

    * keys of request ``i`` are positions ``j < cache_seqlens[i]``, position ``j`` living in page
      ``block_table[i, j // 64]`` at row ``j % 64``; nothing else of the cache is read (so poisoned
      pages and invalid block ids are never touched);
    * query head ``h`` uses KV head ``h // (h_q // h_kv)``; V is the first 512 channels of K;
    * causal (any ``s_q``): query token ``i`` sees keys ``j <= seqlen - s_q + i`` (bottom-right
      aligned; for ``s_q == 1`` this is every key);
    * ``lse`` = natural-log log-sum-exp of ``softmax_scale * q . k``;
    * a row with no visible key gets ``out = 0`` and ``lse = +inf``.
    """
    q = np.asarray(q).astype(np.float64)
    k_cache = np.asarray(k_cache)
    block_table = np.asarray(block_table)
    lens = np.asarray(cache_seqlens).astype(np.int64)
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    assert h_q % h_kv == 0
    ng = h_q // h_kv
    kv_head = np.arange(h_q) // ng
    out = np.zeros((b, s_q, h_q, HEAD_DIM_V), np.float64)
    lse = np.full((b, h_q, s_q), np.inf, np.float64)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        pos = np.arange(n)
        kv = k_cache[block_table[i, pos // PAGE_SIZE], pos % PAGE_SIZE].astype(np.float64)
        kv = kv[:, kv_head]                                       # [n, h_q, d]
        logits = np.einsum("shd,nhd->shn", q[i], kv) * float(softmax_scale)   # [s_q, h_q, n]
        visible = np.ones((s_q, n), bool)
        if causal:
            visible = pos[None, :] <= (n - s_q + np.arange(s_q))[:, None]
        for s in range(s_q):
            vis = visible[s]
            if not vis.any():
                continue
            lg = logits[s][:, vis]                                # [h_q, m]
            mx = lg.max(axis=-1, keepdims=True)
            p = np.exp(lg - mx)
            denom = p.sum(axis=-1, keepdims=True)
            lse[i, :, s] = (np.log(denom) + mx)[:, 0]
            v = kv[vis][..., :HEAD_DIM_V]                         # [m, h_q, 512]
            out[i, s] = np.einsum("hm,mhv->hv", p / denom, v)
    return out, lse


def cos_diff(actual, ref) -> float:
    """FlashMLA's ``1 - 2 * sum(a * r) / max(sum(a^2 + r^2), 1e-12)`` in float64."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(ref, np.float64)
    return float(1.0 - 2.0 * np.sum(a * r) / max(float(np.sum(a * a + r * r)), 1e-12))


def check_close(actual, ref, abs_tol: float, rel_tol: float, cos_tol: float,
                name: str = "tensor") -> None:
    """FlashMLA's ``check_is_allclose``; raises AssertionError with a diagnostic on failure.

    1. ``actual`` and ``ref`` must have the same shape, and NaN, +inf and -inf positions must match
       exactly; those positions are then zeroed.
    2. Every element must satisfy ``|a - r| < abs_tol`` **or** ``|a - r| / (|r| + 1e-6) < rel_tol``.
    3. ``cos_diff(a, r) < cos_tol`` (see :func:`cos_diff`).
    """
    a = np.asarray(actual).astype(np.float64)
    r = np.asarray(ref).astype(np.float64)
    assert a.shape == r.shape, f"{name}: shape {a.shape} != reference shape {r.shape}"
    for what, fn in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        ma, mr = fn(a), fn(r)
        if not np.array_equal(ma, mr):
            bad = np.argwhere(ma != mr)
            raise AssertionError(
                f"{name}: {what} positions differ at {int((ma != mr).sum())} elements, first "
                f"{tuple(bad[0])}: actual={a[tuple(bad[0])]!r} ref={r[tuple(bad[0])]!r}")
    special = ~np.isfinite(a)
    a = np.where(special, 0.0, a)
    r = np.where(special, 0.0, r)
    err = np.abs(a - r)
    ok = (err < abs_tol) | (err / (np.abs(r) + 1e-6) < rel_tol)
    if not ok.all():
        idx = tuple(np.argwhere(~ok)[0])
        raise AssertionError(
            f"{name}: {int((~ok).sum())}/{ok.size} elements outside abs_tol={abs_tol} / "
            f"rel_tol={rel_tol}; first at {idx}: actual={a[idx]!r} ref={r[idx]!r}; "
            f"max abs err {err.max():.3e}")
    cd = cos_diff(a, r)
    assert cd < cos_tol, f"{name}: cos_diff {cd:.3e} >= {cos_tol:.3e}"
