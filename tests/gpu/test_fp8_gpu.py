"""FP8 KV-cache decode kernels (issue 5) on a Hopper GPU.

Both layouts ("fp8_with_scale": 656-byte tokens; "fp8_per_tensor": e4m3 + a float32 kv_scale)
against the float32 reference run on the *dequantized* cache, with FlashMLA's sparse-decode
tolerances (abs 1e-3 / rel 2.01/128 / cos 5e-6; lse: the dense tolerances). As in gpu_cases.py,
all sub-cases of one (layout, s_q, h_q, h_kv, causal) configuration are merged into one batch over
one page pool: lengths 0, 1, 63, 64, 65, 2049 and varlen batches (some zero), a random page
permutation, NaN-free random garbage bytes (no e4m3 NaN codes 0x7F/0xFF, finite scales and RoPE)
in every slot no request may read. The error against the original bf16 cache (quantization error)
is printed. A separate test checks that dequantization is bit-exact over every e4m3 code.

Run by tests/gpu/run.sh on the lent H100; skipped elsewhere (conftest's gpu marker).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla as fm
from gpu_cases import _POOL_CHUNK, assert_close_device, build_tables, reference_per_request
from jax_flashmla import fp8
from jax_flashmla.bench import randn_over_10
from mla_testdata import HEAD_DIM_QK, LSE_TOL, PAGE_SIZE, check_close

pytestmark = pytest.mark.gpu

SCALE = 576 ** -0.5
#: Per-tensor scale of the tests: not a power of two, so folding it into the softmax and the
#: output is really exercised (data are randn/10 clipped to [-1, 1]).
KV_SCALE = np.float32(1.37 / 448)
SPARSE_OUT_TOL = {"abs_tol": 1e-3, "rel_tol": 2.01 / 128, "cos_tol": 5e-6}
WIDTH = {"fp8_with_scale": fp8.FP8_WITH_SCALE_BYTES, "fp8_per_tensor": HEAD_DIM_QK}
#: One request per explicit length (b=1, fixed length), then varlen batches (the last with zeros).
FP8_SUBCASES = ([(1, n, False, 0.0) for n in (0, 1, 63, 64, 65, 2049)]
                + [(6, 140, True, 0.0), (8, 3000, True, 0.25)])


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


# --------------------------------------------------------------------------------------------
# Data (device side)
# --------------------------------------------------------------------------------------------
def _as_bytes(x):
    """[..., k] of an m-byte dtype -> uint8 [..., k * m]."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b if b.ndim == x.ndim else b.reshape(*x.shape[:-1], -1)


def _nan_free_e4m3_bytes(key, shape):
    """Random bytes with the two e4m3fn NaN codes (0x7F, 0xFF) moved to 0x7E / 0xFE."""
    b = jax.random.bits(key, shape, jnp.uint8)
    return jnp.where((b & 0x7F) == 0x7F, b ^ 1, b)


def _garbage(key, shape, layout):
    """NaN-free garbage tokens: what a leak would turn into huge errors, never into NaN."""
    if layout == "fp8_per_tensor":
        return _nan_free_e4m3_bytes(key, shape)
    k1, k2, k3 = jax.random.split(key, 3)
    lead = shape[:-1]
    scales = jax.random.normal(k2, (*lead, 4), jnp.float32) * 1e3        # finite
    rope = (jax.random.normal(k3, (*lead, 64), jnp.float32) * 1e3).astype(jnp.bfloat16)
    return jnp.concatenate([_nan_free_e4m3_bytes(k1, (*lead, 512)), _as_bytes(scales),
                            _as_bytes(rope)], axis=-1)


