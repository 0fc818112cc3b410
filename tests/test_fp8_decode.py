"""FP8 KV caches through flash_mla_with_kvcache on CPU (the reference path).

Correctness is judged against the float64 oracle run on the *dequantized* cache, with FlashMLA's
sparse-decode tolerances (abs 1e-3 / rel 2.01/128 / cos 5e-6); the error against the original
bf16 cache (quantization error) is reported, not asserted tightly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla import fp8
from mla_testdata import LSE_TOL, PAGE_SIZE, check_close, make_case, oracle_decode

SPARSE_OUT_TOL = dict(abs_tol=1e-3, rel_tol=2.01 / 128, cos_tol=5e-6)
SCALE = 0.07


def _garbage_unused_pages(cache_u8, block_table, seqlens, seed):
    """Large, NaN-free garbage tokens in every slot no request uses (instead of make_case's NaN):
    valid 656-byte encodings of values around +-1e4, which would dominate any softmax they leaked
    into."""
    cache = np.array(cache_u8)
    used = np.zeros(cache.shape[:2], bool)
    for i, n in enumerate(seqlens):
        for j in range(int(n)):
            used[block_table[i, j // PAGE_SIZE], j % PAGE_SIZE] = True
    rng = np.random.default_rng(seed)
    junk = rng.standard_normal(cache.shape[:3] + (576,)).astype(np.float32) * 1e4
    junk = np.asarray(fp8.quantize_fp8_with_scale(jnp.asarray(junk)))
    cache[~used] = junk[~used]
    return cache


def _fp8_with_scale_case(b, s_q, s_k, h_q, varlen, seed, zero_len_fraction=0.0):
    case = make_case(b, s_q, s_k, h_q, 1, varlen, "bfloat16", seed, zero_len_fraction)
    kv = np.nan_to_num(case.k_cache.astype(np.float32))      # quantize the valid tokens
    cache = np.asarray(fp8.quantize_fp8_with_scale(jnp.asarray(kv)))
    cache = _garbage_unused_pages(cache, case.block_table, case.cache_seqlens, seed)
    return case, cache


@pytest.mark.parametrize("b,s_q,s_k,h_q,varlen,causal,zero", [
    (2, 1, 140, 16, True, False, 0.0),
    (3, 2, 300, 128, True, True, 0.0),
    (4, 4, 90, 1, False, True, 0.0),
    (6, 2, 200, 64, True, False, 0.5),
])
def test_fp8_with_scale_matches_oracle_on_dequantized_cache(b, s_q, s_k, h_q, varlen, causal,
                                                           zero):
    case, cache = _fp8_with_scale_case(b, s_q, s_k, h_q, varlen, seed=b * 7 + s_q,
                                       zero_len_fraction=zero)
    out, lse = jax.jit(lambda q, c, bt, sl: fm.flash_mla_with_kvcache(
        q, c, bt, sl, 512, softmax_scale=SCALE, causal=causal, is_fp8_kvcache=True))(
            case.q, cache, case.block_table, case.cache_seqlens)
    assert out.dtype == jnp.bfloat16 and out.shape == (b, s_q, h_q, 512)
    deq = np.asarray(fp8.dequantize_fp8_with_scale(jnp.asarray(cache), jnp.float32))
    ref_out, ref_lse = oracle_decode(case.q, deq, case.block_table, case.cache_seqlens, SCALE,
                                     causal)
    check_close(np.asarray(out, np.float32), ref_out.astype(np.float32), name="out",
                **SPARSE_OUT_TOL)
    check_close(np.asarray(lse), ref_lse, name="lse", **LSE_TOL)
    assert not np.isnan(np.asarray(out, np.float32)).any()

    # Quantization error against the original bf16 cache: reported, bounded loosely.
    bf16_out, _ = oracle_decode(case.q, case.k_cache, case.block_table, case.cache_seqlens,
                                SCALE, causal)
    rel = np.linalg.norm(np.asarray(out, np.float64) - bf16_out) / max(
        np.linalg.norm(bf16_out), 1e-12)
    print(f"fp8-with-scale vs bf16 cache: relative error {rel:.2e}")
    assert rel < 0.08


@pytest.mark.parametrize("h_kv,causal", [(1, True), (2, False)])
def test_fp8_per_tensor_matches_oracle_on_dequantized_cache(h_kv, causal):
    case = make_case(3, 2, 180, 8, h_kv, True, "bfloat16", seed=11 + h_kv)
    kv = jnp.asarray(np.nan_to_num(case.k_cache.astype(np.float32)))
    k_scale = fp8.per_tensor_scale(kv)
    cache8 = fp8.quantize_fp8_per_tensor(kv, k_scale)
    out, lse = fm.flash_mla_with_kvcache(case.q, cache8, case.block_table, case.cache_seqlens,
                                         512, softmax_scale=SCALE, causal=causal,
                                         kv_scale=k_scale)
    deq = np.asarray(fp8.dequantize_fp8_per_tensor(cache8, k_scale, jnp.float32))
    ref_out, ref_lse = oracle_decode(case.q, deq, case.block_table, case.cache_seqlens, SCALE,
                                     causal)
    check_close(np.asarray(out, np.float32), ref_out.astype(np.float32), name="out",
                **SPARSE_OUT_TOL)
    check_close(np.asarray(lse), ref_lse, name="lse", **LSE_TOL)


def test_fp8_metadata_reuse_and_vmap():
    case, cache = _fp8_with_scale_case(4, 1, 150, 16, True, seed=3)
    md, ns = fm.get_mla_metadata(jnp.asarray(case.cache_seqlens), 16, 1)
    single = fm.flash_mla_with_kvcache(case.q, cache, case.block_table, case.cache_seqlens, 512,
                                       md, ns, softmax_scale=SCALE, is_fp8_kvcache=True)
    qs = jnp.stack([jnp.asarray(case.q), -jnp.asarray(case.q)])
    outs, lses = jax.vmap(lambda q: fm.flash_mla_with_kvcache(
        q, cache, case.block_table, case.cache_seqlens, 512, md, ns, softmax_scale=SCALE,
        is_fp8_kvcache=True))(qs)
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(single[0]))
    np.testing.assert_array_equal(np.asarray(lses[0]), np.asarray(single[1]))
    assert not np.array_equal(np.asarray(outs[1]), np.asarray(outs[0]))


@pytest.mark.parametrize("kwargs,cache_kind,exc,msg", [
    (dict(is_fp8_kvcache=True), "bf16", TypeError, "656-byte"),
    (dict(is_fp8_kvcache=True), "u8_576", ValueError, r"k_cache head dim"),
    (dict(is_fp8_kvcache=True), "u8_2heads", ValueError, "one KV head"),
    (dict(kv_scale=1.0), "u8", TypeError, "float8_e4m3fn"),
    (dict(is_fp8_kvcache=True, kv_scale=1.0), "u8", ValueError, "not both"),
])
def test_fp8_trace_time_errors(kwargs, cache_kind, exc, msg):
    q = jnp.ones((1, 1, 16, 576), jnp.bfloat16)
    caches = {
        "bf16": jnp.ones((4, 64, 1, 576), jnp.bfloat16),
        "u8": jnp.ones((4, 64, 1, 656), jnp.uint8),
        "u8_576": jnp.ones((4, 64, 1, 576), jnp.uint8),
        "u8_2heads": jnp.ones((4, 64, 2, 656), jnp.uint8),
    }
    bt = jnp.zeros((1, 4), jnp.int32)
    sl = jnp.full((1,), 70, jnp.int32)
    with pytest.raises(exc, match=msg):
        fm.flash_mla_with_kvcache(q, caches[cache_kind], bt, sl, 512, **kwargs)


def test_fp8_requires_bf16_queries():
    with pytest.raises(TypeError, match="q must be bfloat16"):
        fm.flash_mla_with_kvcache(jnp.ones((1, 1, 16, 576), jnp.float16),
                                  jnp.ones((4, 64, 1, 656), jnp.uint8),
                                  jnp.zeros((1, 4), jnp.int32), jnp.full((1,), 9, jnp.int32),
                                  512, is_fp8_kvcache=True)
