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
        exp_and_store<T>(s, p.scale_log2, new_lo, new_hi, sm.k[0] + kPTileElem, r_lo, r_hi, sum_lo, sum_hi);
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
        pv_issue<T>(o, sm.k[0] + kPTileElem, sm.k[0], 0);  // O_L += P0 V0_L, overlapping WG1's softmax
        bar_sync(kBarS1, kThreads);
        const float s1_lo = sm.scale1[r_lo], s1_hi = sm.scale1[r_hi];
        m_lo = sm.m[r_lo];
        m_hi = sm.m[r_hi];
        pv_wait(o);
        scale_rows(o, s1_lo, s1_hi);
        l_lo *= s1_lo;
        l_hi *= s1_hi;
        if (has1) {
          pv_issue<T>(o, sm.k[1] + kPTileElem, sm.k[1], 0);  // O_L += P1 V1_L
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
        pv_issue<T>(o, sm.k[0] + kPTileElem, sm.k[0], 1);  // O_R += P0 V0_R, overlapping the softmax below
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        if (has1) mask_and_max(s, b + 1, pc, mx_lo, mx_hi);
        const float new_lo = fmaxf(m0_lo, mx_lo * p.scale_log2);
        const float new_hi = fmaxf(m0_hi, mx_hi * p.scale_log2);
        const float s1_lo = exp2f(m0_lo - new_lo), s1_hi = exp2f(m0_hi - new_hi);
        float sum_lo = 0.f, sum_hi = 0.f;
        if (has1) {
          exp_and_store<T>(s, p.scale_log2, new_lo, new_hi, sm.k[1] + kPTileElem, r_lo, r_hi, sum_lo, sum_hi);
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
          pv_issue<T>(o, sm.k[1] + kPTileElem, sm.k[1], 1);  // O_R += P1 V1_R
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
