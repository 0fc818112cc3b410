"""FP8 KV-cache helpers: the 656-byte FP8-with-scale layout, per-tensor FP8, the paged writers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_flashmla.fp8 import (FP8_MAX, FP8_WITH_SCALE_BYTES, NOPE_DIM, ROPE_DIM, SCALE_TILE,
                              dequantize_fp8_per_tensor, dequantize_fp8_with_scale,
                              fp8_with_scale_scales, per_tensor_scale, quantize_fp8_per_tensor,
                              quantize_fp8_with_scale, split_fp8_with_scale, write_tokens_fp8,
                              write_tokens_fp8_per_tensor)
from jax_flashmla.kv_cache import PagedMLACache

E4M3 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16


def _kv(shape, seed=0, spread=True):
    """randn ``[..., 576]``; with ``spread``, every 128-tile (and the rope) gets its own magnitude
    between 1e-3 and 1e3, so the tiles get different scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if spread:
        mags = 10.0 ** rng.uniform(-3, 3, size=shape[:-1] + (5,))
        x *= np.repeat(mags, [128, 128, 128, 128, 64], axis=-1).astype(np.float32)
    return x


def _ref_quantize(x):
    """Independent NumPy/ml_dtypes transcription of FlashMLA's tests/quant.py (V32_FP8Sparse)."""
    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    tiles = x[..., :NOPE_DIM].reshape(*lead, 4, SCALE_TILE)
    s = (np.abs(tiles).max(-1) / np.float32(448.0)).astype(np.float32)
    scales = np.power(2.0, np.ceil(np.log2(np.maximum(s.astype(np.float64), 1e-4))))
    scales = scales.astype(np.float32)
    q = (tiles / scales[..., None]).astype(E4M3).reshape(*lead, NOPE_DIM)
    rope = x[..., NOPE_DIM:].astype(BF16)
    return np.concatenate([q.view(np.uint8), scales.view(np.uint8).reshape(*lead, 16),
                           rope.view(np.uint8).reshape(*lead, 128)], axis=-1)


# Jitted once: eager JAX dispatches (and compiles) every small op separately, which is slow.
_quant = jax.jit(quantize_fp8_with_scale)
_deq = jax.jit(dequantize_fp8_with_scale, static_argnums=1)
_split = jax.jit(split_fp8_with_scale)


def _f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# FP8 with scale: layout
# ------------------------------------------------------------------------------------------------
def test_constants():
    assert (FP8_WITH_SCALE_BYTES, NOPE_DIM, ROPE_DIM, SCALE_TILE, FP8_MAX) == (656, 512, 64, 128,
                                                                              448.0)
    assert FP8_WITH_SCALE_BYTES == NOPE_DIM + 4 * (NOPE_DIM // SCALE_TILE) + 2 * ROPE_DIM
    assert FP8_WITH_SCALE_BYTES % 16 == 0
    assert float(ml_dtypes.finfo(E4M3).max) == FP8_MAX


def test_byte_layout_hand_computed():
    """One nonzero element per tile (and two in the rope): every byte computed by hand."""
    x = np.zeros(576, np.float32)
    x[5] = 3.0            # tile 0: 3/448 -> scale 2^-7, 3 * 2^7 = 384 = 1.5 * 2^8 -> 0x7C
    x[130] = -0.5         # tile 1: 0.5/448 -> scale 2^-9, -256 = -1.0 * 2^8        -> 0xF8
    #                       tile 2: all zero -> scale max(0, 1e-4) -> 2^-13, bytes 0
    x[511] = 1792.0       # tile 3: 1792/448 = 4 exactly (already a power of two) -> 448 -> 0x7E
    x[512 + 3] = 1.25     # rope: bf16 0x3FA0
    x[575] = -2.0         # rope: bf16 0xC000
    got = np.asarray(quantize_fp8_with_scale(jnp.asarray(x)))
    assert got.dtype == np.uint8 and got.shape == (656,)

    want = np.zeros(656, np.uint8)
    want[5], want[130], want[511] = 0x7C, 0xF8, 0x7E
    want[512:528] = [0, 0, 0, 0x3C,      # 2^-7  = 0x3C000000, little-endian
                     0, 0, 0, 0x3B,      # 2^-9  = 0x3B000000
                     0, 0, 0, 0x39,      # 2^-13 = 0x39000000
                     0, 0, 0x80, 0x40]   # 4.0   = 0x40800000
    want[528 + 6], want[528 + 7] = 0xA0, 0x3F
    want[654], want[655] = 0x00, 0xC0
    np.testing.assert_array_equal(got, want)

    deq = np.asarray(dequantize_fp8_with_scale(got, jnp.float32))
    np.testing.assert_array_equal(deq, x)            # all of these values are exact in e4m3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_matches_flashmla_recipe_bytewise(dtype):
    x = jnp.asarray(_kv((3, 5, 576), seed=1), dtype)
    if dtype == jnp.float16:
        x = jnp.clip(x, -6e4, 6e4)
    got = np.asarray(jax.jit(quantize_fp8_with_scale)(x))
    assert got.shape == (3, 5, 656) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _ref_quantize(_f32(x)))
    np.testing.assert_array_equal(np.asarray(quantize_fp8_with_scale(x)), got)   # eager == jit