@functools.partial(jax.jit, static_argnames=("h_kv", "layout"))
def _fp8_pool(key, valid, kv_scale, h_kv, layout):
    """(FP8 pool as uint8 bytes, the original bf16 pool with NaN in every unreadable slot)."""
    chunks = valid.shape[0] // _POOL_CHUNK
    shape = (_POOL_CHUNK, PAGE_SIZE, h_kv, HEAD_DIM_QK)

    def chunk(args):
        i, ok = args
        k_data, k_junk = jax.random.split(jax.random.fold_in(key, i))
        x = randn_over_10(k_data, shape, jnp.bfloat16)
        if layout == "fp8_with_scale":
            good = fp8.quantize_fp8_with_scale(x)
        else:
            good = _as_bytes(fp8.quantize_fp8_per_tensor(x, kv_scale))
        ok4 = ok[:, :, None, None]
        return (jnp.where(ok4, good, _garbage(k_junk, good.shape, layout)),
                jnp.where(ok4, x, jnp.nan).astype(jnp.bfloat16))

    pool, orig = jax.lax.map(chunk, (jnp.arange(chunks),
                                     valid.reshape(chunks, _POOL_CHUNK, PAGE_SIZE)))
    n = chunks * _POOL_CHUNK
    return (pool.reshape(n, PAGE_SIZE, h_kv, WIDTH[layout]),
            orig.reshape(n, PAGE_SIZE, h_kv, HEAD_DIM_QK))


def storage(pool_u8, layout, dtype=None):
    """The cache in the dtype the API takes: uint8 (or an int8 / e4m3 view) with scales, e4m3 per
    tensor."""
    dtype = dtype or (jnp.uint8 if layout == "fp8_with_scale" else jnp.float8_e4m3fn)
    return pool_u8 if dtype == jnp.uint8 else jax.lax.bitcast_convert_type(pool_u8, dtype)


@functools.lru_cache(maxsize=4)
def make_fp8_merged(seed, subcases, s_q, h_kv, layout):
    """Device arrays (k_cache in the API's dtype, original bf16 pool, block_table, seqlens)."""
    rng = np.random.default_rng(seed)
    seqlens, table, valid = build_tables(rng, list(subcases), s_q)
    pool, orig = _fp8_pool(jax.random.PRNGKey(seed), jnp.asarray(valid), jnp.float32(KV_SCALE),
                           h_kv, layout)
    return storage(pool, layout), orig, jnp.asarray(table), jnp.asarray(seqlens)


def make_q(seed, b, s_q, h_q):
    return randn_over_10(jax.random.PRNGKey(seed), (b, s_q, h_q, HEAD_DIM_QK), jnp.bfloat16)


# --------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------
def fp8_kwargs(layout, kv_scale):
    return {"is_fp8_kvcache": True} if layout == "fp8_with_scale" else {"kv_scale": kv_scale}


