"""flash_mla_with_kvcache on CPU (pure-JAX reference) against the float64 NumPy oracle.

Data and tolerances follow FlashMLA's dense decode test (study doc 6.1): NaN-poisoned pages, a
permuted block table with invalid ids past each request's end, zero-length requests, and
out: abs 8e-4 / rel 2.01/128 / cos 5e-6, lse: abs 1e-6 / rel 8.01/65536 / cos 1e-7.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from mla_testdata import (INVALID_BLOCK_ID, LSE_TOL, OUT_TOL, check_close, make_case, np_dtype,
                          oracle_decode)

DEFAULT_SCALE = 576 ** -0.5


def _decode(case, causal, softmax_scale=None, **kw):
    q, k, bt, sl = (jnp.asarray(x) for x in case)
    return jax_flashmla.flash_mla_with_kvcache(q, k, bt, sl, 512, softmax_scale=softmax_scale,
                                               causal=causal, **kw)


def _check_against_oracle(case, causal, out, lse, scale):
    q, k, bt, sl = case
    b, s_q, h_q, _ = q.shape
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == q.dtype, (out.shape, out.dtype)
    assert lse.shape == (b, h_q, s_q) and lse.dtype == jnp.float32, (lse.shape, lse.dtype)
    out = np.asarray(out).astype(np.float64)
    lse = np.asarray(lse).astype(np.float64)
    assert not np.isnan(out).any(), "NaN in out (poisoned cache leaked)"
    assert not np.isnan(lse).any(), "NaN in lse (poisoned cache leaked)"
    assert np.isfinite(out).all()
    ref_out, ref_lse = oracle_decode(q, k, bt, sl, scale, causal)
    check_close(out, ref_out, name="out", **OUT_TOL)
    check_close(lse, ref_lse, name="lse", **LSE_TOL)
    zero = np.asarray(sl) == 0
    if zero.any():
        assert (out[zero] == 0).all(), "zero-length request: out must be exactly 0"
        assert np.isposinf(lse[zero]).all(), "zero-length request: lse must be +inf"
    # Rows with something to attend to have finite lse.
    assert np.isfinite(lse[~np.isposinf(ref_lse)]).all()


# (b, s_q, s_k, h_q, h_kv, varlen, causal, dtype, zero_len_fraction): a covering subset of
# FlashMLA's grid, small enough for CPU.
CASES = [
    (1, 1, 20, 1, 1, False, False, "bfloat16", 0.0),
    (2, 1, 140, 16, 1, True, False, "bfloat16", 0.0),
    (5, 2, 300, 128, 1, True, True, "bfloat16", 0.0),
    (2, 4, 140, 64, 2, True, True, "float16", 0.0),
    (5, 3, 20, 3, 1, True, True, "bfloat16", 0.4),
    (2, 2, 300, 128, 2, False, False, "float16", 0.0),
    (1, 4, 300, 16, 2, False, True, "bfloat16", 0.0),
    (5, 1, 140, 64, 1, True, True, "float16", 0.5),
    (5, 4, 300, 3, 1, True, False, "bfloat16", 0.5),
    (2, 3, 20, 128, 1, True, True, "float16", 0.0),
    (1, 2, 140, 1, 1, True, True, "bfloat16", 0.0),
    (5, 2, 140, 16, 2, True, False, "bfloat16", 0.2),
    (2, 1, 300, 128, 1, True, False, "float16", 0.5),
    (5, 4, 20, 64, 1, False, True, "float16", 0.0),
    (5, 3, 300, 64, 2, True, True, "float16", 0.2),
    (1, 1, 300, 3, 1, True, False, "float16", 0.0),
]


def _id(c):
    b, s_q, s_k, h_q, h_kv, varlen, causal, dtype, zf = c
    return (f"b{b}-sq{s_q}-sk{s_k}-hq{h_q}-hkv{h_kv}-{'var' if varlen else 'fix'}-"
            f"{'causal' if causal else 'full'}-{dtype}-z{zf}")


@pytest.mark.parametrize("params", CASES, ids=[_id(c) for c in CASES])
def test_decode_matches_oracle(params):
    b, s_q, s_k, h_q, h_kv, varlen, causal, dtype, zf = params
    seed = zlib.crc32(_id(params).encode())
    case = make_case(b, s_q, s_k, h_q, h_kv, varlen, dtype, seed=seed, zero_len_fraction=zf)
    out, lse = _decode(case, causal)
    _check_against_oracle(case, causal, out, lse, DEFAULT_SCALE)


def test_jit_matches_eager():
    case = make_case(3, 2, 140, 16, 1, True, "bfloat16", seed=101, zero_len_fraction=0.3)
    eager = _decode(case, True)
    f = jax.jit(lambda q, k, bt, sl: jax_flashmla.flash_mla_with_kvcache(q, k, bt, sl, 512,
                                                                         causal=True))
    jitted = f(*(jnp.asarray(x) for x in case))
    np.testing.assert_array_equal(np.asarray(jitted[0]), np.asarray(eager[0]))
    np.testing.assert_array_equal(np.asarray(jitted[1]), np.asarray(eager[1]))
    _check_against_oracle(case, True, *jitted, DEFAULT_SCALE)


def test_causal_rows_with_nothing_to_attend():
    """seqlen < s_q under causal: the first s_q - seqlen query tokens see no key."""
    s_q = 4
    lens = np.array([1, 2, 3, 0, 70], np.int32)
    case = make_case(5, s_q, 0, 16, 1, False, "bfloat16", seed=5, seqlens=lens)
    out, lse = _decode(case, True)
    _check_against_oracle(case, True, out, lse, DEFAULT_SCALE)
    out, lse = np.asarray(out).astype(np.float32), np.asarray(lse)
    for i, n in enumerate(lens):
        for s in range(s_q):
            empty = n - s_q + s < 0
            assert np.isposinf(lse[i, :, s]).all() == empty, (i, s)
            assert (out[i, s] == 0).all() == empty, (i, s)
    # Non-causal: every request with n > 0 sees all its keys.
    out_full, lse_full = _decode(case, False)
    _check_against_oracle(case, False, out_full, lse_full, DEFAULT_SCALE)
    assert np.isfinite(np.asarray(lse_full)[lens > 0]).all()


def test_causal_differs_from_full_for_mtp():
    """Sensitivity: the causal mask must change the result for s_q > 1 (and not for s_q == 1)."""
    case = make_case(2, 3, 140, 16, 1, True, "bfloat16", seed=17)
    q, k, bt, sl = case
    out_c, lse_c = _decode(case, True)
    ref_full_out, ref_full_lse = oracle_decode(q, k, bt, sl, DEFAULT_SCALE, False)
    with pytest.raises(AssertionError):
        check_close(np.asarray(lse_c), ref_full_lse, **LSE_TOL)
    case1 = make_case(2, 1, 140, 16, 1, True, "bfloat16", seed=18)
    out1c, lse1c = _decode(case1, True)
    out1, lse1 = _decode(case1, False)
    np.testing.assert_array_equal(np.asarray(out1c), np.asarray(out1))
    np.testing.assert_array_equal(np.asarray(lse1c), np.asarray(lse1))


def test_all_requests_zero_length():
    case = make_case(3, 2, 140, 16, 1, True, "float16", seed=23, zero_len_fraction=1.0)
    assert (case.cache_seqlens == 0).all()
    out, lse = _decode(case, True)
    assert (np.asarray(out) == 0).all()
    assert np.isposinf(np.asarray(lse)).all()


@pytest.mark.parametrize("garbage", ["negative", "random"])
def test_other_invalid_block_ids_past_the_end(garbage):
    """Entries past a request's needed blocks are ignored whatever they hold."""
    case = make_case(4, 2, 140, 16, 2, True, "bfloat16", seed=29, zero_len_fraction=0.25)
    bt = case.block_table.copy()
    past = bt == INVALID_BLOCK_ID
    assert past.any()
    rng = np.random.default_rng(31)
    if garbage == "negative":
        bt[past] = -1
    else:
        bt[past] = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, past.sum())
    case = case._replace(block_table=bt)
    out, lse = _decode(case, True)
    _check_against_oracle(case, True, out, lse, DEFAULT_SCALE)


