// Split-KV MLA decode, sm_90a.
//
// Grid (m_blocks, h_kv, num_parts); 256 threads = 8 warps = 2 warpgroups. A CTA walks the
// requests of its scheduler part (one 64-row m-block of one KV head) and, per 64-token KV page:
//   S = Q K^T   warpgroup ch computes keys ch*32..+31 for all 64 rows; warp rg of it owns rows
//               rg*16..+15 (the accumulator layout of mma.sync m16n8 and of wgmma m64nN agree)
//   online softmax in log2 units; warp rg of each warpgroup exchange row maxima through smem
//   O += P V    warpgroup ch owns dims ch*256..+255 of O (128 fp32 regs/thread)
// Two MMA back ends share everything else: kWgmma = false uses per-warp mma.sync + ldmatrix
// (v1); kWgmma = true uses wgmma with operands read straight from smem (v2).
// K and V are the same smem tile (V = the first 512 channels; an MN-major view for PV).
// Pages are loaded with cp.async, double buffered; tokens at or past seqlen, and pages whose id
// is out of range, are zero-filled instead of read, so NaN/garbage never enters the arithmetic and
// nothing outside the cache is touched. Masked logits are *selected* to -inf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/decode_common.cuh"
#include "kernels/mla.h"

namespace jfm {
namespace {

using namespace decode_detail;

// Every tile is a multiple of 1024 bytes, so an aligned base keeps all of them aligned.
template <typename T>
struct Smem {
  T q[kTileElems];
  T k[2][kTileElems];
  T p[kBlockM * kPageSize];
  float row_max[2][kBlockM];
  float row_sum[2][kBlockM];
};
constexpr int kSmemBytes = (int)sizeof(Smem<__nv_bfloat16>) + kSmemAlign;  // + alignment slack
static_assert(kSmemBytes <= 232448, "exceeds the sm_90 per-block opt-in shared memory");

template <typename T, bool kWgmma>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t misalign = smem_addr(smem_raw) & (kSmemAlign - 1);
  Smem<T>& sm = *reinterpret_cast<Smem<T>*>(smem_raw + (misalign ? kSmemAlign - misalign : 0));

  const int mb = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = warp & 3, ch = warp >> 2;
  const int m0 = mb * kBlockM;
  const int rows_here = min(kBlockM, p.q_rows - m0);
  // mma.sync warps whose 16 rows are all padding skip their MMAs; a warpgroup always runs.
  const bool warp_active = kWgmma || rg * 16 < rows_here;

  const int32_t* md = p.tile_md + (int64_t)part * kMetadataRow;
  const int begin_req = md[0];
  if (begin_req < 0 || begin_req >= p.b) return;
  const int end_req = min(md[1], p.b - 1);

  // This thread's two rows (mma accumulator rows g and g + 8 of its row group).
  const int r_lo = rg * 16 + lane / 4, r_hi = r_lo + 8;

