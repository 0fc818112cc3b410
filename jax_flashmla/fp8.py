"""FP8 (e4m3) latent KV-cache helpers: the 656-byte "FP8 with scale" format and per-tensor FP8.

Two formats, both pure JAX (jittable, any leading shape):

**FP8 with scale** (FlashMLA's DeepSeek-V3.2 sparse-decode cache, ``d_qk = 576``): 656 bytes per
token, stored as ``uint8`` (``int8`` and ``float8_e4m3fn`` views of the same bytes are accepted by
the readers)::

    bytes   0 .. 511   512 x float8_e4m3fn   NoPE part (latent channels 0..511), quantized
    bytes 512 .. 527     4 x float32 (LE)    one scale per 128-channel tile (tile t: channels
                                             128t .. 128t+127)
    bytes 528 .. 655    64 x bfloat16 (LE)   RoPE part (channels 512..575), not quantized

Dequantized value of NoPE channel ``c``: ``float(fp8[c]) * scale[c // 128]``. Quantization
follows FlashMLA's ``tests/quant.py``: per tile, ``scale = max|x| / 448`` rounded *up* to a power
of two, ``2 ** ceil(log2(max(scale, 1e-4)))``, and ``q = float8_e4m3fn(x / scale)`` (round to
nearest even). Because every scale is a power of two, ``x / scale`` and ``fp8 * scale`` only move
the exponent: they are exact (no rounding) in float32, and the dequantized ``fp8 * scale`` is
exactly representable in bf16 (bf16 has float32's exponent range), so a kernel that dequantizes
into bf16 gets bit-identical values to :func:`dequantize_fp8_with_scale`. The only rounding is the
float8 cast itself (3 mantissa bits: relative error <= 2^-4 for normal e4m3 values).

656 = 41 * 16, so each token starts 16-byte aligned in a page of ``[64, 1, 656]`` bytes. The paged
cache is ``uint8 [num_pages, 64, 1, 656]`` with the slot convention of :mod:`.kv_cache`
(``slot = page * 64 + offset``, negative = not written).

**Per-tensor FP8** (FlashMLA's unmerged PR54 dense-FP8 path): ``float8_e4m3fn [..., 576]`` holding
``saturate(x / k_scale)`` for one float32 ``k_scale`` per tensor (the kernel's ``descale_k``).
:func:`per_tensor_scale` picks ``max|x| / 448``.

Numerics worth knowing:

- e4m3fn has no infinity: a float32 -> e4m3fn cast turns ``|v| >= 464`` into NaN. The
  with-scale path never gets there (``|x / scale| <= 448`` by construction); the per-tensor path
  clips to +-448 first (saturation).
- e4m3 normals start at 2^-6; below that (after dividing by the scale) values are subnormal with
  a fixed step of 2^-9, i.e. lower relative precision, and ``|x / scale| <= 2^-10`` flushes to 0.
  With per-tile scaling (``max|x| / scale`` in (224, 448] above the floor), elements below roughly
  ``2^-14 * max|x|`` of their tile are subnormal.
  The ``1e-4`` floor (scale >= 2^-13) means tiles with ``max|x| < 0.0547`` do not use the full
  e4m3 range; ``|x| < 2^-23`` in such tiles becomes 0.
- An all-zero tile gets scale 2^-13 and fp8 zeros; NaN / inf inputs give a NaN / inf scale
  (NaN is propagated, as in FlashMLA's reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .kv_cache import PAGE_SIZE, _like, _pages_of, check_token_entries, slot_indices

#: Bytes per token of the "FP8 with scale" layout.
FP8_WITH_SCALE_BYTES = 656
#: Quantized (NoPE / latent) channels and unquantized (RoPE) channels.
NOPE_DIM = 512
ROPE_DIM = 64
HEAD_DIM = NOPE_DIM + ROPE_DIM  # 576
#: Channels per float32 scale.
SCALE_TILE = 128
NUM_TILES = NOPE_DIM // SCALE_TILE  # 4
#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: Floor of a per-tile scale before rounding up to a power of two (FlashMLA's FP8_AMAX_MARGIN).
SCALE_FLOOR = 1e-4
#: Byte offsets inside one 656-byte token.
SCALE_OFFSET = NOPE_DIM                        # 512
ROPE_OFFSET = SCALE_OFFSET + 4 * NUM_TILES     # 528

_STORAGE_DTYPES = (jnp.uint8, jnp.int8, jnp.float8_e4m3fn)


# ------------------------------------------------------------------------------------------------
# FP8 with scale (656 bytes per token)
# ------------------------------------------------------------------------------------------------
def _round_up_pow2(s):
    """``2 ** ceil(log2(s))`` for positive normal float32 ``s``, exactly (bit arithmetic).

    Adding the all-ones mantissa carries into the exponent unless the mantissa is already 0.
    Non-finite ``s`` (from NaN / inf inputs) is returned as is.
    """
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    up = (bits + jnp.uint32(0x007FFFFF)) & jnp.uint32(0xFF800000)
    return jnp.where(jnp.isfinite(s), jax.lax.bitcast_convert_type(up, jnp.float32), s)


def _to_bytes(x):
    """``[..., k]`` of an ``m``-byte dtype -> uint8 ``[..., k * m]`` (little-endian byte order)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    if b.ndim == x.ndim:                                   # 1-byte dtypes keep their shape
        return b
    return b.reshape(*x.shape[:-1], x.shape[-1] * b.shape[-1])


