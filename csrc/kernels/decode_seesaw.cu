// Split-KV MLA decode, sm_90a, "seesaw" schedule (v3): the two warpgroups take turns so that one
// runs softmax while the other keeps the tensor cores busy.
//
// Pages of a request are processed in pairs (b, b + 1): page b in smem buffer K0, page b + 1 in K1.
// Warpgroup 0 computes S0 = Q K0^T for all 64 keys of page b (wgmma m64n64), warpgroup 1 computes
// S1 = Q K1^T at the same time. Both share one running row max M in smem; each owns half of O
// (WG0 dims 0..255 "O_L", WG1 dims 256..511 "O_R") and a partial row sum:
//   WG0: M0 = max(M, rowmax S0); s0 = 2^(M - M0); P0 = 2^(S0 - M0); O_L *= s0     -> signal S0
//        O_L += P0 V0_L                        (overlaps WG1's softmax)
//        wait S1; O_L *= s1; O_L += P1 V1_L
//   WG1: wait S0; O_R *= s0; O_R += P0 V0_R    (overlaps its own softmax below)
//        M1 = max(M0, rowmax S1); s1 = 2^(M0 - M1); P1 = 2^(S1 - M1)                -> signal S1
//        O_R *= s1; O_R += P1 V1_R
// so after the pair both halves are at scale M1. P0 / P1 are stored (bf16) over the RoPE tile
// (tile 8) of their page's buffer, which no one reads after that page's QK^T. Buffers are refilled
// by the warpgroup that owns them (K0 by WG0, K1 by WG1) as soon as both warpgroups are done with
// them. Loads, masking, piece bookkeeping and the epilogue are shared with decode.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/decode_common.cuh"
#include "kernels/mla.h"

namespace jfm {
namespace {

using namespace decode_detail;

// Named barriers (0 is __syncthreads). "Arrive" by one warpgroup + "sync" by the other = 256.
constexpr int kBarWg0Loaded = 6;   // WG0 only (128): its K0 refill has landed
constexpr int kBarWg1Loaded = 7;   // WG1 only (128): its K1 refill has landed
constexpr int kBarS0 = 8;          // WG0 -> WG1: P0, M0, s0 published
constexpr int kBarS1 = 9;          // WG1 -> WG0: P1, M1, s1 published
constexpr int kBarK0Free = 10;     // WG1 -> WG0: WG1 no longer reads K0
constexpr int kBarK1Free = 11;     // WG0 -> WG1: WG0 no longer reads K1
constexpr int kWgThreads = 128;
constexpr int kPTileElem = 8 * (kColBlockBytes / 2);  // P lives in tile 8 of a K buffer

__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}

template <typename T>
struct SeesawSmem {
  T q[kTileElems];
  T k[2][kTileElems];
  float m[kBlockM];          // shared running row max (log2 units)
  float scale0[kBlockM];     // s0 of the current pair
  float scale1[kBlockM];     // s1 of the current pair
  float row_sum[2][kBlockM];
};
constexpr int kSeesawSmemBytes = (int)sizeof(SeesawSmem<__nv_bfloat16>) + kSmemAlign;
static_assert(kSeesawSmemBytes <= 232448, "exceeds the sm_90 per-block opt-in shared memory");

// S = Q K^T over all 64 keys of the page in `sk` (36 wgmma m64n64k16), waited for.
template <typename T>
__device__ __forceinline__ void qk_full(float (&s)[8][4], const T* sq, const T* sk) {
  float (&sf)[32] = reinterpret_cast<float(&)[32]>(s);
#pragma unroll
  for (int i = 0; i < 32; ++i) sf[i] = 0.f;
  const uint32_t q_base = smem_addr(sq), k_base = smem_addr(sk);
  fence_regs(sf);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kHeadDimQK / 16; ++kk) {
    const uint32_t off = (kk >> 2) * kColBlockBytes + (kk & 3) * 32;
    MmaOp<T>::qk(sf, smem_desc(q_base + off, 16, 1024), smem_desc(k_base + off, 16, 1024), 1);
  }
  wgmma_commit();
  wgmma_wait_all();
  fence_regs(sf);
}

