// e4m3 -> bf16 dequantization shared by the FP8 decode kernels (decode_fp8.cu, decode_pipelined.cu).
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

// x holds two e4m3 codes in bits 8..15 and 24..31 (the other bits zero). Returns the bf16x2 whose
// halves are those values times 2^-120: the sign stays the top bit and the 7 exponent+mantissa
// bits move to bf16 bits 4..10. Exponent field e of e4m3 becomes bf16 exponent field e: normals
// 2^(e-7)(1+m/8) -> 2^(e-127)(1+m/8), subnormals m 2^-9 -> m 2^-129 (bf16 subnormal), zero -> 0.
__device__ __forceinline__ uint32_t e4m3x2_scaled_bits(uint32_t x) {
  return ((x >> 4) & 0x07F007F0u) | (x & 0x80008000u);
}

// Four e4m3 codes (byte k of w = value k) -> two bf16x2 words (values 0,1 and 2,3), times 2^-120.
__device__ __forceinline__ void e4m3x4_scaled(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = e4m3x2_scaled_bits(__byte_perm(w, 0u, 0x1404u));  // byte 0 -> bits 8..15, 1 -> 24..31
  hi = e4m3x2_scaled_bits(__byte_perm(w, 0u, 0x3424u));  // byte 2 -> bits 8..15, 3 -> 24..31
}

// v = four bf16x2 words of e4m3 values times 2^-120 -> bf16 of (e4m3 value * s).
__device__ __forceinline__ void apply_scale(uint32_t (&v)[4], float s) {
  const uint32_t fb = __float_as_uint(s * 0x1p120f);  // exact unless it overflows
  if ((fb & 0xFFFFu) == 0u && (fb & 0x7F800000u) != 0x7F800000u) {
    // 2^120 * s is a finite bf16: one rounding (none for a power-of-two s).
    const uint32_t f2 = (fb >> 16) | (fb & 0xFFFF0000u);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = bf16x2_mul(v[k], f2);
  } else {
    // Large or non-bf16 scale (or NaN/inf): exact e4m3 values, scaled in float32, rounded once.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t e = bf16x2_mul(v[k], kPow2_120x2);
      const float lo = __uint_as_float(e << 16) * s, hi = __uint_as_float(e & 0xFFFF0000u) * s;
      __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
      v[k] = *reinterpret_cast<uint32_t*>(&r);
    }
  }
}

// Eight e4m3 codes (two words) -> one 16-byte chunk of bf16 (four bf16x2 words) of value * s;
// kScaled = false means s == 1 (per-tensor caches fold their scale elsewhere).
template <bool kScaled>
__device__ __forceinline__ void dequant8(uint32_t w0, uint32_t w1, float s, uint32_t (&v)[4]) {
  e4m3x4_scaled(w0, v[0], v[1]);
  e4m3x4_scaled(w1, v[2], v[3]);
  if constexpr (kScaled) {
    apply_scale(v, s);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = bf16x2_mul(v[k], kPow2_120x2);
  }
}

}  // namespace fp8_detail
}  // namespace jfm
