"""Public API: abstract shapes, trace-time validation, jit/vmap/scan composition, b == 0, grad."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla import flash_mla_with_kvcache, get_mla_metadata
from mla_testdata import (INVALID_BLOCK_ID, LSE_TOL, OUT_TOL, check_close, make_case,
                          oracle_decode)

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
SCALE = 576 ** -0.5


def _abstract(b=2, s_q=1, h_q=16, h_kv=1, num_blocks=8, max_blocks=4, dtype=BF16):
    return dict(q=S((b, s_q, h_q, 576), dtype), k_cache=S((num_blocks, 64, h_kv, 576), dtype),
                block_table=S((b, max_blocks), jnp.int32), cache_seqlens=S((b,), jnp.int32))


def _eval_decode(q, k_cache, block_table, cache_seqlens, head_dim_v=512, md=None, ns=None,
                 **kw):
    def f(q, k, bt, sl, md, ns):
        return flash_mla_with_kvcache(q, k, bt, sl, head_dim_v, md, ns, **kw)
    return jax.eval_shape(f, q, k_cache, block_table, cache_seqlens, md, ns)


# ------------------------------------------------------------------------------------------------
# Abstract evaluation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,s_q,h_q,h_kv,dtype,num_sms,parts", [
    (2, 1, 128, 1, BF16, None, 66),
    (3, 2, 128, 1, jnp.float16, None, 33),
    (1, 4, 64, 2, BF16, 114, 28),
    (5, 3, 3, 1, jnp.float16, 78, 78),
    (4, 1, 16, 2, BF16, 132, 66),
])
def test_eval_shape(b, s_q, h_q, h_kv, dtype, num_sms, parts):
    a = _abstract(b, s_q, h_q, h_kv, dtype=dtype)
    rows = s_q * h_q // h_kv
    md, ns = jax.eval_shape(lambda sl: get_mla_metadata(sl, rows, h_kv, num_sms=num_sms),
                            a["cache_seqlens"])
    assert (md.shape, md.dtype) == ((parts, 8), jnp.int32)
    assert (ns.shape, ns.dtype) == ((b + 1,), jnp.int32)
    out, lse = _eval_decode(**a, md=md, ns=ns, num_sms=num_sms)
    assert (out.shape, out.dtype) == ((b, s_q, h_q, 512), jnp.dtype(dtype))
    assert (lse.shape, lse.dtype) == ((b, h_q, s_q), jnp.float32)
    out2, lse2 = _eval_decode(**a, num_sms=num_sms)  # metadata computed inside
    assert (out2.shape, out2.dtype, lse2.shape, lse2.dtype) == (out.shape, out.dtype, lse.shape,
                                                                lse.dtype)


# ------------------------------------------------------------------------------------------------
# Trace-time validation: every error names the offending argument
# ------------------------------------------------------------------------------------------------
def _metadata_for(b, rows, h_kv, num_sms=None):
    return jax.eval_shape(lambda sl: get_mla_metadata(sl, rows, h_kv, num_sms=num_sms),
                          S((b,), jnp.int32))


def _bad(**changes):
    a = _abstract()
    a.update(changes)
    return a


BAD_CALLS = [
    # (id, args (abstract), extra kwargs, exception, message regex)
    ("q_float32", _bad(q=S((2, 1, 16, 576), jnp.float32)), {}, TypeError, r"^q must"),
    ("q_int", _bad(q=S((2, 1, 16, 576), jnp.int32)), {}, TypeError, r"^q must"),
    ("k_dtype_mismatch", _bad(k_cache=S((8, 64, 1, 576), jnp.float16)), {}, TypeError,
     r"^k_cache must"),
    ("q_rank", _bad(q=S((2, 16, 576), BF16)), {}, ValueError, r"^q must have rank 4"),
    ("k_rank", _bad(k_cache=S((8, 64, 576), BF16)), {}, ValueError, r"^k_cache must have rank 4"),
    ("d_512", _bad(q=S((2, 1, 16, 512), BF16), k_cache=S((8, 64, 1, 512), BF16)), {}, ValueError,
     r"q head dim \(q\.shape\[3\]\)"),
    ("k_d_512", _bad(k_cache=S((8, 64, 1, 512), BF16)), {}, ValueError,
     r"k_cache head dim \(k_cache\.shape\[3\]\)"),
    ("page_32", _bad(k_cache=S((8, 32, 1, 576), BF16)), {}, ValueError,
     r"k_cache page size \(k_cache\.shape\[1\]\)"),
    ("head_dim_v_256", _abstract(), dict(head_dim_v=256), ValueError, r"head_dim_v"),
    ("hq_not_multiple_of_hkv", _bad(q=S((2, 1, 3, 576), BF16), k_cache=S((8, 64, 2, 576), BF16)),
     {}, ValueError, r"h_q \(q\.shape\[2\] = 3\).*h_kv \(k_cache\.shape\[2\] = 2\)"),
    ("block_table_float", _bad(block_table=S((2, 4), jnp.float32)), {}, TypeError,
     r"^block_table must be int32"),
    ("block_table_rank", _bad(block_table=S((2, 4, 1), jnp.int32)), {}, ValueError,
     r"^block_table must have rank 2"),
    ("block_table_batch", _bad(block_table=S((3, 4), jnp.int32)), {}, ValueError,
     r"^block_table batch"),
    ("seqlens_rank", _bad(cache_seqlens=S((2, 1), jnp.int32)), {}, ValueError,
     r"^cache_seqlens must have rank 1"),
    ("seqlens_dtype", _bad(cache_seqlens=S((2,), jnp.float32)), {}, TypeError,
     r"^cache_seqlens must be int32"),
    ("seqlens_batch", _bad(cache_seqlens=S((3,), jnp.int32)), {}, ValueError,
     r"cache_seqlens batch"),
    ("softmax_scale_zero", _abstract(), dict(softmax_scale=0.0), ValueError, r"softmax_scale"),
    ("softmax_scale_negative", _abstract(), dict(softmax_scale=-0.1), ValueError,
     r"softmax_scale"),
    ("softmax_scale_nan", _abstract(), dict(softmax_scale=float("nan")), ValueError,
     r"softmax_scale"),
]


@pytest.mark.parametrize("args,kw,exc,msg", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_trace_time_errors(args, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        _eval_decode(**args, **kw)


def test_metadata_wrong_shape():
    a = _abstract()
    md, ns = _metadata_for(2, 16, 1)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata"):
        _eval_decode(**a, md=S((md.shape[0], 7), jnp.int32), ns=ns)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata"):
        _eval_decode(**a, md=S((md.shape[0] * 8,), jnp.int32), ns=ns)
    with pytest.raises(TypeError, match=r"tile_scheduler_metadata"):
        _eval_decode(**a, md=S(md.shape, jnp.float32), ns=ns)


def test_metadata_for_another_call_is_rejected():
    """Metadata computed for s_q=1, h_q=128 (66 parts) used for s_q=2, h_q=128 (needs 33)."""
    a = _abstract(b=2, s_q=2, h_q=128)
    md, ns = _metadata_for(2, 128, 1)
    assert md.shape[0] == 66
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata has 66 parts.*needs 33"):
        _eval_decode(**a, md=md, ns=ns)
    # Different num_sms than the call's.
    md, ns = _metadata_for(2, 256, 1, num_sms=114)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata"):
        _eval_decode(**a, md=md, ns=ns)
    _eval_decode(**a, md=md, ns=ns, num_sms=114)  # consistent: fine


def test_num_splits_wrong_length():
    a = _abstract(b=2)
    md, _ = _metadata_for(2, 16, 1)
    for bad in (S((2,), jnp.int32), S((4,), jnp.int32)):
        with pytest.raises(ValueError, match=r"num_splits"):
            _eval_decode(**a, md=md, ns=bad)
    with pytest.raises(TypeError, match=r"num_splits"):
        _eval_decode(**a, md=md, ns=S((3,), jnp.float32))


def test_only_one_of_metadata_and_num_splits():
    a = _abstract()
    md, ns = _metadata_for(2, 16, 1)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata and num_splits"):
        _eval_decode(**a, md=md)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata and num_splits"):
        _eval_decode(**a, ns=ns)


def test_int64_indices_rejected():
    # With 64-bit types enabled in JAX.
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match=r"^block_table must be int32, got int64"):
            _eval_decode(**_bad(block_table=S((2, 4), jnp.int64)))
        with pytest.raises(TypeError, match=r"^cache_seqlens must be int32, got int64"):
            _eval_decode(**_bad(cache_seqlens=S((2,), jnp.int64)))
    # NumPy int64 arrays passed directly (eager call).
    case = make_case(2, 1, 20, 16, 1, False, "bfloat16", seed=1)
    q, k = jnp.asarray(case.q), jnp.asarray(case.k_cache)
    with pytest.raises(TypeError, match=r"^block_table must be int32"):
        flash_mla_with_kvcache(q, k, case.block_table.astype(np.int64),
                               jnp.asarray(case.cache_seqlens), 512)
    with pytest.raises(TypeError, match=r"^cache_seqlens must be int32"):
        flash_mla_with_kvcache(q, k, jnp.asarray(case.block_table),
                               case.cache_seqlens.astype(np.int64), 512)
    with pytest.raises(TypeError, match=r"^cache_seqlens must be int32"):
        get_mla_metadata(case.cache_seqlens.astype(np.int64), 16, 1)


@pytest.mark.parametrize("rows,h_kv,name", [(0, 1, "num_q_tokens_per_head_k"),
                                            (16, 0, "num_heads_k"),
                                            (16.0, 1, "num_q_tokens_per_head_k"),
                                            (True, 1, "num_q_tokens_per_head_k")])
def test_get_mla_metadata_bad_static_args(rows, h_kv, name):
    with pytest.raises(ValueError, match=name):
        get_mla_metadata(jnp.array([5, 6], jnp.int32), rows, h_kv)


def test_get_mla_metadata_bad_num_sms():
    with pytest.raises(ValueError, match="num_sms"):
        get_mla_metadata(jnp.array([5, 6], jnp.int32), 16, 1, num_sms=0)


# ------------------------------------------------------------------------------------------------
# Composition: jit, vmap, scan
# ------------------------------------------------------------------------------------------------
def _dev(case):
    return tuple(jnp.asarray(x) for x in case)


def _assert_same(actual, expected, what=""):
    """Same computation through another path: equal up to float32 reassociation."""
    a_out, a_lse = (np.asarray(x).astype(np.float64) for x in actual)
    e_out, e_lse = (np.asarray(x).astype(np.float64) for x in expected)
    check_close(a_out, e_out, abs_tol=1e-6, rel_tol=2 ** -7, cos_tol=1e-9, name=what + " out")
    check_close(a_lse, e_lse, abs_tol=1e-6, rel_tol=1e-6, cos_tol=1e-12, name=what + " lse")


def test_jit_with_shared_metadata_across_layers():
    b, s_q, h_q, h_kv = 4, 2, 16, 1
    # One decoding step: all layers share cache_seqlens and block_table (own q and caches).
    case = make_case(b, s_q, 140, h_q, h_kv, True, "bfloat16", seed=60, zero_len_fraction=0.25)
    qs, ks = _layer_stack(case, 3, seed=61)
    bt, sl = case.block_table, case.cache_seqlens
    rows = s_q * h_q // h_kv
    md, ns = jax.jit(get_mla_metadata, static_argnums=(1, 2))(jnp.asarray(sl), rows, h_kv)

    @jax.jit
    def with_md(q, k, bt, sl, md, ns):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, md, ns, causal=True)

    @jax.jit
    def without_md(q, k, bt, sl):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, causal=True)

    for q_np, k_np in zip(qs, ks):
        q, k = jnp.asarray(q_np), jnp.asarray(k_np)
        r1 = with_md(q, k, jnp.asarray(bt), jnp.asarray(sl), md, ns)
        r2 = without_md(q, k, jnp.asarray(bt), jnp.asarray(sl))
        np.testing.assert_array_equal(np.asarray(r1[0]), np.asarray(r2[0]))
        np.testing.assert_array_equal(np.asarray(r1[1]), np.asarray(r2[1]))
        ref_out, ref_lse = oracle_decode(q_np, k_np, bt, sl, SCALE, True)
        check_close(np.asarray(r1[0]), ref_out, **OUT_TOL)
        check_close(np.asarray(r1[1]), ref_lse, **LSE_TOL)


def _decode_out_shapes(fn, *args):
    """Type of the first output of each decode primitive in fn's jaxpr ('bf16[6,2,16,512]')."""
    text = str(jax.make_jaxpr(fn)(*args))
    return re.findall(r"(\w+\[[\d,]+\]) \w+:\S+ \w+:\S+ \w+:\S+ = jax_flashmla_decode\[", text)