@functools.partial(jax.jit, static_argnames=("causal", "layout"))
def decode_fp8(q, cache, block_table, seqlens, kv_scale, causal, layout):
    h_kv = cache.shape[2]
    md, ns = fm.get_mla_metadata(seqlens, q.shape[1] * q.shape[2] // h_kv, h_kv)
    return fm.flash_mla_with_kvcache(q, cache, block_table, seqlens, 512, md, ns,
                                     softmax_scale=SCALE, causal=causal,
                                     **fp8_kwargs(layout, kv_scale))


def dequantized(cache, kv_scale, layout):
    if layout == "fp8_with_scale":
        return fp8.dequantize_fp8_with_scale(cache, jnp.float32)
    return fp8.dequantize_fp8_per_tensor(cache, kv_scale, jnp.float32)


@functools.partial(jax.jit, static_argnames=("causal", "layout"))
def reference_fp8(q, cache, block_table, seqlens, kv_scale, causal, layout):
    """The float32 reference on the dequantized cache (out rounded to bf16 like the kernel's)."""
    out, lse = reference_per_request(q, dequantized(cache, kv_scale, layout), block_table,
                                     seqlens, SCALE, causal)
    return out.astype(jnp.bfloat16), lse


@jax.jit
def _rel_err(actual, ref):
    a, r = actual.astype(jnp.float32), ref.astype(jnp.float32)
    ok = jnp.isfinite(a) & jnp.isfinite(r)
    a, r = jnp.where(ok, a, 0.0), jnp.where(ok, r, 0.0)
    return jnp.linalg.norm(a - r) / jnp.maximum(jnp.linalg.norm(r), 1e-12)


def check_fp8(q, cache, orig, bt, sl, causal, layout, name):
    """Decode against the reference on the dequantized cache; with `orig` (the bf16 cache it was
    quantized from) also against that, loosely (quantization error)."""
    kv_scale = jnp.float32(KV_SCALE)
    out, lse = jax.block_until_ready(decode_fp8(q, cache, bt, sl, kv_scale, causal, layout))
    causal_eff = causal and q.shape[1] > 1
    ref_out, ref_lse = reference_fp8(q, cache, bt, sl, kv_scale, causal_eff, layout)
    maxerr, cos = assert_close_device(out, ref_out, name=f"{name} out", **SPARSE_OUT_TOL)
    check_close(np.asarray(lse), np.asarray(ref_lse), name=f"{name} lse", **LSE_TOL)
    assert not bool(jnp.any(jnp.isnan(out))), f"{name}: NaN in out"
    if orig is None:
        return out, lse
    # Quantization error: against the reference on the original bf16 cache (reported).
    bf16_out, _ = reference_per_request(q, orig, bt, sl, SCALE, causal_eff)
    rel = float(_rel_err(out, bf16_out))
    print(f"{name}: max|out - ref(dequantized)| {maxerr:.2e}, cos_diff {cos:.1e}; "
          f"relative error vs the bf16 cache {rel:.2e}")
    assert rel < 0.1, f"{name}: relative error vs the bf16 cache {rel:.3f}"
    return out, lse


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------
HEADS = {"fp8_with_scale": [(1, 1), (16, 1), (64, 1), (128, 1)],
         "fp8_per_tensor": [(1, 1), (16, 1), (64, 1), (128, 1), (32, 2)]}
GRID = [(layout, h_q, h_kv) for layout, heads in HEADS.items() for h_q, h_kv in heads]
SQ_CAUSAL = [(1, False), (2, False), (2, True), (4, False), (4, True)]


@pytest.mark.parametrize("s_q,causal", SQ_CAUSAL)
@pytest.mark.parametrize("layout,h_q,h_kv", GRID)
def test_fp8_grid(layout, h_q, h_kv, s_q, causal):
    cache, orig, bt, sl = make_fp8_merged(_seed(layout, h_kv, s_q), tuple(FP8_SUBCASES), s_q,
                                          h_kv, layout)
    q = make_q(_seed(layout, h_q, h_kv, s_q, causal), sl.shape[0], s_q, h_q)
    _, lse = check_fp8(q, cache, orig, bt, sl, causal, layout,
                       f"{layout} s_q={s_q} h_q={h_q} h_kv={h_kv} causal={causal}")
    empty = np.asarray(sl) == 0
    assert empty.any() and np.all(np.isposinf(np.asarray(lse)[empty]))


@pytest.mark.parametrize("layout,dtype", [("fp8_with_scale", jnp.int8),
                                          ("fp8_with_scale", jnp.float8_e4m3fn)])
def test_fp8_with_scale_byte_views(layout, dtype):
    """int8 and float8_e4m3fn views of the 656-byte tokens give the uint8 result, bit for bit."""
    cache, _, bt, sl = make_fp8_merged(_seed("views"), ((6, 700, True, 0.2),), 2, 1, layout)
    q = make_q(_seed("views q"), sl.shape[0], 2, 64)
    kv_scale = jnp.float32(1.0)
    want = decode_fp8(q, cache, bt, sl, kv_scale, True, layout)
    got = decode_fp8(q, jax.lax.bitcast_convert_type(cache, dtype), bt, sl, kv_scale, True, layout)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_fp8_long_split_request():
    """One long request over many scheduler parts (split-KV + combine), both layouts."""
    for layout in ("fp8_with_scale", "fp8_per_tensor"):
        cache, orig, bt, sl = make_fp8_merged(_seed("long", layout), ((1, 20000, False, 0.0),), 1,
                                              1, layout)
        q = make_q(_seed("long q", layout), 1, 1, 128)
        check_fp8(q, cache, orig, bt, sl, False, layout, f"{layout} one 20000-token request")


@pytest.mark.parametrize("h_q", [16, 64])
def test_fp8_with_scale_mixed_factor_forms(h_q):
    """A scale of 2^8 (which the v4 converter applies in two multiplies) on rows 0-11 of every page,
    small ones elsewhere: the rows with small scales take the two-multiply form too. h_q=16 runs
    the narrow kernel, 64 the v4 kernel with the converter."""
    layout = "fp8_with_scale"
    cache, _, bt, sl = make_fp8_merged(_seed("mixed forms"), ((4, 700, False, 0.0),), 1, 1, layout)
    c = np.array(cache)                                                  # [pages, 64, 1, 656]
    # The last scale block of those rows: subnormal codes (|value| <= 7 * 2^-9) times 2^8, so the
    # values stay small enough (<= 3.5) for the usual tolerances.
    block = slice(fp8.NOPE_DIM - fp8.SCALE_TILE, fp8.NOPE_DIM)          # channels 384..511
    rng = np.random.default_rng(_seed("mixed forms codes"))
    shape = c[:, :12, :, block].shape
    c[:, :12, :, block] = (rng.integers(0, 8, shape) | (rng.integers(0, 2, shape) << 7)).astype(np.uint8)
    scale_bytes = slice(fp8.SCALE_OFFSET, fp8.ROPE_OFFSET)
    scales = np.ascontiguousarray(c[..., scale_bytes]).view(np.float32)  # [pages, 64, 1, 4]
    scales[:, :12, :, -1] = 2.0 ** 8
    c[..., scale_bytes] = scales.view(np.uint8)
    q = make_q(_seed("mixed forms q", h_q), sl.shape[0], 1, h_q)
    q = q.at[..., block].multiply(jnp.bfloat16(2.0 ** -5))               # moderate logits
    out, _ = check_fp8(q, jnp.asarray(c), None, bt, sl, False, layout, f"mixed forms h_q={h_q}")
    # The big scales are in effect (~0.11 there; <= 0.016 in the other channels).
    assert float(jnp.max(jnp.abs(out[..., block].astype(jnp.float32)))) > 0.05


# --------------------------------------------------------------------------------------------
# Dequantization is exact: every non-NaN e4m3 code, power-of-two scales across the range
# --------------------------------------------------------------------------------------------
_CODES = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)  # 254 codes
#: Power-of-two scales (DeepSeek V3.2's; exact) from 2^-20 to 2^10, and non-power-of-two ones,
#: which the narrow kernel folds into P (bf16) instead of V: within a few bf16 roundings there.
_SCALES = np.array([1.0, 2.0 ** -13, 2.0 ** -6, 2.0 ** 7, 2.0 ** 10, 0.3, 1.5, 2.0 ** -20,
                    3e-5, 2.0 ** 9, 1 / 3, 448.0, 0.5, 8.0, 0.1, 7.0], np.float32)
