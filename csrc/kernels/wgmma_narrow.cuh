// wgmma m64nNk16 with A from registers and B K-major from shared memory, N = 16 or 32: the MMA shape
// of the narrow decode kernel (decode_narrow.cu), where M = 64 keys (S^T = K Q^T) or 64 latent
// channels (O^T = V^T P^T) and N = the query rows of one KV head.
// A fragment as in wgmma_rs.cuh; accumulator i of thread (warp w, lane l): row w*16 + l/4 +
// 8*((i%4)/2), column 8*(i/4) + 2*(l%4) + i%2.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace jfm {

#define JFM_NARROW_ACC8(d, i)                                                                  \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])

#define JFM_RS_N16(TY)                                                                       \
  asm volatile(                                                                            \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"                                           \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                            \
      "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"                    \
      : JFM_NARROW_ACC8(d, 0)                                                              \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

#define JFM_RS_N32(TY)                                                                       \
  asm volatile(                                                                            \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                           \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                            \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, " \
      "1, 1, 0;\n}\n"                                                                        \
      : JFM_NARROW_ACC8(d, 0), JFM_NARROW_ACC8(d, 8)                                         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

// D (64 x N fp32) = A (registers) * B (descriptor, K-major) + (accumulate ? D : 0). T:
// __nv_bfloat16 or __half.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_narrow(float (&d)[N / 2], const uint32_t (&a)[4],
                                                uint64_t desc_b, int accumulate = 1) {
  static_assert(N == 16 || N == 32, "narrow wgmma: N is 16 or 32");
  if constexpr (N == 16) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      JFM_RS_N16("bf16");
    } else {
      JFM_RS_N16("f16");
    }
  } else {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      JFM_RS_N32("bf16");
    } else {
      JFM_RS_N32("f16");
    }
  }
}

#undef JFM_RS_N16
#undef JFM_RS_N32
#undef JFM_NARROW_ACC8

}  // namespace jfm