def _loop(fn, *stacked):
    outs = [fn(*(x[i] for x in stacked)) for i in range(stacked[0].shape[0])]
    return tuple(jnp.stack([o[j] for o in outs]) for j in range(2))


def _batched_cases(n, b, s_q, h_q, h_kv, seed, s_k=140):
    """n independent cases with identical shapes (block tables / pools padded)."""
    cases = [make_case(b, s_q, s_k, h_q, h_kv, True, "bfloat16", seed=seed + i,
                       zero_len_fraction=0.25) for i in range(n)]
    nb = max(c.k_cache.shape[0] for c in cases)
    mb = max(c.block_table.shape[1] for c in cases)
    qs, ks, bts, sls = [], [], [], []
    for c in cases:
        k = np.full((nb, *c.k_cache.shape[1:]), np.nan, c.k_cache.dtype)
        k[:c.k_cache.shape[0]] = c.k_cache
        bt = np.full((b, mb), INVALID_BLOCK_ID, np.int32)
        bt[:, :c.block_table.shape[1]] = c.block_table
        qs.append(c.q), ks.append(k), bts.append(bt), sls.append(c.cache_seqlens)
    return tuple(np.stack(x) for x in (qs, ks, bts, sls))


def _oracle_stacked(q, k, bt, sl, causal, shared_k=False):
    outs, lses = zip(*(oracle_decode(q[i], k if shared_k else k[i], bt[i], sl[i], SCALE, causal)
                       for i in range(q.shape[0])))
    return np.stack(outs), np.stack(lses)


