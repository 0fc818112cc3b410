// Microbenchmark of the wgmma shapes the v4 decode kernel issues, with its descriptors, in
// isolation: cycles per instruction for chains of SS m64n64k16 (QK^T), SS m64n256k16 with MN-major
// B (PV from smem) and RS m64n256k16 (PV with P in registers), from one or two warpgroups.
// Every CTA of a full-chip grid runs the loop; CTA 0's clock64 deltas are printed.
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -O3 -I csrc tests/gpu/wgmma_rate.cu
#include <cuda_bf16.h>
#include <cstdio>

#include "kernels/decode_common.cuh"

using namespace jfm;
using namespace jfm::decode_detail;

__device__ __forceinline__ void pv_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
#define R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), \
              "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"
      "%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,"
      "%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,"
      "%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,"
      "%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,"
      "%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, "
      "{%128,%129,%130,%131}, %132, 1, 1, 1, 1;\n}\n"
      : R8(0), R8(8), R8(16), R8(24), R8(32), R8(40), R8(48), R8(56), R8(64), R8(72), R8(80),
        R8(88), R8(96), R8(104), R8(112), R8(120)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
#undef R8
}

enum Kind { kQkSS = 0, kPvSS = 1, kPvRS = 2 };
constexpr int kIters = 64;

template <int K>
__global__ void __launch_bounds__(256, 1) rate_kernel(int nwg, unsigned long long* out) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  // Small random-ish bf16 values (never zeros).
  for (int i = threadIdx.x; i < 200 * 1024 / 4; i += blockDim.x) {
    const uint32_t h = (i * 2654435761u) >> 16;
    const __nv_bfloat16 v0 = __float2bfloat16(((h & 255) - 128) / 512.f + 0.001f);
    const __nv_bfloat16 v1 = __float2bfloat16((((h >> 8) & 255) - 128) / 512.f + 0.002f);
    uint32_t w = (uint32_t)__bfloat16_as_ushort(v0) | ((uint32_t)__bfloat16_as_ushort(v1) << 16);
    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(base + 4 * i), "r"(w));
  }
  fence_proxy_async();
  __syncthreads();
  const int wg = threadIdx.x / 128;
  if (wg >= nwg) return;
  // Layout as in the decode kernel: Q at 0 (72 KB), K at 72 KB (72 KB), P at 144 KB (8 KB);
  // the second warpgroup uses K' at 152 KB ... well within 200 KB (it reads Q's tiles too).
  const uint32_t q = base, k = base + (wg ? 147456 - 73728 : 73728), p = base + 147456 + 8192 * wg;
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  unsigned long long t0 = clock64();
  for (int it = 0; it < kIters; ++it) {
    fence_regs(acc);
    wgmma_fence();
    if constexpr (K == kQkSS) {
      float (&s)[32] = reinterpret_cast<float(&)[32]>(acc);
#pragma unroll
      for (int kk = 0; kk < 36; ++kk) {
        const uint32_t off = (kk >> 2) * kColBlockBytes + (kk & 3) * 32;
        MmaOp<__nv_bfloat16>::qk(s, smem_desc(q + off, 16, 1024), smem_desc(k + off, 16, 1024), 1);
      }
    } else if constexpr (K == kPvSS) {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        MmaOp<__nv_bfloat16>::pv(acc, smem_desc(p + ks * 32, 16, 1024),
                                 smem_desc(k + ks * 16 * 128, kColBlockBytes, 1024));
    } else {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) pv_rs(acc, a, smem_desc(k + ks * 16 * 128, kColBlockBytes, 1024));
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(acc);
  }
  unsigned long long t1 = clock64();
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 128; ++i) sum += acc[i];
  if (threadIdx.x % 128 == 0 && blockIdx.x == 0) out[wg] = t1 - t0;
  if (sum == 12345.f) out[3] = 1;  // keeps the accumulators live
}

template <int K>
void run(const char* name, int nwg, int per_iter_mmas, double ideal_cycles_per_mma) {
  unsigned long long* d;
  cudaMalloc(&d, 4 * sizeof(unsigned long long));
  cudaMemset(d, 0, 4 * sizeof(unsigned long long));
  const int smem = 201 * 1024 + 1024;
  cudaFuncSetAttribute(rate_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  for (int rep = 0; rep < 2; ++rep) rate_kernel<K><<<132, 256, smem>>>(nwg, d);
  cudaError_t e = cudaDeviceSynchronize();
  unsigned long long h[4];
  cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost);
  const double per = (double)h[0] / (kIters * per_iter_mmas);
  printf("WGMMA_RATE %-28s wgs=%d  %8.1f cycles/mma (ideal %5.1f per warpgroup alone)  %s\n", name,
         nwg, per, ideal_cycles_per_mma, e == cudaSuccess ? "" : cudaGetErrorString(e));
  cudaFree(d);
}

int main() {
  run<kQkSS>("QK SS m64n64k16 x36", 1, 36, 32);
  run<kQkSS>("QK SS m64n64k16 x36", 2, 36, 32);
  run<kPvSS>("PV SS m64n256k16 tnspB x4", 1, 4, 128);
  run<kPvSS>("PV SS m64n256k16 tnspB x4", 2, 4, 128);
  run<kPvRS>("PV RS m64n256k16 tnspB x4", 1, 4, 128);
  run<kPvRS>("PV RS m64n256k16 tnspB x4", 2, 4, 128);
  return 0;
}