  for (int req = begin_req; req <= end_req; ++req) {
    const Piece pc = make_piece(p, md, req, begin_req, end_req, m0, r_lo, r_hi);
    const int seqlen = pc.seqlen, start = pc.start, end = pc.end;
    const int border_lo = pc.border_lo, border_hi = pc.border_hi;

    float o[32][4];
#pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_lo = kMaxInit, m_hi = kMaxInit, l_lo = 0.f, l_hi = 0.f;

    if (start < end) {
      load_q<T>(p, sm.q, req, kvh, m0);
      load_kv<T>(p, sm.k[0], req, kvh, start, seqlen);
      cp_async_commit();
    }
    for (int blk = start; blk < end; ++blk) {
      const int buf = (blk - start) & 1;
      if (blk + 1 < end) {
        load_kv<T>(p, sm.k[buf ^ 1], req, kvh, blk + 1, seqlen);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      if (kWgmma) fence_proxy_async();
      __syncthreads();
      const T* sk = sm.k[buf];

      if (warp_active) {
        // ---- S = Q K^T for rows rg*16.., keys ch*32.. ------------------------------------
        float s[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        const int mi = lane / 8, r8 = lane % 8;
        const int a_row = rg * 16 + (mi & 1) * 8 + r8;
        if constexpr (kWgmma) {
          float (&sf)[16] = reinterpret_cast<float(&)[16]>(s);
          const uint32_t q_base = smem_addr(sm.q), k_base = smem_addr(sk) + ch * 32 * 128;
          fence_regs(sf);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kHeadDimQK / 16; ++kk) {
            const uint32_t off = (kk >> 2) * kColBlockBytes + (kk & 3) * 32;
            MmaOp<T>::qk(sf, smem_desc(q_base + off, 16, 1024), smem_desc(k_base + off, 16, 1024),
                         1);
          }
          wgmma_commit();
          wgmma_wait_all();
          fence_regs(sf);
        } else {
#pragma unroll 4
          for (int kk = 0; kk < kHeadDimQK / 16; ++kk) {
            uint32_t a[4];
            ldmatrix_x4(a, smem_addr(sm.q + tile_offset(a_row, 2 * kk + (mi >> 1))));
#pragma unroll
            for (int nt = 0; nt < 4; nt += 2) {
              uint32_t b[4];
              const int key = ch * 32 + (nt + (mi >> 1)) * 8 + r8;
              ldmatrix_x4(b, smem_addr(sk + tile_offset(key, 2 * kk + (mi & 1))));
              MmaOp<T>::run(s[nt], a, b[0], b[1]);
              MmaOp<T>::run(s[nt + 1], a, b[2], b[3]);
            }
          }
        }

        // ---- mask (select), row max across the warp pair -------------------------------
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int key0 = blk * kPageSize + ch * 32 + nt * 8 + 2 * (lane % 4);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            s[nt][j] = key0 + j < border_lo ? s[nt][j] : -INFINITY;
            s[nt][2 + j] = key0 + j < border_hi ? s[nt][2 + j] : -INFINITY;
            mx_lo = fmaxf(mx_lo, s[nt][j]);
            mx_hi = fmaxf(mx_hi, s[nt][2 + j]);
          }
        }
        mx_lo = quad_max(mx_lo);
        mx_hi = quad_max(mx_hi);
        if (lane % 4 == 0) {
          sm.row_max[ch][r_lo] = mx_lo;
          sm.row_max[ch][r_hi] = mx_hi;
        }
        pair_sync(rg);
        mx_lo = fmaxf(sm.row_max[0][r_lo], sm.row_max[1][r_lo]);
        mx_hi = fmaxf(sm.row_max[0][r_hi], sm.row_max[1][r_hi]);
        const float new_lo = fmaxf(m_lo, mx_lo * p.scale_log2);
        const float new_hi = fmaxf(m_hi, mx_hi * p.scale_log2);
        const float alpha_lo = exp2f(m_lo - new_lo), alpha_hi = exp2f(m_hi - new_hi);
        m_lo = new_lo;
        m_hi = new_hi;

        // ---- P = exp2(S * scale_log2 - m); partial row sums; P to smem -------------------
        float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const float p0 = exp2f(fmaf(s[nt][0], p.scale_log2, -m_lo));
          const float p1 = exp2f(fmaf(s[nt][1], p.scale_log2, -m_lo));
          const float p2 = exp2f(fmaf(s[nt][2], p.scale_log2, -m_hi));
          const float p3 = exp2f(fmaf(s[nt][3], p.scale_log2, -m_hi));
          sum_lo += p0 + p1;
          sum_hi += p2 + p3;
          const int col = ch * 32 + nt * 8 + 2 * (lane % 4);
          *reinterpret_cast<uint32_t*>(sm.p + p_offset(r_lo, col / 8) + col % 8) =
              MmaOp<T>::pack(p0, p1);
          *reinterpret_cast<uint32_t*>(sm.p + p_offset(r_hi, col / 8) + col % 8) =
              MmaOp<T>::pack(p2, p3);
        }
        l_lo = l_lo * alpha_lo + sum_lo;
        l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[j][0] *= alpha_lo;
          o[j][1] *= alpha_lo;
          o[j][2] *= alpha_hi;
          o[j][3] *= alpha_hi;
        }
        if constexpr (kWgmma) {
          fence_proxy_async();  // P feeds wgmma, and each warpgroup reads all 64 rows of it
          asm volatile("bar.sync 5, %0;\n" :: "n"(kThreads));
        } else {
          pair_sync(rg);  // a warp reads only its own 16 rows of P, written by its pair
        }