def test_vmap_shared_pool_over_q_block_table_seqlens():
    B, b, s_q, h_q = 3, 2, 2, 16
    big = make_case(B * b, s_q, 140, h_q, 1, True, "bfloat16", seed=70, zero_len_fraction=0.2)
    q = big.q.reshape(B, b, *big.q.shape[1:])
    bt = big.block_table.reshape(B, b, -1)
    sl = big.cache_seqlens.reshape(B, b)
    k = jnp.asarray(big.k_cache)

    def f(q, bt, sl):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, causal=True)

    got = jax.jit(jax.vmap(f))(jnp.asarray(q), jnp.asarray(bt), jnp.asarray(sl))
    want = _loop(f, jnp.asarray(q), jnp.asarray(bt), jnp.asarray(sl))
    assert got[0].shape == (B, b, s_q, h_q, 512) and got[1].shape == (B, b, h_q, s_q)
    _assert_same(got, want, "vmap")
    ref = _oracle_stacked(q, big.k_cache, bt, sl, True, shared_k=True)
    check_close(np.asarray(got[0]), ref[0], **OUT_TOL)
    check_close(np.asarray(got[1]), ref[1], **LSE_TOL)


def test_vmap_with_precomputed_metadata():
    B, b, s_q, h_q = 3, 2, 1, 64
    q, k, bt, sl = _dev(_batched_cases(B, b, s_q, h_q, 1, seed=80))
    md, ns = jax.vmap(lambda s: get_mla_metadata(s, s_q * h_q, 1))(sl)
    assert md.shape == (B, 132, 8) and ns.shape == (B, b + 1)
    for i in range(B):  # batched metadata = per-element metadata
        md_i, ns_i = jax_flashmla.schedule_numpy(np.asarray(sl[i]), 132)
        np.testing.assert_array_equal(np.asarray(md[i]), md_i)
        np.testing.assert_array_equal(np.asarray(ns[i]), ns_i)

    def f(q, k, bt, sl, md, ns):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, md, ns)

    got = jax.vmap(f)(q, k, bt, sl, md, ns)
    want = _loop(f, q, k, bt, sl, md, ns)
    _assert_same(got, want, "vmap")
    ref = _oracle_stacked(*(np.asarray(x) for x in (q, k, bt, sl)), False)
    check_close(np.asarray(got[0]), ref[0], **OUT_TOL)
    check_close(np.asarray(got[1]), ref[1], **LSE_TOL)