// Issues O_half += P V_half (P from tile 8 of `sp_buf`, V = dims half*256.. of `sv`); not waited.
template <typename T>
__device__ __forceinline__ void pv_issue(float (&o)[32][4], const T* sp_buf, const T* sv,
                                         int half) {
  float (&of)[128] = reinterpret_cast<float(&)[128]>(o);
  const uint32_t p_base = smem_addr(sp_buf + kPTileElem);
  const uint32_t v_base = smem_addr(sv) + half * 4 * kColBlockBytes;
  fence_regs(of);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kPageSize / 16; ++ks) {
    MmaOp<T>::pv(of, smem_desc(p_base + ks * 32, 16, 1024),
                 smem_desc(v_base + ks * 16 * 128, kColBlockBytes, 1024));
  }
  wgmma_commit();
}

__device__ __forceinline__ void pv_wait(float (&o)[32][4]) {
  wgmma_wait_all();
  fence_regs(reinterpret_cast<float(&)[128]>(o));
}

__device__ __forceinline__ void scale_rows(float (&o)[32][4], float lo, float hi) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[j][0] *= lo;
    o[j][1] *= lo;
    o[j][2] *= hi;
    o[j][3] *= hi;
  }
}

// Masks S of page `blk` (select -inf past each row's border), returns the quad row maxima.
__device__ __forceinline__ void mask_and_max(float (&s)[8][4], int blk, const Piece& pc,
                                             float& mx_lo, float& mx_hi) {
  const int lane = threadIdx.x % 32;
  mx_lo = -INFINITY;
  mx_hi = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int key0 = blk * kPageSize + j * 8 + 2 * (lane % 4);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[j][e] = key0 + e < pc.border_lo ? s[j][e] : -INFINITY;
      s[j][2 + e] = key0 + e < pc.border_hi ? s[j][2 + e] : -INFINITY;
      mx_lo = fmaxf(mx_lo, s[j][e]);
      mx_hi = fmaxf(mx_hi, s[j][2 + e]);
    }
  }
  mx_lo = quad_max(mx_lo);
  mx_hi = quad_max(mx_hi);
}