        // ---- O += P V for dims ch*256.. ---------------------------------------------------
        if constexpr (kWgmma) {
          pv_issue<T>(o, sm.p, sk, ch);
          pv_wait(o);
        } else {
#pragma unroll
          for (int ks = 0; ks < kPageSize / 16; ++ks) {
            uint32_t a[4];
            ldmatrix_x4(a, smem_addr(sm.p + p_offset(a_row, 2 * ks + (mi >> 1))));
            const int key = ks * 16 + (mi & 1) * 8 + r8;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              uint32_t b[4];
              ldmatrix_x4_trans(b, smem_addr(sk + tile_offset(key, ch * 32 + 2 * j + (mi >> 1))));
              MmaOp<T>::run(o[2 * j], a, b[0], b[1]);
              MmaOp<T>::run(o[2 * j + 1], a, b[2], b[3]);
            }
          }
        }
      }
      __syncthreads();  // the buffer just used is refilled by the next iteration
    }

    if (!warp_active) continue;
    // ---- epilogue: total row sums across the quad and the warp pair -----------------------
    l_lo = quad_sum(l_lo);
    l_hi = quad_sum(l_hi);
    if (lane % 4 == 0) {
      sm.row_sum[ch][r_lo] = l_lo;
      sm.row_sum[ch][r_hi] = l_hi;
    }
    pair_sync(rg);
    const float L_lo = sm.row_sum[0][r_lo] + sm.row_sum[1][r_lo];
    const float L_hi = sm.row_sum[0][r_hi] + sm.row_sum[1][r_hi];
    pair_sync(rg);  // row_sum is reused by the next request
    store_result<T>(p, pc, o, L_lo, L_hi, m_lo, m_hi, req, kvh, m0, r_lo, r_hi, ch, ch == 0);
  }
}

template <typename T>
cudaError_t set_smem_attr() {
  cudaError_t err = cudaFuncSetAttribute(decode_kernel<T, false>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(decode_kernel<T, true>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
}

template <typename T>
cudaError_t launch(const DecodeParams& p, DecodeVariant v, cudaStream_t stream) {
  const dim3 grid((p.q_rows + kBlockM - 1) / kBlockM, p.h_kv, p.num_parts);
  if (v == DecodeVariant::kWgmma) {
    decode_kernel<T, true><<<grid, kThreads, kSmemBytes, stream>>>(p);
  } else {
    decode_kernel<T, false><<<grid, kThreads, kSmemBytes, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t prepare_decode(ElemType t) {
  cudaError_t err =
      t == ElemType::kBF16 ? set_smem_attr<__nv_bfloat16>() : set_smem_attr<__half>();
  if (err == cudaSuccess) err = prepare_seesaw(t);
  if (err == cudaSuccess) err = prepare_narrow(t);
  return err != cudaSuccess ? err : prepare_pipelined(t);
}

cudaError_t launch_decode(const DecodeParams& p, ElemType t, DecodeVariant v,
                          cudaStream_t stream) {
  if (v == DecodeVariant::kSeesaw) return launch_seesaw(p, t, stream);
  if (v == DecodeVariant::kPipelined) return launch_pipelined(p, t, stream);
  if (v == DecodeVariant::kNarrow) return launch_narrow(p, t, stream);
  return t == ElemType::kBF16 ? launch<__nv_bfloat16>(p, v, stream)
                              : launch<__half>(p, v, stream);
}

}  // namespace jfm