def test_any_leading_shape():
    x = jnp.asarray(_kv((2, 3, 1, 576), seed=2), jnp.bfloat16)
    q = _quant(x)
    assert q.shape == (2, 3, 1, 656)
    np.testing.assert_array_equal(np.asarray(q).reshape(6, 656),
                                  np.asarray(_quant(x.reshape(6, 576))))
    assert _deq(q, jnp.bfloat16).shape == (2, 3, 1, 576)
    assert _quant(jnp.zeros((0, 576))).shape == (0, 656)
    with pytest.raises(ValueError, match="576"):
        _quant(jnp.zeros((4, 512)))
    with pytest.raises(ValueError, match="656"):
        dequantize_fp8_with_scale(jnp.zeros((4, 576), jnp.uint8))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_fp8_with_scale(jnp.zeros((4, 656), jnp.float16))


# ------------------------------------------------------------------------------------------------
# FP8 with scale: numerics
# ------------------------------------------------------------------------------------------------
def test_scales_are_powers_of_two_and_cover_the_tile_max():
    x = _kv((64, 576), seed=3)
    x[0, :128] = 448.0 * 2.0 ** -3          # exact power-of-two max: scale 2^-3, not 2^-2
    x[1, 128:256] = 1e-6                    # below the floor: scale 2^-13
    scales = np.asarray(fp8_with_scale_scales(jnp.asarray(x)))
    stored = np.asarray(_split(_quant(jnp.asarray(x)))[1])
    np.testing.assert_array_equal(stored, scales)
    mant, _ = np.frexp(scales)
    assert np.all(mant == 0.5)                                            # powers of two
    amax = np.abs(x[:, :512].reshape(64, 4, 128)).max(-1) / np.float32(448)
    assert np.all(scales >= amax)
    assert np.all(scales >= 2.0 ** -13)
    tight = amax > 2.0 ** -13
    assert np.all(scales[tight] < 2 * amax[tight])                        # smallest such power
    assert scales[0, 0] == 2.0 ** -3 and scales[1, 1] == 2.0 ** -13
    # Quantized magnitudes never exceed 448 (no NaN from overflow).
    q = np.asarray(_split(_quant(jnp.asarray(x)))[0], np.float32)
    assert np.all(np.isfinite(q)) and np.abs(q).max() <= 448.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_round_trip_error_within_e4m3_precision(dtype):
    x = jnp.asarray(_kv((512, 576), seed=4), dtype)
    xf = _f32(x)
    q = _quant(x)
    deq = np.asarray(_deq(q, jnp.float32))
    assert deq.dtype == np.float32 and deq.shape == xf.shape

    scales = np.repeat(np.asarray(_split(q)[1]), 128, axis=-1)
    nope, dnope = xf[:, :512], deq[:, :512]
    err = np.abs(dnope - nope)
    normal = np.abs(nope) / scales >= 2.0 ** -6             # e4m3 normal range after scaling
    assert normal.mean() > 0.99
    # Round to nearest with 3 mantissa bits: at most half an ulp = 2^-4 relative.
    assert np.all(err[normal] <= 2.0 ** -4 * np.abs(nope[normal]) + 1e-30)
    # Subnormals: half of the fixed step 2^-9 (times the scale).
    assert np.all(err[~normal] <= 2.0 ** -10 * scales[~normal])
    rel = np.linalg.norm(dnope - nope) / np.linalg.norm(nope)
    assert 1e-3 < rel < 3e-2, rel
    # Per-tile norm-relative error too (tiles have magnitudes 1e-3 .. 1e3).
    t_err = np.linalg.norm((dnope - nope).reshape(512, 4, 128), axis=-1)
    t_ref = np.linalg.norm(nope.reshape(512, 4, 128), axis=-1)
    assert np.all(t_err / t_ref < 4e-2)
    # RoPE: exactly the bf16 value of the input.
    np.testing.assert_array_equal(deq[:, 512:], _f32(x[:, 512:].astype(jnp.bfloat16)))


