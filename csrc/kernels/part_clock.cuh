// Per-CTA clock probe (build with -DJFM_PART_TIMES, tests/gpu/run.sh part-times; never in a
// shipped build). Thread 0 of every decode CTA stores %globaltimer (ns) and its SM id when the
// CTA starts and when its consumers are done with their last request. After a launch made while
// JFM_PART_TIMES_PRINT is set (and not "0") in the environment, the host prints one JFM_PART line
// per CTA: with the schedule's pages and pieces per part, that gives what a page and a piece cost
// and which part ends the launch (tests/gpu/part_times.py). The host reads the stamps after the
// launch, so XLA's command buffers must be off.
#pragma once

#ifdef JFM_PART_TIMES
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace jfm {
namespace {  // one copy per translation unit (each kernel file is its own CUDA module)
namespace part_clock {

constexpr int kMaxCtas = 8192;
__device__ unsigned long long g_begin_ns[kMaxCtas], g_end_ns[kMaxCtas];
__device__ unsigned int g_smid[kMaxCtas];

__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
__device__ __forceinline__ int cta_index() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}
__device__ __forceinline__ void stamp_begin() {
  const int i = cta_index();
  if (threadIdx.x != 0 || i >= kMaxCtas) return;
  unsigned int smid;
  asm volatile("mov.u32 %0, %%smid;\n" : "=r"(smid));
  g_smid[i] = smid;
  g_begin_ns[i] = globaltimer_ns();
}
__device__ __forceinline__ void stamp_end() {
  const int i = cta_index();
  if (threadIdx.x == 0 && i < kMaxCtas) g_end_ns[i] = globaltimer_ns();
}

// Prints the stamps of the launch just made on `stream` (grid `grid`) if the environment asks.
inline void print_if_asked(cudaStream_t stream, const char* kernel, dim3 grid) {
  const char* ask = std::getenv("JFM_PART_TIMES_PRINT");
  if (ask == nullptr || *ask == '\0' || (ask[0] == '0' && ask[1] == '\0')) return;
  cudaStreamCaptureStatus status;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess ||
      status != cudaStreamCaptureStatusNone || cudaStreamSynchronize(stream) != cudaSuccess) {
    return;
  }
  const int n = (int)std::min<long long>((long long)grid.x * grid.y * grid.z, kMaxCtas);
  std::vector<unsigned long long> begin(n), end(n);
  std::vector<unsigned int> smid(n);
  if (cudaMemcpyFromSymbol(begin.data(), g_begin_ns, n * sizeof(begin[0])) != cudaSuccess ||
      cudaMemcpyFromSymbol(end.data(), g_end_ns, n * sizeof(end[0])) != cudaSuccess ||
      cudaMemcpyFromSymbol(smid.data(), g_smid, n * sizeof(smid[0])) != cudaSuccess) {
    return;
  }
  std::printf("JFM_PART_LAUNCH %s %u %u %u\n", kernel, grid.x, grid.y, grid.z);
  for (int i = 0; i < n; ++i) std::printf("JFM_PART %d %u %llu %llu\n", i, smid[i], begin[i], end[i]);
  std::fflush(stdout);
}

}  // namespace part_clock
}  // namespace
}  // namespace jfm

#define JFM_PART_BEGIN() ::jfm::part_clock::stamp_begin()
#define JFM_PART_END() ::jfm::part_clock::stamp_end()
#else
#define JFM_PART_BEGIN() ((void)0)
#define JFM_PART_END() ((void)0)
#endif