def _from_bytes(b, dtype):
    """uint8 ``[..., k * m]`` -> ``[..., k]`` of the ``m``-byte ``dtype``."""
    m = jnp.dtype(dtype).itemsize
    if m == 1:
        return jax.lax.bitcast_convert_type(b, dtype)
    return jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], b.shape[-1] // m, m), dtype)


def fp8_with_scale_scales(kv):
    """float32 ``[..., 4]`` power-of-two scales that :func:`quantize_fp8_with_scale` stores."""
    x = jnp.asarray(kv)[..., :NOPE_DIM].astype(jnp.float32)
    tiles = x.reshape(*x.shape[:-1], NUM_TILES, SCALE_TILE)
    amax = jnp.max(jnp.abs(tiles), axis=-1)
    return _round_up_pow2(jnp.maximum(amax / FP8_MAX, jnp.float32(SCALE_FLOOR)))


def quantize_fp8_with_scale(kv):
    """``[..., 576]`` (bf16 / fp16 / f32) -> uint8 ``[..., 656]`` in the FP8-with-scale layout.

    Bytes 0..511: ``float8_e4m3fn(x[..., :512] / scale)``; bytes 512..527: the 4 float32 scales
    (one per 128-channel tile, ``2 ** ceil(log2(max(max|x_tile| / 448, 1e-4)))``); bytes
    528..655: ``x[..., 512:]`` cast to bf16. Power-of-two scales make the division (and the
    dequantizing multiply) exact, so the float8 cast is the only rounding of the NoPE part.
    """
    kv = jnp.asarray(kv)
    if kv.ndim < 1 or kv.shape[-1] != HEAD_DIM:
        raise ValueError(f"kv must be [..., {HEAD_DIM}], got {tuple(kv.shape)}")
    lead = kv.shape[:-1]
    x = kv[..., :NOPE_DIM].astype(jnp.float32).reshape(*lead, NUM_TILES, SCALE_TILE)
    scales = fp8_with_scale_scales(kv)                                   # [..., 4]
    q = (x / scales[..., None]).astype(jnp.float8_e4m3fn).reshape(*lead, NOPE_DIM)
    rope = kv[..., NOPE_DIM:].astype(jnp.bfloat16)
    return jnp.concatenate([_to_bytes(q), _to_bytes(scales), _to_bytes(rope)], axis=-1)


def _as_u8(cache):
    cache = jnp.asarray(cache)
    if cache.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"FP8-with-scale storage must be uint8, int8 or float8_e4m3fn, "
                        f"got {cache.dtype}")
    return cache if cache.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(cache, jnp.uint8)


