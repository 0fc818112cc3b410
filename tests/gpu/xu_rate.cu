// Softmax instruction rates in isolation (run.sh xu-rate): SM cycles per warp instruction on
// one SM sub-partition, for the instructions of the decode kernels' softmax: ex2.approx (MUFU),
// cvt.rn.bf16x2.f32 (F2FP, P's packing), both interleaved, FFMA, and a degree-3 polynomial 2^x
// on the FMA pipe (FlashAttention-4's, perf-notes v5.8). One CTA per SM, 1 or 2 warps per
// sub-partition, 8 independent chains per thread so that latency is hidden.
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

constexpr int kIters = 2048;
constexpr int kChains = 8;

enum Op { kEx2, kCvt, kEx2Cvt, kFfma, kPoly };

__device__ __forceinline__ float poly_exp2(float x) {
  const float xc = fmaxf(x, -127.f);
  const float t = xc + 12582912.f;
  const float j = t - 12582912.f;
  const float f = xc - j;
  float p = fmaf(0.05500871f, f, 0.24221069f);
  p = fmaf(p, f, 0.6932829f);
  p = fmaf(p, f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

template <Op kOp>
__global__ void rate_kernel(float seed, float* sink, long long* cycles) {
  float v[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) v[c] = seed * (threadIdx.x + c) * 1e-3f - 1.f;
  __syncthreads();
  const long long t0 = clock64();
#pragma unroll 1
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {
      if constexpr (kOp == kEx2) {
        asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(v[c]));
      } else if constexpr (kOp == kCvt) {
        uint32_t r;
        asm volatile("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(r) : "f"(v[c]));
        v[c] = __uint_as_float(r);
      } else if constexpr (kOp == kEx2Cvt) {
        uint32_t r;
        asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(v[c]));
        asm volatile("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(r) : "f"(v[c]));
        v[c] = __uint_as_float(r);
      } else if constexpr (kOp == kFfma) {
        asm volatile("fma.rn.f32 %0, %0, %0, %0;" : "+f"(v[c]));
      } else {
        v[c] = poly_exp2(v[c] * -1e-3f);
        asm volatile("" : "+f"(v[c]));
      }
    }
  }
  __syncthreads();
  const long long t1 = clock64();
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) acc += v[c];
  if (acc == 12345.f) sink[threadIdx.x] = acc;  // keeps the work
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <Op kOp>
void run(const char* name, int threads, int sms, float* sink, long long* d_cycles) {
  rate_kernel<kOp><<<sms, threads>>>(1.f, sink, d_cycles);  // warm-up
  rate_kernel<kOp><<<sms, threads>>>(1.f, sink, d_cycles);
  long long h[1024];
  cudaMemcpy(h, d_cycles, sms * sizeof(long long), cudaMemcpyDeviceToHost);
  double mean = 0;
  for (int i = 0; i < sms; ++i) mean += h[i];
  mean /= sms;
  const int warps_per_smsp = threads / 32 / 4;
  const double instr = (double)kIters * kChains * warps_per_smsp;
  printf("XU_RATE %-8s warps/SMSP %d: %.2f cycles per warp instruction per SMSP\n", name,
         warps_per_smsp, mean / instr);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* sink;
  long long* d_cycles;
  cudaMalloc(&sink, 1024 * sizeof(float));
  cudaMalloc(&d_cycles, 1024 * sizeof(long long));
  for (int threads : {128, 256}) {
    run<kEx2>("ex2", threads, sms, sink, d_cycles);
    run<kCvt>("cvt", threads, sms, sink, d_cycles);
    run<kEx2Cvt>("ex2+cvt", threads, sms, sink, d_cycles);  // counts ex2/cvt pairs
    run<kFfma>("ffma", threads, sms, sink, d_cycles);
    run<kPoly>("poly", threads, sms, sink, d_cycles);  // counts 2^x values
  }
  const cudaError_t err = cudaDeviceSynchronize();
  printf("XU_RATE status: %s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