def test_dequantize_to_bf16_is_exact_and_dtype_is_honoured():
    x = jnp.asarray(_kv((32, 576), seed=5), jnp.bfloat16)
    q = _quant(x)
    d32 = np.asarray(_deq(q, jnp.float32))
    d16 = _deq(q, jnp.bfloat16)
    assert d16.dtype == jnp.bfloat16
    # fp8 * power-of-two scale is representable in bf16: the bf16 output loses nothing.
    np.testing.assert_array_equal(_f32(d16), d32)
    assert _deq(q, jnp.float16).dtype == jnp.float16


def test_rope_round_trips_bit_exactly():
    rng = np.random.default_rng(6)
    rope_bits = rng.integers(0, 1 << 16, size=(40, 64), dtype=np.uint16)
    rope_bits[(rope_bits & 0x7F80) == 0x7F80] = 0x3F80       # avoid NaN/inf bit patterns
    rope = rope_bits.view(BF16)
    x = np.concatenate([_kv((40, 576), seed=6)[:, :512], rope.astype(np.float32)], axis=-1)
    q = _quant(jnp.asarray(x, jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(q)[:, 528:].view(np.uint16), rope_bits)
    got = np.asarray(_deq(q, jnp.bfloat16))
    np.testing.assert_array_equal(got[:, 512:].view(np.uint16), rope_bits)
    np.testing.assert_array_equal(np.asarray(_split(q)[2]).view(np.uint16),
                                  rope_bits)


def test_zero_and_all_equal_tiles():
    x = np.zeros((4, 576), np.float32)
    x[1, :128] = -5.0        # scale 2^-6; -5 * 64 = -320 = -1.25 * 2^8: exact
    x[1, 128:256] = 0.3      # not exact in e4m3: one rounding, all elements alike
    x[2, 256:384] = 7.0
    x[3] = 1.0               # every tile all-equal, rope too
    q = _quant(jnp.asarray(x))
    fp8, scales, _ = (np.asarray(a) for a in _split(q))
    deq = np.asarray(_deq(q, jnp.float32))

    np.testing.assert_array_equal(scales[0], [2.0 ** -13] * 4)        # all-zero token
    np.testing.assert_array_equal(np.asarray(q)[0, :512], 0)
    np.testing.assert_array_equal(deq[0], 0.0)
    assert scales[1, 0] == 2.0 ** -6
    np.testing.assert_array_equal(deq[1, :128], -5.0)
    t = deq[1, 128:256]
    assert np.all(t == t[0]) and abs(t[0] - 0.3) <= 2.0 ** -4 * 0.3
    assert np.all(fp8[2, 256:384].astype(np.float32) == fp8[2, 256].astype(np.float32))
    np.testing.assert_array_equal(deq[2, 256:384], 7.0)
    np.testing.assert_array_equal(deq[3], 1.0)
    np.testing.assert_array_equal(deq[:3, :128][deq[:3, :128] == 0].size, 128 * 2)


def test_tiny_values_and_nan():
    x = np.zeros((2, 576), np.float32)
    x[0, :128] = 2.0 ** -24          # below the 1e-4 floor's reach: |x / 2^-13| = 2^-11 -> 0
    x[0, 128] = 2.0 ** -20           # 2^-7 after scaling: subnormal, exact (multiple of 2^-9)
    x[1, 7] = np.nan
    deq = np.asarray(_deq(_quant(jnp.asarray(x)), jnp.float32))
    np.testing.assert_array_equal(deq[0, :128], 0.0)
    assert deq[0, 128] == 2.0 ** -20
    assert np.all(np.isnan(deq[1, :128])) and np.all(deq[1, 128:512] == 0.0)


def test_storage_views_int8_and_float8_accepted():
    x = jnp.asarray(_kv((8, 576), seed=7), jnp.bfloat16)
    q = _quant(x)
    want = np.asarray(_deq(q, jnp.bfloat16))
    for view in (jnp.int8, jnp.float8_e4m3fn):
        qv = jax.lax.bitcast_convert_type(q, view)
        assert qv.dtype == view
        np.testing.assert_array_equal(np.asarray(_deq(qv, jnp.bfloat16)), want)
        for a, b in zip(_split(qv), _split(q)):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8),
                                          np.asarray(b).view(np.uint8))
    # A NumPy uint8 array straight from host memory works too.
    np.testing.assert_array_equal(np.asarray(_deq(np.asarray(q), jnp.bfloat16)), want)