def test_vmap_over_k_cache_pools():
    """One page pool per element (mapped k_cache); block ids are per pool."""
    B, b, s_q, h_q, h_kv = 3, 2, 2, 16, 2
    q, k, bt, sl = _dev(_batched_cases(B, b, s_q, h_q, h_kv, seed=90))

    def f(q, k, bt, sl):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, causal=True)

    # The mapped axis is folded into the request batch: one decode over B * b requests.
    assert _decode_out_shapes(jax.vmap(f), q, k, bt, sl) == [f"bf16[{B * b},{s_q},{h_q},512]"]
    got = jax.jit(jax.vmap(f))(q, k, bt, sl)
    want = _loop(f, q, k, bt, sl)
    _assert_same(got, want, "vmap(k_cache)")
    assert not np.isnan(np.asarray(got[0]).astype(np.float32)).any()
    ref = _oracle_stacked(*(np.asarray(x) for x in (q, k, bt, sl)), True)
    check_close(np.asarray(got[0]), ref[0], **OUT_TOL)
    check_close(np.asarray(got[1]), ref[1], **LSE_TOL)


def _layer_stack(case, n, seed):
    """n per-layer (q, k_cache) sharing ``case``'s block table, lengths and NaN poisoning."""
    rng = np.random.default_rng(seed)
    poisoned = np.isnan(case.k_cache.astype(np.float32))
    qs, ks = [], []
    for _ in range(n):
        qs.append(np.clip(rng.standard_normal(case.q.shape) / 10, -1, 1).astype(case.q.dtype))
        fresh = np.clip(rng.standard_normal(case.k_cache.shape) / 10, -1, 1)
        ks.append(np.where(poisoned, np.nan, fresh).astype(case.k_cache.dtype))
    return np.stack(qs), np.stack(ks)