def split_fp8_with_scale(cache_u8):
    """Views of a ``[..., 656]`` byte array: (fp8 ``[..., 512]``, f32 scales ``[..., 4]``,
    bf16 rope ``[..., 64]``)."""
    b = _as_u8(cache_u8)
    if b.ndim < 1 or b.shape[-1] != FP8_WITH_SCALE_BYTES:
        raise ValueError(f"FP8-with-scale rows must be [..., {FP8_WITH_SCALE_BYTES}] bytes, "
                         f"got {tuple(b.shape)}")
    q = _from_bytes(b[..., :SCALE_OFFSET], jnp.float8_e4m3fn)
    scales = _from_bytes(b[..., SCALE_OFFSET:ROPE_OFFSET], jnp.float32)
    rope = _from_bytes(b[..., ROPE_OFFSET:], jnp.bfloat16)
    return q, scales, rope


def dequantize_fp8_with_scale(cache_u8, dtype=jnp.bfloat16):
    """uint8 / int8 / float8_e4m3fn ``[..., 656]`` -> ``[..., 576]`` of ``dtype``.

    NoPE: ``float32(fp8) * scale`` per 128-channel tile; RoPE: the stored bf16 values. Computed in
    float32 and cast once to ``dtype`` (exact for bf16 and f32 outputs, see the module note).
    """
    q, scales, rope = split_fp8_with_scale(cache_u8)
    lead = q.shape[:-1]
    nope = q.astype(jnp.float32).reshape(*lead, NUM_TILES, SCALE_TILE) * scales[..., None]
    out = jnp.concatenate([nope.reshape(*lead, NOPE_DIM), rope.astype(jnp.float32)], axis=-1)
    return out.astype(dtype)


# ------------------------------------------------------------------------------------------------
# Per-tensor FP8
# ------------------------------------------------------------------------------------------------
def _scalar_scale(k_scale):
    s = jnp.asarray(k_scale, jnp.float32)
    if s.size != 1:
        raise ValueError(f"k_scale must be a scalar (or shape [1]), got shape {tuple(s.shape)}")
    return s.reshape(())


def per_tensor_scale(kv):
    """float32 scalar ``max(max|kv| / 448, 1e-8)``: the smallest scale that does not saturate."""
    amax = jnp.max(jnp.abs(jnp.asarray(kv).astype(jnp.float32)))
    return jnp.maximum(amax / FP8_MAX, jnp.float32(1e-8))


def quantize_fp8_per_tensor(kv, k_scale):
    """``float8_e4m3fn(clip(kv / k_scale, -448, 448))``, same shape as ``kv``.

    The clip saturates values that would overflow (a plain cast would give NaN for ``|v| >= 464``);
    NaN inputs stay NaN. Dequantize with ``fp8 * k_scale`` (the kernel's ``descale_k``).
    """
    s = _scalar_scale(k_scale)
    v = jnp.asarray(kv).astype(jnp.float32) / s
    return jnp.clip(v, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def dequantize_fp8_per_tensor(kv8, k_scale, dtype=jnp.bfloat16):
    """``float32(kv8) * k_scale`` cast to ``dtype``; ``kv8`` may also be a uint8 / int8 view."""
    kv8 = jnp.asarray(kv8)
    if kv8.dtype in (jnp.uint8, jnp.int8):
        kv8 = jax.lax.bitcast_convert_type(kv8, jnp.float8_e4m3fn)
    if kv8.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"kv8 must be float8_e4m3fn (or a uint8 / int8 view), got {kv8.dtype}")
    return (kv8.astype(jnp.float32) * _scalar_scale(k_scale)).astype(dtype)