# ------------------------------------------------------------------------------------------------
# Per-tensor FP8
# ------------------------------------------------------------------------------------------------
def test_per_tensor_round_trip():
    x = jnp.asarray(_kv((128, 576), seed=8, spread=False) * 3.0, jnp.bfloat16)
    s = per_tensor_scale(x)
    assert s.dtype == jnp.float32 and s.shape == ()
    np.testing.assert_allclose(float(s), float(jnp.max(jnp.abs(_f32(x)))) / 448, rtol=1e-6)
    q = jax.jit(quantize_fp8_per_tensor)(x, s)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    np.testing.assert_array_equal(_f32(q),
                                  (_f32(x) / np.float32(s)).astype(E4M3).astype(np.float32))
    deq = np.asarray(dequantize_fp8_per_tensor(q, s, jnp.float32))
    xf = _f32(x)
    rel = np.linalg.norm(deq - xf) / np.linalg.norm(xf)
    assert 1e-3 < rel < 3e-2, rel
    normal = np.abs(xf) / float(s) >= 2.0 ** -6
    # Non-power-of-two scale: the multiply adds one f32 rounding on top of the fp8 one.
    assert np.all(np.abs(deq - xf)[normal] <= (2.0 ** -4 + 1e-6) * np.abs(xf)[normal])
    assert dequantize_fp8_per_tensor(q, s).dtype == jnp.bfloat16
    # uint8 view and a [1]-shaped scale are accepted.
    np.testing.assert_array_equal(
        np.asarray(dequantize_fp8_per_tensor(jax.lax.bitcast_convert_type(q, jnp.uint8),
                                             jnp.reshape(s, (1,)), jnp.float32)), deq)
    with pytest.raises(ValueError, match="scalar"):
        quantize_fp8_per_tensor(x, jnp.ones(2))


def test_per_tensor_saturation_and_floor():
    x = jnp.asarray([0.5, -0.5, 447.0, 470.0, -1000.0, 1e9, np.nan, 0.0], jnp.float32)
    q = np.asarray(quantize_fp8_per_tensor(x, 1.0), np.float32)
    np.testing.assert_array_equal(q[:6], [0.5, -0.5, 448.0, 448.0, -448.0, 448.0])
    assert np.isnan(q[6]) and q[7] == 0.0
    # Scale 2: 1000 / 2 = 500 -> 448 -> 896 after dequantization.
    np.testing.assert_array_equal(
        np.asarray(dequantize_fp8_per_tensor(quantize_fp8_per_tensor(x[:6], 2.0), 2.0,
                                             jnp.float32)),
        [0.5, -0.5, 448.0, 480.0, -896.0, 896.0])
    assert float(per_tensor_scale(jnp.zeros((4, 576)))) == np.float32(1e-8)


# ------------------------------------------------------------------------------------------------
# Paged writers
# ------------------------------------------------------------------------------------------------
SLOTS = np.array([0, 63, 64, -1, 3 * 64 + 7], np.int32)       # -1: padding, skipped


def _entries(n, seed=0):
    x = _kv((n, 576), seed=seed)
    return x[:, :512], x[:, 512:]


