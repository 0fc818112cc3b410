// e4m3 -> bf16 dequantization for the FP8 KV-cache decode (decode_pipelined.cu's converter).
//
// Exact: the e4m3 bits move into a bf16 whose value is the e4m3 value times 2^-120 (zero,
// subnormals and normals alike), then one bf16 multiply by 2^120 * scale, exact whenever that
// factor is a bf16 (always for power-of-two scales and for 1). NaN codes (0x7F, 0xFF) decode as
// +-480 instead of NaN: no valid quantized value uses them.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

namespace jfm {
namespace fp8_detail {

constexpr uint32_t kPow2_120x2 = 0x7B807B80u;  // bf16x2 (2^120, 2^120)

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// prmt.b32 with selector nibbles whose bit 3 replicates the selected byte's sign over the output
// byte (__byte_perm does not promise that mode).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(d) : "r"(a), "r"(sel));
  return d;
}

// Four e4m3 codes (byte k of w = value k) -> two bf16x2 words (values 0,1 and 2,3) whose values
// are the e4m3 values times 2^-120. Each code becomes a sign-extended 16-bit lane; shifted left by
// 4, its exponent+mantissa bits land on bf16 bits 4..10 and the sign copies on bits 11..15, of
// which the mask keeps bit 15. e4m3 exponent field e becomes bf16 exponent field e: normals
// 2^(e-7)(1+m/8) -> 2^(e-127)(1+m/8), subnormals m 2^-9 -> m 2^-129 (bf16 subnormal), zero -> 0.
// Three integer ops per two values.
__device__ __forceinline__ void e4m3x4_scaled(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = (prmt(w, 0x9180u) << 4) & 0x87F087F0u;  // lanes: sext(byte 0), sext(byte 1)
  hi = (prmt(w, 0xB3A2u) << 4) & 0x87F087F0u;  // lanes: sext(byte 2), sext(byte 3)
}

// A scale s as the bf16x2 factor 2^120 * s when that is a finite bf16 (then one multiply per word
// is exact), else f2 = 0 and the slow path below. Computed once per scale, not per chunk.
struct ScaleFactor {
  uint32_t f2;
  float s;
};
__device__ __forceinline__ ScaleFactor scale_factor(float s) {
  const uint32_t fb = __float_as_uint(s * 0x1p120f);  // exact unless it overflows
  const bool exact = (fb & 0xFFFFu) == 0u && (fb & 0x7F800000u) != 0x7F800000u;
  return {exact ? (fb >> 16) | (fb & 0xFFFF0000u) : 0u, s};
}

// v = four bf16x2 words of e4m3 values times 2^-120 -> bf16 of (e4m3 value * s).
__device__ __forceinline__ void apply_scale(uint32_t (&v)[4], const ScaleFactor& f) {
  if (f.f2 != 0u) {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = bf16x2_mul(v[k], f.f2);
  } else {
    // Zero, large or non-bf16 scale (or NaN/inf): exact e4m3 values, scaled in float32, rounded
    // once.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t e = bf16x2_mul(v[k], kPow2_120x2);
      const float lo = __uint_as_float(e << 16) * f.s, hi = __uint_as_float(e & 0xFFFF0000u) * f.s;
      __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
      v[k] = *reinterpret_cast<uint32_t*>(&r);
    }
  }
}

// Eight e4m3 codes (two words) -> one 16-byte chunk of bf16 (four bf16x2 words) of value * s;
// kScaled = false means s == 1 (per-tensor caches fold their scale elsewhere).
template <bool kScaled>
__device__ __forceinline__ void dequant8(uint32_t w0, uint32_t w1, const ScaleFactor& f,
                                         uint32_t (&v)[4]) {
  e4m3x4_scaled(w0, v[0], v[1]);
  e4m3x4_scaled(w1, v[2], v[3]);
  if constexpr (kScaled) {
    apply_scale(v, f);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = bf16x2_mul(v[k], kPow2_120x2);
  }
}

}  // namespace fp8_detail
}  // namespace jfm
