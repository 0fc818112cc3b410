// Instruction-fetch probe (run.sh icache-probe): cycles per instruction of straight-line FFMA
// code as its size grows, to see where code the size of the decode kernel's per-pair stream
// (~30-40 KB per SM sub-partition, executed once per ~6k-cycle pair) stops fitting the
// instruction caches (perf-notes v5.8: in the decode, ncu counts fetch stalls as a small part).
// One CTA per SM of 128 or 256 threads: 1 warp per sub-partition, or 2 (warpgroups 0 and 1,
// each running its own copy of the body, as the decode kernel's two warpgroups run different
// code). Each warp keeps 8 independent FFMA chains, so dependencies do not limit the rate.
#include <cstdio>
#include <cuda_runtime.h>

constexpr int kReps = 16;

template <int kBlocks>
__device__ __forceinline__ void body(float (&v)[8], float b, float c) {
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
#pragma unroll
    for (int k = 0; k < 8; ++k) asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(v[k]) : "f"(b), "f"(c));
  }
}

// kBlocks blocks of 8 FFMAs = 128 bytes of code each (one instruction-cache line).
template <int kBlocks>
__global__ void fetch_kernel(float b, float c, float* sink, long long* cycles) {
  float v[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = threadIdx.x * 1e-3f + k;
  __syncthreads();
  const long long t0 = clock64();
#pragma unroll 1
  for (int r = 0; r < kReps; ++r) {
    if (threadIdx.x < 128) {
      body<kBlocks>(v, b, c);
    } else {
      body<kBlocks>(v, c, b);  // a second copy of the code for the second warpgroup
    }
  }
  __syncthreads();
  const long long t1 = clock64();
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) acc += v[k];
  if (acc == 1234.5f) sink[threadIdx.x] = acc;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int kBlocks>
void run(int threads, int sms, float* sink, long long* d_cycles) {
  fetch_kernel<kBlocks><<<sms, threads>>>(0.999f, 1e-3f, sink, d_cycles);
  fetch_kernel<kBlocks><<<sms, threads>>>(0.999f, 1e-3f, sink, d_cycles);
  static long long h[1024];
  cudaMemcpy(h, d_cycles, sms * sizeof(long long), cudaMemcpyDeviceToHost);
  double mean = 0;
  for (int i = 0; i < sms; ++i) mean += h[i];
  mean /= sms;
  const int warps_per_smsp = threads / 128;
  const double instr = (double)kReps * kBlocks * 8 * warps_per_smsp;  // per sub-partition
  printf("ICACHE body %4d KB x %d copies, warps/SMSP %d: %.2f cycles per instruction per SMSP\n",
         kBlocks * 128 / 1024, warps_per_smsp, warps_per_smsp, mean / instr);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* sink;
  long long* d_cycles;
  cudaMalloc(&sink, 1024 * sizeof(float));
  cudaMalloc(&d_cycles, 1024 * sizeof(long long));
  for (int threads : {128, 256}) {
    run<16>(threads, sms, sink, d_cycles);    // 2 KB
    run<64>(threads, sms, sink, d_cycles);    // 8 KB
    run<128>(threads, sms, sink, d_cycles);   // 16 KB
    run<256>(threads, sms, sink, d_cycles);   // 32 KB
    run<512>(threads, sms, sink, d_cycles);   // 64 KB
    run<768>(threads, sms, sink, d_cycles);   // 96 KB
    run<1024>(threads, sms, sink, d_cycles);  // 128 KB
  }
  const cudaError_t err = cudaDeviceSynchronize();
  printf("ICACHE status: %s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