def test_write_tokens_fp8_bytes_at_slots():
    lat, rope = _entries(5, seed=9)
    cache = jnp.full((4, 64, 1, 656), 0xAB, jnp.uint8)        # sentinel: unwritten bytes show
    out = jax.jit(write_tokens_fp8)(cache, lat, rope, SLOTS)
    assert out.dtype == jnp.uint8 and out.shape == cache.shape

    want = np.full((4 * 64, 656), 0xAB, np.uint8)
    rows = _ref_quantize(np.concatenate([lat, rope], axis=-1))
    for i, s in enumerate(SLOTS):
        if s >= 0:
            want[s] = rows[i]
    np.testing.assert_array_equal(np.asarray(out).reshape(-1, 656), want)
    assert np.all(np.asarray(out)[-1, -1] == 0xAB)             # -1 did not wrap to the last slot

    deq = np.asarray(_deq(out[SLOTS[SLOTS >= 0] // 64,
                                                   SLOTS[SLOTS >= 0] % 64, 0], jnp.float32))
    x = np.concatenate([lat, rope], axis=-1)[SLOTS >= 0]
    assert np.linalg.norm(deq - x) / np.linalg.norm(x) < 3e-2


def test_write_tokens_fp8_block_ids_storage_views_and_wrapper():
    lat, rope = _entries(3, seed=10)
    rows = _ref_quantize(np.concatenate([lat, rope], axis=-1))
    blocks, offs = np.array([2, -1, 0], np.int32), np.array([5, 9, 63], np.int32)
    for dtype in (jnp.uint8, jnp.int8, jnp.float8_e4m3fn):
        base = jax.lax.bitcast_convert_type(jnp.full((3, 64, 1, 656), 0x11, jnp.uint8), dtype)
        out = jax.jit(write_tokens_fp8)(base, lat, rope, block_ids=blocks, offsets=offs)
        assert out.dtype == dtype
        got = np.asarray(jax.lax.bitcast_convert_type(out, jnp.uint8))[:, :, 0]
        want = np.full((3, 64, 656), 0x11, np.uint8)
        want[2, 5], want[0, 63] = rows[0], rows[2]
        np.testing.assert_array_equal(got, want)
    wrapped = jax.jit(write_tokens_fp8)(PagedMLACache(jnp.zeros((3, 64, 1, 656), jnp.uint8)),
                                        lat, rope, np.array([128 + 5, -7, 63], np.int32))
    assert isinstance(wrapped, PagedMLACache)
    np.testing.assert_array_equal(np.asarray(wrapped.pages)[2, 5, 0], rows[0])
    np.testing.assert_array_equal(np.asarray(wrapped.pages)[0, 63, 0], rows[2])
    assert np.count_nonzero(np.asarray(wrapped.pages)) == np.count_nonzero(rows[[0, 2]])


