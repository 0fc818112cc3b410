// Merges the split-KV pieces of split requests: one warp per (request, kv head, folded row).
// Pieces carry base-2 lse and normalized fp32 partial outputs; empty pieces have lse = -inf and
// o = 0, so they drop out. The final lse is natural-log; a row with nothing gets out 0, lse +inf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/mla.h"

namespace jfm {
namespace {

constexpr int kWarps = 8;
constexpr float kLn2 = 0.69314718055994530942f;

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) combine_kernel(const __grid_constant__ DecodeParams p) {
  const int req = blockIdx.x, kvh = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.z * kWarps + warp;
  if (row >= p.q_rows) return;
  const int num_slots = p.b + p.num_parts;
  const int first = max(p.num_splits[req], 0);
  const int last = min(p.num_splits[req + 1], num_slots);
  if (last - first <= 1) return;  // unsplit: the decode kernel wrote out/lse directly

  // Piece s of this row lives at lse_accum[s * slot_stride + row_offset] (same for o_accum x 512).
  const int64_t slot_stride = (int64_t)p.h_kv * p.q_rows;
  const int64_t row_offset = (int64_t)kvh * p.q_rows + row;
  const float* lse_row = p.lse_accum + row_offset;
  float mx = -INFINITY;
  for (int s = first + lane; s < last; s += 32) mx = fmaxf(mx, lse_row[s * slot_stride]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  const bool empty = mx == -INFINITY;
  const float m = empty ? 0.f : mx;
  float sum = 0.f;
  for (int s = first + lane; s < last; s += 32) sum += exp2f(lse_row[s * slot_stride] - m);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float global_lse = (empty || !(sum > 0.f)) ? INFINITY : log2f(sum) + m;

  // Each lane owns 16 of the 512 channels: four float4 at lane*4 + 128*i.
  float acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  if (global_lse != INFINITY) {
    for (int s = first; s < last; ++s) {
      const float w = exp2f(lse_row[s * slot_stride] - global_lse);
      const float4* src = reinterpret_cast<const float4*>(
          p.o_accum + (s * slot_stride + row_offset) * kHeadDimV);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 v = src[lane + 32 * i];
        acc[4 * i + 0] += w * v.x;
        acc[4 * i + 1] += w * v.y;
        acc[4 * i + 2] += w * v.z;
        acc[4 * i + 3] += w * v.w;
      }
    }
  }
  const int tok = row / p.ng, h = kvh * p.ng + row % p.ng;
  T* out = static_cast<T*>(p.out) + (((int64_t)req * p.s_q + tok) * p.h_q + h) * kHeadDimV;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int col = 4 * (lane + 32 * i);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[col + j] = from_float<T>(acc[4 * i + j]);
  }
  if (lane == 0) {
    p.lse[((int64_t)req * p.h_q + h) * p.s_q + tok] =
        global_lse == INFINITY ? INFINITY : global_lse * kLn2;
  }
}

template <typename T>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.b, p.h_kv, (p.q_rows + kWarps - 1) / kWarps);
  combine_kernel<T><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine(const DecodeParams& p, ElemType t, cudaStream_t stream) {
  return t == ElemType::kBF16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace jfm
