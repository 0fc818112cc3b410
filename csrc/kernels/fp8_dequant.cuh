// e4m3 -> bf16 dequantization for the FP8 KV-cache decode (decode_pipelined.cu's converter).
//
// Exact: the e4m3 bits move into a bf16 whose value is the e4m3 value times 2^-120 (zero,
// subnormals and normals alike), then one bf16 multiply by 2^120 * scale, exact for power-of-two
// scales and for 1 (see scale_factor for the rest). NaN codes (0x7F, 0xFF) decode as
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

// A scale s is applied as one bf16x2 multiply by 2^120 * bf16(s) when that factor is a finite
// bf16 (s < 2^8), else (kTwice) as an exact multiply by 2^120 and one by bf16(s). Either way the
// product is exact for power-of-two scales (DeepSeek V3.2's) and for any bf16 scale whose product
// is a bf16; other scales are rounded to bf16 first (relative error <= 2^-8 in all).
// s as bf16 bits (round to nearest even). Volatile, so that the compiler keeps the conversion
// where it is written: decode_pipelined.cu's converter places it after a barrier wait, under
// which the load of s completes.
__device__ __forceinline__ uint32_t bf16_bits(float s) {
  uint16_t b;
  asm volatile("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(b) : "f"(s));
  return b;
}
// Whether bf16 bits `sb` need the kTwice form (2^120 * s not a finite bf16: s >= 2^8, inf, NaN).
__device__ __forceinline__ bool needs_twice(uint32_t sb) { return ((sb >> 7) & 0xFFu) > 254u - 120u; }
// The bf16x2 factor for bf16 bits `sb` (see above).
template <bool kTwice>
__device__ __forceinline__ uint32_t scale_factor(uint32_t sb) {
  const uint32_t s2 = sb | (sb << 16);
  return kTwice ? s2 : bf16x2_mul(s2, kPow2_120x2);
}

// Eight e4m3 codes (two words) -> one 16-byte chunk of bf16 (four bf16x2 words) of value * s,
// f2 = scale_factor<false>(s); kScaled = false means s == 1 (per-tensor caches fold their scale
// elsewhere). The kTwice form's second multiply is the caller's (decode_pipelined.cu's
// rescale_row), so that the common case's conversion has one copy.
template <bool kScaled>
__device__ __forceinline__ void dequant8(uint32_t w0, uint32_t w1, uint32_t f2, uint32_t (&v)[4]) {
  e4m3x4_scaled(w0, v[0], v[1]);
  e4m3x4_scaled(w1, v[2], v[3]);
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = bf16x2_mul(v[k], kScaled ? f2 : kPow2_120x2);
}

}  // namespace fp8_detail
}  // namespace jfm
