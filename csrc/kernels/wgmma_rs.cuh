// wgmma (sm_90a) with A from registers ("RS"): D (fp32) += A (4 x 32-bit registers per thread,
// the mma.sync m16n8k16 A-fragment layout per warp) * B (shared-memory descriptor). Shapes: the
// wide kernels' m64n64k16 (QK^T) and m64n256k16 (PV), and the narrow kernel's m64nNk16 with N = 16
// or 32 query rows (decode_narrow.cu: M = 64 keys or 64 latent channels).
// A fragment of thread (warp w, lane l), rows w*16 + l/4 (+8), k columns 2*(l%4) (+8):
//   a[0] = (row, k..k+1), a[1] = (row + 8, k..k+1), a[2] = (row, k+8..k+9), a[3] = (row + 8, k+8..)
// which is also how the fp32 accumulator of an m64nN wgmma lies, so S = Q K^T can feed P V
// without a trip through shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace jfm {

#define JFM_ACC8(d, i)                                                                        \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])

// m64n64k16, B K-major (QK^T: B = a K tile). Accumulates.
#define JFM_RS_N64(TY)                                                                             \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                  \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"  \
      "%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"                \
      : JFM_ACC8(d, 0), JFM_ACC8(d, 8), JFM_ACC8(d, 16), JFM_ACC8(d, 24)                         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

// m64n256k16, B MN-major (PV: B = V, a transposed view of a K buffer). Accumulates.
#define JFM_RS_N256(TY)                                                                            \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " "                                 \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"  \
      "%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,"  \
      "%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,"  \
      "%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,"  \
      "%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,"     \
      "%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,"    \
      "%126,%127}, {%128,%129,%130,%131}, %132, p, 1, 1, 1;\n}\n"                                \
      : JFM_ACC8(d, 0), JFM_ACC8(d, 8), JFM_ACC8(d, 16), JFM_ACC8(d, 24), JFM_ACC8(d, 32),       \
        JFM_ACC8(d, 40), JFM_ACC8(d, 48), JFM_ACC8(d, 56), JFM_ACC8(d, 64), JFM_ACC8(d, 72),     \
        JFM_ACC8(d, 80), JFM_ACC8(d, 88), JFM_ACC8(d, 96), JFM_ACC8(d, 104), JFM_ACC8(d, 112),   \
        JFM_ACC8(d, 120)                                                                         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

// m64n16k16 / m64n32k16, B K-major; accumulates if `accumulate`.
#define JFM_RS_N16(TY)                                                                       \
  asm volatile(                                                                            \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"                                           \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                            \
      "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"                    \
      : JFM_ACC8(d, 0)                                                                     \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))
#define JFM_RS_N32(TY)                                                                       \
  asm volatile(                                                                            \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                           \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                            \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, " \
      "1, 1, 0;\n}\n"                                                                        \
      : JFM_ACC8(d, 0), JFM_ACC8(d, 8)                                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

// T: __nv_bfloat16 or __half (A's and B's type; the asm string needs it as a literal).
#define JFM_RS_BY_TYPE(SHAPE)                             \
  if constexpr (std::is_same<T, __nv_bfloat16>::value) { \
    SHAPE("bf16");                                        \
  } else {                                                \
    SHAPE("f16");                                         \
  }

template <typename T>
__device__ __forceinline__ void wgmma_rs_m64n64k16(float (&d)[32], const uint32_t (&a)[4],
                                                   uint64_t desc_b) {
  JFM_RS_BY_TYPE(JFM_RS_N64)
}
template <typename T>
__device__ __forceinline__ void wgmma_rs_m64n256k16_tnsp_b(float (&d)[128], const uint32_t (&a)[4],
                                                           uint64_t desc_b) {
  JFM_RS_BY_TYPE(JFM_RS_N256)
}
// D (64 x N fp32) = A * B (K-major) + (accumulate ? D : 0), N = 16 or 32. Accumulator i of thread
// (warp w, lane l): row w*16 + l/4 + 8*((i%4)/2), column 8*(i/4) + 2*(l%4) + i%2.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_narrow(float (&d)[N / 2], const uint32_t (&a)[4],
                                                uint64_t desc_b, int accumulate = 1) {
  static_assert(N == 16 || N == 32, "narrow wgmma: N is 16 or 32");
  if constexpr (N == 16) {
    JFM_RS_BY_TYPE(JFM_RS_N16)
  } else {
    JFM_RS_BY_TYPE(JFM_RS_N32)
  }
}

#undef JFM_RS_BY_TYPE
#undef JFM_RS_N16
#undef JFM_RS_N32
#undef JFM_RS_N64
#undef JFM_RS_N256
#undef JFM_ACC8

}  // namespace jfm