def _amplified_case(seed, dtype="bfloat16"):
    """Queries scaled by 8 (exact in half precision) so that the softmax scale visibly matters."""
    case = make_case(3, 2, 140, 16, 1, True, dtype, seed=seed, zero_len_fraction=0.3)
    q = (case.q.astype(np.float32) * 8).astype(np_dtype(dtype))
    return case._replace(q=q)


def test_default_softmax_scale_is_576_rsqrt():
    case = _amplified_case(41)
    out_d, lse_d = _decode(case, True)
    out_e, lse_e = _decode(case, True, softmax_scale=576 ** -0.5)
    np.testing.assert_array_equal(np.asarray(out_d), np.asarray(out_e))
    np.testing.assert_array_equal(np.asarray(lse_d), np.asarray(lse_e))
    _check_against_oracle(case, True, out_d, lse_d, 576 ** -0.5)
    # Sensitivity: DeepSeek's 192 ** -0.5 must not pass against the default-scale result.
    q, k, bt, sl = case
    _, ref_lse = oracle_decode(q, k, bt, sl, 192 ** -0.5, True)
    with pytest.raises(AssertionError):
        check_close(np.asarray(lse_d), ref_lse, **LSE_TOL)


@pytest.mark.parametrize("mscale", [1.0, jax_flashmla.yarn_mscale(40.0, 1.0)])
def test_explicit_deepseek_softmax_scale(mscale):
    scale = jax_flashmla.deepseek_softmax_scale(128, 64, mscale)
    assert scale == pytest.approx(192 ** -0.5 * mscale ** 2, rel=1e-12)
    case = _amplified_case(43, "float16")
    out, lse = _decode(case, True, softmax_scale=scale)
    _check_against_oracle(case, True, out, lse, scale)
    q, k, bt, sl = case
    ref_out, _ = oracle_decode(q, k, bt, sl, DEFAULT_SCALE, True)
    with pytest.raises(AssertionError):
        check_close(np.asarray(out).astype(np.float64), ref_out, **OUT_TOL)