// P = 2^(S * scale - m) into tile 8 of `sp_buf` (bf16/fp16); returns the thread's row sums.
template <typename T>
__device__ __forceinline__ void exp_and_store(const float (&s)[8][4], float scale_log2,
                                              float m_lo, float m_hi, T* sp_buf, int r_lo,
                                              int r_hi, float& sum_lo, float& sum_hi) {
  const int lane = threadIdx.x % 32;
  T* sp = sp_buf + kPTileElem;
  sum_lo = sum_hi = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float p0 = exp2f(fmaf(s[j][0], scale_log2, -m_lo));
    const float p1 = exp2f(fmaf(s[j][1], scale_log2, -m_lo));
    const float p2 = exp2f(fmaf(s[j][2], scale_log2, -m_hi));
    const float p3 = exp2f(fmaf(s[j][3], scale_log2, -m_hi));
    sum_lo += p0 + p1;
    sum_hi += p2 + p3;
    const int within = 2 * (lane % 4);
    *reinterpret_cast<uint32_t*>(sp + p_offset(r_lo, j) + within) = MmaOp<T>::pack(p0, p1);
    *reinterpret_cast<uint32_t*>(sp + p_offset(r_hi, j) + within) = MmaOp<T>::pack(p2, p3);
  }
  fence_proxy_async();  // P feeds wgmma (async proxy) of both warpgroups
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) seesaw_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t misalign = smem_addr(smem_raw) & (kSmemAlign - 1);
  SeesawSmem<T>& sm =
      *reinterpret_cast<SeesawSmem<T>*>(smem_raw + (misalign ? kSmemAlign - misalign : 0));

  const int mb = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp >> 2, rg = warp & 3;
  const int wg_tid = threadIdx.x % kWgThreads;
  const int m0 = mb * kBlockM;

  const int32_t* md = p.tile_md + (int64_t)part * kMetadataRow;
  const int begin_req = md[0];
  if (begin_req < 0 || begin_req >= p.b) return;
  const int end_req = min(md[1], p.b - 1);
  const int r_lo = rg * 16 + lane / 4, r_hi = r_lo + 8;
  const bool quad_leader = lane % 4 == 0;

  for (int req = begin_req; req <= end_req; ++req) {
    const Piece pc = make_piece(p, md, req, begin_req, end_req, m0, r_lo, r_hi);
    float o[32][4];
#pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_lo = kMaxInit, m_hi = kMaxInit, l_lo = 0.f, l_hi = 0.f;

    if (pc.start < pc.end) {
      load_q<T>(p, sm.q, req, kvh, m0);
      load_kv<T>(p, sm.k[0], req, kvh, pc.start, pc.seqlen);
      if (pc.start + 1 < pc.end) load_kv<T>(p, sm.k[1], req, kvh, pc.start + 1, pc.seqlen);
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
    }

    for (int b = pc.start; b < pc.end; b += 2) {
      const bool has1 = b + 1 < pc.end;
      const bool refill0 = b + 2 < pc.end, refill1 = b + 3 < pc.end;
      float s[8][4];
      if (wg == 0) {
        if (b > pc.start) {  // wait for this warpgroup's own refill of K0
          cp_async_wait<0>();
          fence_proxy_async();
          bar_sync(kBarWg0Loaded, kWgThreads);
        }
        qk_full<T>(s, sm.q, sm.k[0]);
        float mx_lo, mx_hi;
        mask_and_max(s, b, pc, mx_lo, mx_hi);
        const float new_lo = fmaxf(m_lo, mx_lo * p.scale_log2);
        const float new_hi = fmaxf(m_hi, mx_hi * p.scale_log2);
        const float s0_lo = exp2f(m_lo - new_lo), s0_hi = exp2f(m_hi - new_hi);
        float sum_lo, sum_hi;
        exp_and_store<T>(s, p.scale_log2, new_lo, new_hi, sm.k[0], r_lo, r_hi, sum_lo, sum_hi);
        l_lo = l_lo * s0_lo + sum_lo;
        l_hi = l_hi * s0_hi + sum_hi;
        scale_rows(o, s0_lo, s0_hi);
        if (quad_leader) {
          sm.m[r_lo] = new_lo;
          sm.m[r_hi] = new_hi;
          sm.scale0[r_lo] = s0_lo;
          sm.scale0[r_hi] = s0_hi;
        }
        bar_arrive(kBarS0, kThreads);
        pv_issue<T>(o, sm.k[0], sm.k[0], 0);  // O_L += P0 V0_L, overlapping WG1's softmax
        bar_sync(kBarS1, kThreads);
        const float s1_lo = sm.scale1[r_lo], s1_hi = sm.scale1[r_hi];
        m_lo = sm.m[r_lo];
        m_hi = sm.m[r_hi];
        pv_wait(o);
        scale_rows(o, s1_lo, s1_hi);
        l_lo *= s1_lo;
        l_hi *= s1_hi;
        if (has1) {
          pv_issue<T>(o, sm.k[1], sm.k[1], 0);  // O_L += P1 V1_L
          pv_wait(o);
        }
        if (refill1) bar_arrive(kBarK1Free, kThreads);
        if (refill0) {
          bar_sync(kBarK0Free, kThreads);
          load_kv<T>(p, sm.k[0], req, kvh, b + 2, pc.seqlen, wg_tid, kWgThreads);
          cp_async_commit();
        }
      } else {
        if (has1) {
          if (b > pc.start) {  // wait for this warpgroup's own refill of K1
            cp_async_wait<0>();
            fence_proxy_async();
            bar_sync(kBarWg1Loaded, kWgThreads);
          }
          qk_full<T>(s, sm.q, sm.k[1]);
        }
        bar_sync(kBarS0, kThreads);
        const float m0_lo = sm.m[r_lo], m0_hi = sm.m[r_hi];
        const float s0_lo = sm.scale0[r_lo], s0_hi = sm.scale0[r_hi];
        scale_rows(o, s0_lo, s0_hi);
        l_lo *= s0_lo;
        l_hi *= s0_hi;
        pv_issue<T>(o, sm.k[0], sm.k[0], 1);  // O_R += P0 V0_R, overlapping the softmax below
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        if (has1) mask_and_max(s, b + 1, pc, mx_lo, mx_hi);
        const float new_lo = fmaxf(m0_lo, mx_lo * p.scale_log2);
        const float new_hi = fmaxf(m0_hi, mx_hi * p.scale_log2);
        const float s1_lo = exp2f(m0_lo - new_lo), s1_hi = exp2f(m0_hi - new_hi);
        float sum_lo = 0.f, sum_hi = 0.f;
        if (has1) {
          exp_and_store<T>(s, p.scale_log2, new_lo, new_hi, sm.k[1], r_lo, r_hi, sum_lo, sum_hi);
        }
        l_lo = l_lo * s1_lo + sum_lo;
        l_hi = l_hi * s1_hi + sum_hi;
        m_lo = new_lo;
        m_hi = new_hi;
        if (quad_leader) {
          sm.m[r_lo] = new_lo;
          sm.m[r_hi] = new_hi;
          sm.scale1[r_lo] = s1_lo;
          sm.scale1[r_hi] = s1_hi;
        }
        bar_arrive(kBarS1, kThreads);
        pv_wait(o);
        if (refill0) bar_arrive(kBarK0Free, kThreads);
        scale_rows(o, s1_lo, s1_hi);
        if (has1) {
          pv_issue<T>(o, sm.k[1], sm.k[1], 1);  // O_R += P1 V1_R
          pv_wait(o);
        }
        if (refill1) {
          bar_sync(kBarK1Free, kThreads);
          load_kv<T>(p, sm.k[1], req, kvh, b + 3, pc.seqlen, wg_tid, kWgThreads);
          cp_async_commit();
        }
      }
    }

    // ---- epilogue: both halves are at the same scale; add the two partial row sums ------
    l_lo = quad_sum(l_lo);
    l_hi = quad_sum(l_hi);
    if (quad_leader) {
      sm.row_sum[wg][r_lo] = l_lo;
      sm.row_sum[wg][r_hi] = l_hi;
    }
    __syncthreads();
    const float L_lo = sm.row_sum[0][r_lo] + sm.row_sum[1][r_lo];
    const float L_hi = sm.row_sum[0][r_hi] + sm.row_sum[1][r_hi];
    store_result<T>(p, pc, o, L_lo, L_hi, m_lo, m_hi, req, kvh, m0, r_lo, r_hi, wg, wg == 0);
    __syncthreads();  // row sums and buffers are reused by the next request
  }
}

template <typename T>
cudaError_t launch_seesaw_t(const DecodeParams& p, cudaStream_t stream) {
  static_assert(kThreads == 2 * kWgThreads, "two warpgroups");
  const dim3 grid((p.q_rows + kBlockM - 1) / kBlockM, p.h_kv, p.num_parts);
  seesaw_kernel<T><<<grid, kThreads, kSeesawSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t prepare_seesaw(ElemType t) {
  return t == ElemType::kBF16
             ? cudaFuncSetAttribute(seesaw_kernel<__nv_bfloat16>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSeesawSmemBytes)
             : cudaFuncSetAttribute(seesaw_kernel<__half>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSeesawSmemBytes);
}

cudaError_t launch_seesaw(const DecodeParams& p, ElemType t, cudaStream_t stream) {
  return t == ElemType::kBF16 ? launch_seesaw_t<__nv_bfloat16>(p, stream)
                              : launch_seesaw_t<__half>(p, stream);
}

}  // namespace jfm