def test_write_tokens_fp8_argument_errors():
    lat, rope = _entries(2)
    cache = jnp.zeros((1, 64, 1, 656), jnp.uint8)
    with pytest.raises(ValueError, match="either"):
        write_tokens_fp8(cache, lat, rope)
    with pytest.raises(ValueError, match="both"):
        write_tokens_fp8(cache, lat, rope, block_ids=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="cache must be"):
        write_tokens_fp8(jnp.zeros((1, 64, 1, 576), jnp.uint8), lat, rope, np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="uint8"):
        write_tokens_fp8(jnp.zeros((1, 64, 1, 656), jnp.bfloat16), lat, rope,
                         np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"latent must be \[n, 512\]"):
        write_tokens_fp8(cache, lat[:, :100], rope, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="slots for"):
        write_tokens_fp8(cache, lat, rope, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="k_scale"):
        write_tokens_fp8_per_tensor(jnp.zeros((1, 64, 1, 576), jnp.float8_e4m3fn), lat, rope,
                                    np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        write_tokens_fp8_per_tensor(jnp.zeros((1, 64, 1, 576), jnp.bfloat16), lat, rope,
                                    np.zeros(2, np.int32), 1.0)


def test_write_tokens_fp8_per_tensor():
    lat, rope = _entries(5, seed=11)
    x = np.concatenate([lat, rope], axis=-1)
    k_scale = per_tensor_scale(x)
    cache = jnp.full((4, 64, 1, 576), 3.0, jnp.float8_e4m3fn)
    out = jax.jit(write_tokens_fp8_per_tensor)(cache, lat, rope, SLOTS, k_scale)
    assert out.dtype == jnp.float8_e4m3fn
    want = np.full((4 * 64, 576), 3.0, np.float32)
    rows = np.clip(x / np.float32(k_scale), -448, 448).astype(E4M3).astype(np.float32)
    for i, s in enumerate(SLOTS):
        if s >= 0:
            want[s] = rows[i]
    np.testing.assert_array_equal(_f32(out).reshape(-1, 576), want)


# ------------------------------------------------------------------------------------------------
# Donation: in place
# ------------------------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")


def _entry_ops_with_shape(hlo: str, shape):
    """(dtype, opcode) of the ENTRY computation's instructions whose result has ``shape``."""
    dims = ",".join(str(d) for d in shape)
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[:entry.index("\n}")]
    return [(m.group(1), m.group(3)) for m in map(_INSTR.match, entry.splitlines())
            if m and m.group(2) == dims]


def _step(cache, lat, rope, slots):
    return write_tokens_fp8(cache, lat, rope, slots)


def _step_pt(cache, lat, rope, slots, k_scale):
    return write_tokens_fp8_per_tensor(cache, lat, rope, slots, k_scale)


def test_donated_write_tokens_fp8_is_in_place():
    cache = jnp.zeros((64, 64, 1, 656), jnp.uint8)
    lat, rope = _entries(4, seed=12)
    slots = jnp.asarray([1, 700, -1, 4095], jnp.int32)
    step = jax.jit(_step, donate_argnums=0)
    compiled = step.lower(cache, lat, rope, slots).compile()
    hlo = compiled.as_text()
    assert "input_output_alias" in hlo
    # parameter -> one scatter fusion: no copy and no pool-sized temporary (uint8 scatters
    # natively on XLA:CPU, unlike bf16 / fp8, which it upcasts around the scatter).
    assert sorted(_entry_ops_with_shape(hlo, cache.shape)) == [("u8", "fusion"),
                                                               ("u8", "parameter")]
    assert compiled.memory_analysis().temp_size_in_bytes < cache.nbytes // 16
    before = cache.unsafe_buffer_pointer()
    out = step(cache, lat, rope, slots)
    assert out.unsafe_buffer_pointer() == before
    assert cache.is_deleted()
    # A second donated step on the result stays in the same buffer (done before np.asarray,
    # whose zero-copy host view would keep the buffer alive and force a copy).
    lat2, rope2 = _entries(4, seed=14)
    out = step(out, lat2, rope2, jnp.asarray([2, -5, 3, 64], jnp.int32))
    assert out.unsafe_buffer_pointer() == before
    rows = _ref_quantize(np.concatenate([lat, rope], axis=-1))
    rows2 = _ref_quantize(np.concatenate([lat2, rope2], axis=-1))
    got = np.asarray(out).reshape(-1, 656)
    np.testing.assert_array_equal(got[[1, 700, 4095]], rows[[0, 1, 3]])
    np.testing.assert_array_equal(got[[2, 3, 64]], rows2[[0, 2, 3]])
    assert np.count_nonzero(got) == np.count_nonzero(rows[[0, 1, 3]]) + \
        np.count_nonzero(rows2[[0, 2, 3]])


def test_donated_write_tokens_fp8_per_tensor_is_in_place():
    cache = jnp.zeros((64, 64, 1, 576), jnp.float8_e4m3fn)
    lat, rope = _entries(4, seed=13)
    slots = jnp.asarray([1, 700, -1, 4095], jnp.int32)
    step = jax.jit(_step_pt, donate_argnums=0)
    hlo = step.lower(cache, lat, rope, slots, jnp.float32(2.0)).compile().as_text()
    # XLA:CPU upcasts the fp8 pool to f16 around the scatter (a CPU artifact, as for bf16 in
    # kv_cache); the output still aliases the donated input and there is no explicit copy.
    assert "input_output_alias" in hlo
    assert not [o for o in _entry_ops_with_shape(hlo, cache.shape) if o[1] == "copy"]
    before = cache.unsafe_buffer_pointer()
    out = step(cache, lat, rope, slots, jnp.float32(2.0))
    assert out.unsafe_buffer_pointer() == before and cache.is_deleted()
    x = np.concatenate([lat, rope], axis=-1)
    want = np.clip(x / 2, -448, 448).astype(E4M3).astype(np.float32)
    np.testing.assert_array_equal(_f32(out).reshape(-1, 576)[[1, 700, 4095]], want[[0, 1, 3]])