def test_yarn_mscale_values():
    assert jax_flashmla.yarn_mscale(1.0) == 1.0
    assert jax_flashmla.yarn_mscale(0.5) == 1.0
    assert jax_flashmla.yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * np.log(40.0) + 1.0)
    assert jax_flashmla.yarn_mscale(40.0, 0.707) == pytest.approx(0.0707 * np.log(40.0) + 1.0)


# ------------------------------------------------------------------------------------------------
# The test-data helpers themselves (they must be able to catch bugs)
# ------------------------------------------------------------------------------------------------
def test_make_case_follows_flashmla_recipe():
    b, s_q, s_k = 6, 2, 300
    case = make_case(b, s_q, s_k, 16, 2, True, "bfloat16", seed=3, zero_len_fraction=0.3)
    q, k, bt, sl = case
    assert q.shape == (b, s_q, 16, 576) and q.dtype == np_dtype("bfloat16")
    assert k.dtype == q.dtype and k.shape[1:] == (64, 2, 576)
    assert bt.dtype == np.int32 and sl.dtype == np.int32 and sl.shape == (b,)
    assert (sl == 0).sum() == 2
    assert (sl[sl > 0] >= s_q).all()
    pad = -(-int(sl.max()) // 256) * 256
    assert bt.shape == (b, pad // 64) and k.shape[0] == b * pad // 64
    qf = q.astype(np.float32)
    assert 0.05 < qf.std() < 0.15 and np.abs(qf).max() <= 1
    used = set()
    for i, n in enumerate(sl):
        need = -(-int(n) // 64)
        assert (bt[i, need:] == INVALID_BLOCK_ID).all()
        pages = bt[i, :need]
        assert ((pages >= 0) & (pages < k.shape[0])).all()
        used.update(pages.tolist())
        kf = k[pages].astype(np.float32).reshape(-1, 2, 576)
        assert not np.isnan(kf[:n]).any()
        assert np.isnan(kf[n:]).all()       # tail of the last partial page
    assert len(used) == sum(-(-int(n) // 64) for n in sl)   # pages are distinct
    unused = np.setdiff1d(np.arange(k.shape[0]), sorted(used))
    assert len(unused) > 0 and np.isnan(k[unused].astype(np.float32)).all()


def test_oracle_matches_dense_softmax_attention():
    """The oracle against a direct dense formulation on a contiguous (identity) cache layout."""
    rng = np.random.default_rng(0)
    b, s_q, h_q, h_kv, n = 2, 3, 4, 2, 70
    q = rng.standard_normal((b, s_q, h_q, 576)) / 10
    kc = rng.standard_normal((b * 2, 64, h_kv, 576)) / 10
    bt = np.arange(b * 2, dtype=np.int32).reshape(b, 2)
    sl = np.array([n, 0], np.int32)
    out, lse = oracle_decode(q, kc, bt, sl, 0.3, True)
    k0 = kc[:2].reshape(128, h_kv, 576)[:n]
    for h in range(h_q):
        kh = k0[:, h // 2]
        logits = q[0, :, h] @ kh.T * 0.3                      # [s_q, n]
        mask = np.arange(n)[None] <= (n - s_q + np.arange(s_q))[:, None]
        logits = np.where(mask, logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(lse[0, h], np.log(np.exp(logits).sum(-1)), rtol=1e-12)
        np.testing.assert_allclose(out[0, :, h], (w / w.sum(-1, keepdims=True)) @ kh[:, :512],
                                   rtol=1e-10, atol=1e-12)
    assert (out[1] == 0).all() and np.isposinf(lse[1]).all()


def test_check_close_semantics():
    r = np.array([1.0, -2.0, np.inf, 0.0])
    check_close(r.copy(), r, 1e-6, 1e-6, 1e-7)
    with pytest.raises(AssertionError, match=r"\+inf"):
        check_close(np.array([1.0, -2.0, 5.0, 0.0]), r, 1, 1, 1)
    with pytest.raises(AssertionError, match="NaN"):
        check_close(np.array([1.0, np.nan, np.inf, 0.0]), r, 1, 1, 1)
    # abs OR rel: 1.01 vs 1 passes on rel 2%, fails on abs 1e-3 + rel 0.5%.
    check_close(np.array([1.01, -2.0, np.inf, 0.0]), r, 1e-3, 0.02, 1)
    with pytest.raises(AssertionError, match="outside"):
        check_close(np.array([1.01, -2.0, np.inf, 0.0]), r, 1e-3, 0.005, 1)
    with pytest.raises(AssertionError, match="cos_diff"):
        check_close(np.array([1.01, -2.0, np.inf, 0.0]), r, 1, 1, 1e-7)