# ------------------------------------------------------------------------------------------------
# Paged-cache writers
# ------------------------------------------------------------------------------------------------
def write_tokens_fp8(cache_u8, latent, rope, slot_mapping=None, *, block_ids=None, offsets=None):
    """Quantizes ``n`` tokens into the FP8-with-scale layout and writes them into a paged cache.

    Args:
      cache_u8: ``[num_pages, 64, 1, 656]`` uint8 (or int8 / float8_e4m3fn storage of the same
        bytes), or a :class:`PagedMLACache` wrapping one; the result has the same type and dtype.
      latent: ``[n, 512]`` normalized ``c_kv`` (quantized per 128-channel tile, see
        :func:`quantize_fp8_with_scale`).
      rope: ``[n, 64]`` roped ``k_pe`` (stored as bf16).
      slot_mapping: int ``[n]``, ``page * 64 + offset``; negative entries are skipped.
      block_ids, offsets: alternative to ``slot_mapping``; a negative block id is skipped.

    Pure JAX scatter of whole 656-byte rows: in place when the jitted step donates the cache.
    Duplicate slots in one call write an unspecified one of the duplicates.
    """
    pages = _pages_of(cache_u8)
    num_pages, page, h_kv, d = pages.shape
    if (page, h_kv, d) != (PAGE_SIZE, 1, FP8_WITH_SCALE_BYTES):
        raise ValueError(f"cache must be [num_pages, {PAGE_SIZE}, 1, {FP8_WITH_SCALE_BYTES}], "
                         f"got {tuple(pages.shape)}")
    if pages.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"cache storage must be uint8, int8 or float8_e4m3fn, got {pages.dtype}")
    latent, rope = jnp.asarray(latent), jnp.asarray(rope)
    check_token_entries(latent, rope)
    blk, off = slot_indices(slot_mapping, block_ids, offsets, latent.shape[0], num_pages)
    rows = quantize_fp8_with_scale(jnp.concatenate(
        [latent.astype(jnp.float32), rope.astype(jnp.float32)], axis=-1))
    if pages.dtype != jnp.uint8:
        rows = jax.lax.bitcast_convert_type(rows, pages.dtype)
    pages = pages.at[blk, off, 0].set(rows, mode="drop", indices_are_sorted=False,
                                      unique_indices=False)
    return _like(cache_u8, pages)


def write_tokens_fp8_per_tensor(cache8, latent, rope, slot_mapping=None, k_scale=None, *,
                                block_ids=None, offsets=None):
    """Writes ``float8_e4m3fn(saturate([latent | rope] / k_scale))`` into a paged FP8 cache.

    ``cache8`` is ``float8_e4m3fn [num_pages, 64, 1, 576]`` (or a :class:`PagedMLACache` wrapping
    one); slots as in :func:`write_tokens_fp8`. Both the latent and the rope part use the same
    per-tensor ``k_scale`` (float32 scalar or shape ``[1]``, required; see
    :func:`per_tensor_scale`). In place when the jitted step donates the cache.
    """
    if k_scale is None:
        raise ValueError("k_scale is required")
    pages = _pages_of(cache8)
    num_pages, page, h_kv, d = pages.shape
    if (page, h_kv, d) != (PAGE_SIZE, 1, HEAD_DIM):
        raise ValueError(f"cache must be [num_pages, {PAGE_SIZE}, 1, {HEAD_DIM}], "
                         f"got {tuple(pages.shape)}")
    if pages.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"cache must be float8_e4m3fn, got {pages.dtype}")
    latent, rope = jnp.asarray(latent), jnp.asarray(rope)
    check_token_entries(latent, rope)
    blk, off = slot_indices(slot_mapping, block_ids, offsets, latent.shape[0], num_pages)
    rows = quantize_fp8_per_tensor(jnp.concatenate(
        [latent.astype(jnp.float32), rope.astype(jnp.float32)], axis=-1), k_scale)
    pages = pages.at[blk, off, 0].set(rows, mode="drop", indices_are_sorted=False,
                                      unique_indices=False)
    return _like(cache8, pages)


__all__ = [
    "FP8_MAX",
    "FP8_WITH_SCALE_BYTES",
    "NOPE_DIM",
    "ROPE_DIM",
    "SCALE_TILE",
    "dequantize_fp8_per_tensor",
    "dequantize_fp8_with_scale",
    "fp8_with_scale_scales",
    "per_tensor_scale",
    "quantize_fp8_per_tensor",
    "quantize_fp8_with_scale",
    "split_fp8_with_scale",
    "write_tokens_fp8",
    "write_tokens_fp8_per_tensor",
]