_EXACT_PAGES = 16


def _exact_cache(layout, seed):
    """Pages whose 64 rows are identical; page p holds codes _CODES[(p * 576 + c) % 254]."""
    rng = np.random.default_rng(seed)
    p = np.arange(_EXACT_PAGES)[:, None]
    codes = _CODES[(p * 576 + np.arange(576)[None, :]) % _CODES.size]          # [pages, 576]
    exact = np.ones((_EXACT_PAGES, 512), bool)  # channels whose scale is a power of two
    if layout == "fp8_with_scale":
        scales = _SCALES[(4 * p + np.arange(4)[None, :]) % _SCALES.size]        # [pages, 4]
        exact = np.repeat(np.frexp(scales)[0] == 0.5, 128, axis=1)
        rope = (rng.standard_normal((_EXACT_PAGES, 64)) / 10).astype(ml_dtypes.bfloat16)
        token = np.concatenate([codes[:, :512], scales.view(np.uint8), rope.view(np.uint8)], -1)
        deq = codes[:, :512].view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(
            _EXACT_PAGES, 4, 128) * scales[:, :, None]
    else:
        token = codes
        deq = codes[:, :512].view(ml_dtypes.float8_e4m3fn).astype(np.float32) * KV_SCALE
    cache = np.broadcast_to(token[:, None, None, :], (_EXACT_PAGES, PAGE_SIZE, 1,
                                                      token.shape[-1])).copy()
    want_v = deq.reshape(_EXACT_PAGES, 512).astype(ml_dtypes.bfloat16)
    return cache, want_v, exact