def test_vmap_mapped_k_cache_unmapped_block_table():
    """Same block table and lengths for all pools (e.g. vmap over layers)."""
    B, b, s_q, h_q = 3, 3, 1, 16
    case = make_case(b, s_q, 140, h_q, 1, True, "bfloat16", seed=96, zero_len_fraction=0.3)
    q, k = _layer_stack(case, B, seed=97)
    bt, sl = case.block_table, case.cache_seqlens
    bt_j, sl_j = jnp.asarray(bt), jnp.asarray(sl)

    def f(q, k):
        return flash_mla_with_kvcache(q, k, bt_j, sl_j, 512)

    got = jax.vmap(f)(*_dev((q, k)))
    want = _loop(f, *_dev((q, k)))
    _assert_same(got, want, "vmap(q, k_cache)")
    ref = _oracle_stacked(q, k, np.stack([bt] * B), np.stack([sl] * B), False)
    check_close(np.asarray(got[0]), ref[0], **OUT_TOL)
    check_close(np.asarray(got[1]), ref[1], **LSE_TOL)


def test_vmap_over_layers_with_shared_metadata():
    """vmap over layers (q, k_cache mapped) with one metadata closed over, as a model step does."""
    B, b, s_q, h_q = 3, 4, 2, 64
    case = make_case(b, s_q, 300, h_q, 1, True, "float16", seed=120, zero_len_fraction=0.25)
    q, k = _layer_stack(case, B, seed=121)
    bt, sl = jnp.asarray(case.block_table), jnp.asarray(case.cache_seqlens)
    md, ns = get_mla_metadata(sl, s_q * h_q, 1)

    def f(q, k):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, md, ns, causal=True)

    got = jax.jit(jax.vmap(f))(*_dev((q, k)))
    want = _loop(f, *_dev((q, k)))
    _assert_same(got, want, "vmap(layers)")
    ref = _oracle_stacked(q, k, np.stack([case.block_table] * B),
                          np.stack([case.cache_seqlens] * B), True)
    check_close(np.asarray(got[0]), ref[0], **OUT_TOL)
    check_close(np.asarray(got[1]), ref[1], **LSE_TOL)


def test_vmap_sequential_fallback_for_large_folded_batch(monkeypatch):
    """When B * b exceeds the scheduler's batch limit, vmap runs element by element."""
    from jax_flashmla import _checks
    B, b, s_q, h_q = 3, 2, 2, 16
    q, k, bt, sl = _dev(_batched_cases(B, b, s_q, h_q, 1, seed=130))
    monkeypatch.setattr(_checks, "MAX_BATCH", b + 1)  # b fits, B * b does not

    def f(q, k, bt, sl):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, causal=True)

    # One decode per element (inside a loop), not one over the folded B * b requests.
    assert _decode_out_shapes(jax.vmap(f), q, k, bt, sl) == [f"bf16[{b},{s_q},{h_q},512]"]
    got = jax.vmap(f)(q, k, bt, sl)
    want = _loop(f, q, k, bt, sl)
    _assert_same(got, want, "vmap(fallback)")
    ref = _oracle_stacked(*(np.asarray(x) for x in (q, k, bt, sl)), True)
    check_close(np.asarray(got[0]), ref[0], **OUT_TOL)
    check_close(np.asarray(got[1]), ref[1], **LSE_TOL)