@pytest.mark.parametrize("h_q", [16, 64])  # 16: the narrow kernel; 64: v4 and its converter
@pytest.mark.parametrize("layout", ["fp8_with_scale", "fp8_per_tensor"])
def test_fp8_dequantization_is_exact(layout, h_q):
    """With one key, or 64 identical keys, softmax weights are exactly 1 (or 1/64) and out is the
    dequantized V row itself: bit-exact against NumPy/ml_dtypes for every code and every
    power-of-two scale (per tensor: any scale); other scales within 2^-7 relative (the narrow
    kernel rounds P * scale to bf16, v4's converter the scale itself)."""
    cache_np, want_v, exact = _exact_cache(layout, 7)
    # Requests 0..15 read one token of page i, 16..31 all 64 (identical) tokens of page i - 16.
    b = 2 * _EXACT_PAGES
    pages = np.arange(b) % _EXACT_PAGES
    bt = np.full((b, 2), 2147480000, np.int32)
    bt[:, 0] = pages
    sl = np.where(np.arange(b) < _EXACT_PAGES, 1, PAGE_SIZE).astype(np.int32)
    cache = storage(jnp.asarray(cache_np), layout)
    q = make_q(11, b, 1, h_q)
    kv_scale = jnp.float32(KV_SCALE)
    out, lse = decode_fp8(q, cache, jnp.asarray(bt), jnp.asarray(sl), kv_scale, False, layout)
    got = np.asarray(out)                                                  # [b, 1, 16, 512]
    want = np.broadcast_to(want_v[pages][:, None, None, :], got.shape).astype(np.float32)
    exact = np.broadcast_to(exact[pages][:, None, None, :], got.shape)
    got = got.astype(np.float32)
    assert exact.mean() > 0.5, "most channels must be checked bit-exactly"
    # exact: -0 == +0 (0 + -0 is +0); else P * scale, out and the expected value are each rounded
    # to bf16 once.
    bad = np.where(exact, got != want, np.abs(got - want) > 2.0 ** -7 * np.abs(want))
    assert not bad.any(), (f"{layout}: {int(bad.sum())} of {bad.size} values differ; first at "
                           f"{tuple(np.argwhere(bad)[0])}: got {got[bad][0]!r}, want "
                           f"{want[bad][0]!r}")
    _, ref_lse = reference_fp8(q, cache, jnp.asarray(bt), jnp.asarray(sl), kv_scale, False, layout)
    # The logits of these extreme codes and scales are sums of huge terms that nearly cancel, so
    # float32 summation order alone moves lse by ~eps * scale * sum|q_c k_c|: bound it by that.
    keys = np.asarray(dequantized(cache, kv_scale, layout))[pages, 0, 0, :]      # [b, 576]
    q32 = np.asarray(q, np.float32)[:, 0]                                        # [b, 16, 576]
    cond = SCALE * np.einsum("bhc,bc->bh", np.abs(q32), np.abs(keys))[:, :, None]
    err = np.abs(np.asarray(lse, np.float64) - np.asarray(ref_lse, np.float64))
    assert np.all(err <= 1e-6 + 1e-5 * cond), (
        f"{layout} lse: max err {err.max():.3g}, worst err / cond {(err / cond).max():.3g}")