def test_vmap_non_leading_axis():
    B, b, s_q, h_q = 2, 2, 2, 16
    q, k, bt, sl = _batched_cases(B, b, s_q, h_q, 1, seed=99)

    def f(q, k, bt, sl):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, causal=True)

    got = jax.vmap(f, in_axes=(2, 0, 1, 0), out_axes=(1, 2))(
        *_dev((np.moveaxis(q, 0, 2), k, np.moveaxis(bt, 0, 1), sl)))
    want = _loop(f, *_dev((q, k, bt, sl)))
    got = (jnp.moveaxis(got[0], 1, 0), jnp.moveaxis(got[1], 2, 0))
    _assert_same(got, want, "vmap(in_axes)")


def test_scan_over_layers():
    L, b, s_q, h_q = 3, 3, 2, 16
    case = make_case(b, s_q, 140, h_q, 1, True, "bfloat16", seed=110, zero_len_fraction=0.3)
    q, k = _layer_stack(case, L, seed=111)   # stacked per-layer queries and caches
    bt, sl = case.block_table, case.cache_seqlens
    md, ns = get_mla_metadata(jnp.asarray(sl), s_q * h_q, 1)

    @jax.jit
    def step(qs, ks, bt, sl, md, ns):
        def body(carry, x):
            q, k = x
            out, lse = flash_mla_with_kvcache(q, k, bt, sl, 512, md, ns, causal=True)
            return carry + jnp.sum(out.astype(jnp.float32)), (out, lse)
        return jax.lax.scan(body, jnp.float32(0), (qs, ks))

    total, got = step(*_dev((q, k, bt, sl)), md, ns)
    want = _loop(lambda q, k: flash_mla_with_kvcache(q, k, jnp.asarray(bt), jnp.asarray(sl), 512,
                                                     causal=True), *_dev((q, k)))
    _assert_same(got, want, "scan")
    np.testing.assert_allclose(float(total), float(jnp.sum(want[0].astype(jnp.float32))),
                               rtol=1e-4)
    ref = _oracle_stacked(q, k, np.stack([bt] * L), np.stack([sl] * L), True)
    check_close(np.asarray(got[0]), ref[0], **OUT_TOL)
    check_close(np.asarray(got[1]), ref[1], **LSE_TOL)


# ------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------
def test_get_mla_metadata_empty_batch():
    md, ns = get_mla_metadata(jnp.zeros((0,), jnp.int32), 128, 1)
    assert md.shape == (66, 8) and md.dtype == jnp.int32
    assert (np.asarray(md)[:, 0] >= 0).all()
    np.testing.assert_array_equal(np.asarray(ns), [0])


@pytest.mark.parametrize("use_jit", [False, True])
def test_empty_batch_returns_empty_arrays(use_jit):
    q = jnp.zeros((0, 2, 16, 576), BF16)
    k = jnp.asarray(make_case(1, 2, 20, 16, 1, False, "bfloat16", seed=2).k_cache)
    bt = jnp.zeros((0, 4), jnp.int32)
    sl = jnp.zeros((0,), jnp.int32)

    def f(q, k, bt, sl):
        return flash_mla_with_kvcache(q, k, bt, sl, 512, causal=True)

    out, lse = (jax.jit(f) if use_jit else f)(q, k, bt, sl)
    assert out.shape == (0, 2, 16, 512) and out.dtype == BF16
    assert lse.shape == (0, 16, 2) and lse.dtype == jnp.float32


def test_not_differentiable():
    case = make_case(1, 1, 70, 16, 1, False, "bfloat16", seed=3)
    q, k, bt, sl = _dev(case)

    def loss(q):
        return jnp.sum(flash_mla_with_kvcache(q, k, bt, sl, 512)[0].astype(jnp.float32))

    assert np.isfinite(float(loss(q)))
    with pytest.raises(NotImplementedError, match="jax_flashmla_decode"):
        jax.grad(loss)(q.astype(jnp.bfloat16))
