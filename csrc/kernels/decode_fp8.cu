// Split-KV MLA decode over an FP8 KV cache, sm_90a (issue 5).
//
// Same grid, scheduling, softmax, masking and epilogue as the wgmma (v2) kernel of decode.cu:
// grid (m_blocks, h_kv, num_parts), 256 threads = 2 warpgroups; per 64-token page
//   S = Q K^T   wgmma m64n32k16, warpgroup ch takes keys ch*32..+31 (36 k-steps over 576 channels)
//   softmax     online, log2 units; the two warpgroups exchange row maxima through smem
//   O += P V    wgmma m64n256k16, warpgroup ch owns output dims ch*256..+255; V is an MN-major view
//               of the same bf16 K tile
// All MMAs are bf16: each page is dequantized into ONE bf16 K tile in the 128-byte-swizzle layout
// (tile_offset), so the wgmma descriptors are those of the bf16 kernel.
//
// Pipeline. The raw FP8 bytes of pages i+1 and i+2 stream (cp.async) into two staging buffers
// while page i is computed from the bf16 tile; after PV of page i all threads dequantize page i+1
// from its staging buffer into the tile, and the freed staging buffer takes page i+3.
//   with scale: the staging row is the 512 e4m3 bytes + 4 float32 scales (528 B); the 64 bf16
//     RoPE values need no conversion and go straight (cp.async) into one of two RoPE column
//     blocks. The RoPE block of page i holds P of page i after its QK (as in the seesaw kernel), so
//     the RoPE of page i+2 can only be requested after PV of page i.
//   per tensor: the staging row is all 576 e4m3 bytes; NoPE and RoPE are dequantized.
// Shared memory: Q 72 KiB + NoPE tile 64 KiB + 2 RoPE blocks 16 KiB + 2 staging pages 72 KiB
// + row stats 1 KiB = 225 KiB (+ 1 KiB alignment slack).
//
// Dequantization is exact: e4m3 -> bf16 by bit moves (the value times 2^-120, exact for zero,
// subnormals and normals) and one bf16 multiply by 2^120 * scale, exact whenever that factor is a
// bf16 (always for the format's power-of-two scales and for the per-tensor path); otherwise the
// exact e4m3 value is multiplied by the scale in float32 and rounded once to bf16. NaN codes (0x7F,
// 0xFF) decode as +-480 instead of NaN: no valid quantized value uses them.
// Per tensor, K is NOT multiplied by kv_scale: S = kv_scale * (Q . K8), so the softmax uses
// scale_log2 * kv_scale, and O = kv_scale * (P . V8) is scaled once in the epilogue.
//
// Tokens at or past seqlen and pages whose id is out of range are zero-filled by cp.async
// (src-size 0: never read), and zero bytes dequantize to zeros, so garbage (including e4m3 NaN
// codes) never reaches the arithmetic and nothing outside the cache is read.
#include <cuda_bf16.h>

#include "kernels/decode_common.cuh"
#include "kernels/decode_fp8.h"
#include "kernels/fp8_dequant.cuh"
#include "kernels/mla.h"

namespace jfm {
namespace {

// Only the shared helpers named here (decode_detail is being extended by other kernels; importing
// names one by one keeps later additions from clashing with this file's).
using decode_detail::cp_async_16;
using decode_detail::cp_async_commit;
using decode_detail::cp_async_wait;
using decode_detail::fence_proxy_async;
using decode_detail::fence_regs;
using decode_detail::kColBlockBytes;
using decode_detail::kMaxInit;
using decode_detail::kSmemAlign;
using decode_detail::kThreads;
using decode_detail::kTileElems;
using decode_detail::load_q;
using decode_detail::make_piece;
using decode_detail::MmaOp;
using decode_detail::p_offset;
using decode_detail::pair_sync;
using decode_detail::Piece;
using decode_detail::quad_max;
using decode_detail::quad_sum;
using decode_detail::smem_addr;
using decode_detail::smem_desc;
using decode_detail::store_result;
using decode_detail::tile_offset;
using decode_detail::wgmma_commit;
using decode_detail::wgmma_fence;
using decode_detail::wgmma_wait_all;
using bf16 = __nv_bfloat16;
using namespace fp8_detail;

constexpr int kNopeDim = kHeadDimV;                       // 512 quantized channels
constexpr int kColElems = kColBlockBytes / 2;              // one [64 x 64] bf16 column block
constexpr int kNopeBlocks = kNopeDim / 64;                 // 8
constexpr int kWsStageRow = kNopeDim + 16;                 // with scale: e4m3 + 4 float32 scales
constexpr int kWsRopeOffset = kWsStageRow;                 // RoPE bytes within a 656-byte token
constexpr int kStageBytes = kPageSize * kFp8PerTensorBytes;  // >= kPageSize * kWsStageRow

static_assert(kWsStageRow % 16 == 0 && kFp8WithScaleBytes % 16 == 0 &&
                  kFp8PerTensorBytes % 16 == 0,
              "16-byte cp.async chunks need 16-byte aligned rows");
static_assert(kWsRopeOffset + 2 * (kHeadDimQK - kNopeDim) == kFp8WithScaleBytes, "656 layout");

// Every member is a multiple of 1024 bytes except the last one, so an aligned base keeps the wgmma
// operands (q, k_nope, k_rope) 1024-byte aligned.
struct Smem {
  bf16 q[kTileElems];                    // 9 column blocks
  bf16 k_nope[kNopeBlocks * kColElems];  // K/V channels 0..511: 8 column blocks
  bf16 k_rope[2][kColElems];             // channels 512..575 of even / odd pages; P overlays it
  uint8_t stage[2][kStageBytes];         // raw FP8 rows of the next two pages
  float row_max[2][kBlockM];
  float row_sum[2][kBlockM];
};
constexpr int kSmemBytes = (int)sizeof(Smem) + kSmemAlign;  // + alignment slack
static_assert(kSmemBytes <= 232448, "exceeds the sm_90 per-block opt-in shared memory");
static_assert(sizeof(bf16) * kTileElems % 1024 == 0 && sizeof(Smem::k_nope) % 1024 == 0 &&
                  sizeof(Smem::k_rope) % 1024 == 0,
              "wgmma operand tiles must stay 1024-byte aligned");

template <bool kWithScale> struct Layout;
template <> struct Layout<true> {
  static constexpr int kTokenBytes = kFp8WithScaleBytes;
  static constexpr int kStageRow = kWsStageRow;        // staged bytes per token
};
template <> struct Layout<false> {
  static constexpr int kTokenBytes = kFp8PerTensorBytes;
  static constexpr int kStageRow = kFp8PerTensorBytes;
};

// ------------------------------------------------------------------------------------------------
// Loads
// ------------------------------------------------------------------------------------------------
// Where the bytes of page `blk` of `req` start (token 0, this KV head), its token stride, and how
// many of its 64 tokens are valid (0 for an out-of-range page id: then nothing is read).
struct PageSrc {
  const uint8_t* base;
  int64_t token_stride;
  int valid;
};

template <bool kWithScale>
__device__ __forceinline__ PageSrc page_src(const DecodeParams& p, int req, int kvh, int blk,
                                            int seqlen) {
  constexpr int kTokenBytes = Layout<kWithScale>::kTokenBytes;
  const int page = p.block_table[(int64_t)req * p.max_blocks + blk];
  const bool page_ok = page >= 0 && page < p.num_blocks;
  PageSrc s;
  s.valid = page_ok ? min(max(seqlen - blk * kPageSize, 0), kPageSize) : 0;
  s.token_stride = (int64_t)p.h_kv * kTokenBytes;
  s.base = static_cast<const uint8_t*>(p.k_cache) +
           (int64_t)(page_ok ? page : 0) * kPageSize * s.token_stride + (int64_t)kvh * kTokenBytes;
  return s;
}

// The staged part of each token (with scale: bytes 0..527; per tensor: all 576) -> stage.
template <bool kWithScale>
__device__ __forceinline__ void load_stage(const DecodeParams& p, uint8_t* stage, int req, int kvh,
                                           int blk, int seqlen) {
  constexpr int kRow = Layout<kWithScale>::kStageRow, kChunks = kRow / 16;
  const PageSrc s = page_src<kWithScale>(p, req, kvh, blk, seqlen);
  const uint8_t* fallback = static_cast<const uint8_t*>(p.k_cache);
  for (int i = threadIdx.x; i < kPageSize * kChunks; i += kThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    const bool ok = row < s.valid;
    const uint8_t* src = ok ? s.base + row * s.token_stride + chunk * 16 : fallback;
    cp_async_16(smem_addr(stage + row * kRow + chunk * 16), src, ok ? 16 : 0);
  }
}

// With scale: the 64 bf16 RoPE values of each token (bytes 528..655) -> a RoPE column block.
__device__ __forceinline__ void load_rope(const DecodeParams& p, bf16* rope, int req, int kvh,
                                          int blk, int seqlen) {
  const PageSrc s = page_src<true>(p, req, kvh, blk, seqlen);
  const uint8_t* fallback = static_cast<const uint8_t*>(p.k_cache);
  for (int i = threadIdx.x; i < kPageSize * 8; i += kThreads) {
    const int row = i >> 3, chunk = i & 7;
    const bool ok = row < s.valid;
    const uint8_t* src = ok ? s.base + row * s.token_stride + kWsRopeOffset + chunk * 16 : fallback;
    cp_async_16(smem_addr(rope + tile_offset(row, chunk)), src, ok ? 16 : 0);
  }
}

// ------------------------------------------------------------------------------------------------
// Dequantization
// ------------------------------------------------------------------------------------------------
// 8 e4m3 bytes at `src` (8-byte aligned) -> 8 bf16 (one 16-byte chunk) at `dst`.
template <bool kWithScale>
__device__ __forceinline__ void dequant_chunk(const uint8_t* src, float s, bf16* dst) {
  const uint2 raw = *reinterpret_cast<const uint2*>(src);
  uint32_t v[4];
  dequant8<kWithScale>(raw.x, raw.y, scale_factor(s), v);
  *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
}

// One staged page -> the bf16 tile (NoPE blocks; per tensor also the RoPE block `rope`). Thread t
// converts 16-byte chunk t % 64 of rows t / 64 + 4k: a warp reads 256 contiguous staged bytes and
// writes 8 distinct swizzled chunks per 128 bytes (no bank conflicts).
template <bool kWithScale>
__device__ __forceinline__ void dequant_page(const uint8_t* stage, bf16* k_nope, bf16* rope) {
  constexpr int kRow = Layout<kWithScale>::kStageRow;
  const int chunk = threadIdx.x & 63, row0 = threadIdx.x >> 6;
#pragma unroll 4
  for (int k = 0; k < kPageSize / 4; ++k) {
    const int row = row0 + 4 * k;
    const uint8_t* src = stage + row * kRow;
    const float s =
        kWithScale ? *reinterpret_cast<const float*>(src + kNopeDim + (chunk >> 4) * 4) : 1.f;
    dequant_chunk<kWithScale>(src + chunk * 8, s, k_nope + tile_offset(row, chunk));
  }
  if constexpr (!kWithScale) {
#pragma unroll
    for (int i = threadIdx.x; i < kPageSize * 8; i += kThreads) {
      const int row = i >> 3, c = i & 7;
      dequant_chunk<false>(stage + row * kRow + kNopeDim + c * 8, 1.f, rope + tile_offset(row, c));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel
// ------------------------------------------------------------------------------------------------
template <bool kWithScale>
__global__ void __launch_bounds__(kThreads, 1)
    decode_fp8_kernel(const __grid_constant__ DecodeFp8Params params) {
  const DecodeParams& p = params.base;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t misalign = smem_addr(smem_raw) & (kSmemAlign - 1);
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw + (misalign ? kSmemAlign - misalign : 0));

  const int mb = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = warp & 3, ch = warp >> 2;
  const int m0 = mb * kBlockM;

  const int32_t* md = p.tile_md + (int64_t)part * kMetadataRow;
  const int begin_req = md[0];
  if (begin_req < 0 || begin_req >= p.b) return;
  const int end_req = min(md[1], p.b - 1);

  // Per tensor: logits are kv_scale * (q . k8), O is kv_scale * (P . v8).
  const float kv_scale = kWithScale ? 1.f : *params.kv_scale;
  const float scale_log2 = p.scale_log2 * kv_scale;

  // This thread's two rows (accumulator rows g and g + 8 of its warp's 16).
  const int r_lo = rg * 16 + lane / 4, r_hi = r_lo + 8;

  for (int req = begin_req; req <= end_req; ++req) {
    const Piece pc = make_piece(p, md, req, begin_req, end_req, m0, r_lo, r_hi);
    const int seqlen = pc.seqlen, start = pc.start;
    const int n = pc.end - pc.start;  // pages of this piece
    const int border_lo = pc.border_lo, border_hi = pc.border_hi;

    float o[32][4];
#pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_lo = kMaxInit, m_hi = kMaxInit, l_lo = 0.f, l_hi = 0.f;

    // cp.async groups, one committed at each point below even when empty, so that the waits
    // count uniformly: G0 = Q + page 0, G1 = page 1, A_0 = stage of page 2, then per page i:
    // B_i = RoPE of page i + 2 (with scale), A_{i+1} = stage of page i + 3.
    if (n > 0) {
      load_q<bf16>(p, sm.q, req, kvh, m0);
      load_stage<kWithScale>(p, sm.stage[0], req, kvh, start, seqlen);
      if (kWithScale) load_rope(p, sm.k_rope[0], req, kvh, start, seqlen);
      cp_async_commit();
      if (n > 1) {
        load_stage<kWithScale>(p, sm.stage[1], req, kvh, start + 1, seqlen);
        if (kWithScale) load_rope(p, sm.k_rope[1], req, kvh, start + 1, seqlen);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      dequant_page<kWithScale>(sm.stage[0], sm.k_nope, sm.k_rope[0]);
      fence_proxy_async();
      __syncthreads();
      if (n > 2) load_stage<kWithScale>(p, sm.stage[0], req, kvh, start + 2, seqlen);
      cp_async_commit();
    }

    for (int i = 0; i < n; ++i) {
      const int blk = start + i;
      bf16* rope = sm.k_rope[i & 1];

      // ---- S = Q K^T for keys ch*32..+31 (NoPE from k_nope, RoPE from this page's block) ----
      float s[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      {
        float (&sf)[16] = reinterpret_cast<float(&)[16]>(s);
        const uint32_t q_base = smem_addr(sm.q);
        const uint32_t nope_base = smem_addr(sm.k_nope) + ch * 32 * 128;
        const uint32_t rope_base = smem_addr(rope) + ch * 32 * 128;
        fence_regs(sf);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kHeadDimQK / 16; ++kk) {
          const uint32_t off = (kk >> 2) * kColBlockBytes + (kk & 3) * 32;
          const uint32_t k_addr =
              kk < kNopeDim / 16 ? nope_base + off : rope_base + (kk & 3) * 32;
          MmaOp<bf16>::qk(sf, smem_desc(q_base + off, 16, 1024), smem_desc(k_addr, 16, 1024), 1);
        }
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(sf);
      }

      // ---- scale to log2 units, mask (select), row max across the two warpgroups ----------
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int key0 = blk * kPageSize + ch * 32 + nt * 8 + 2 * (lane % 4);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s[nt][j] = key0 + j < border_lo ? s[nt][j] * scale_log2 : -INFINITY;
          s[nt][2 + j] = key0 + j < border_hi ? s[nt][2 + j] * scale_log2 : -INFINITY;
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
      // All 256 threads: besides the row maxima, this orders both warpgroups' QK (which read
      // this page's RoPE block) before P overwrites that block.
      __syncthreads();
      mx_lo = fmaxf(sm.row_max[0][r_lo], sm.row_max[1][r_lo]);
      mx_hi = fmaxf(sm.row_max[0][r_hi], sm.row_max[1][r_hi]);
      const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
      const float alpha_lo = exp2f(m_lo - new_lo), alpha_hi = exp2f(m_hi - new_hi);
      m_lo = new_lo;
      m_hi = new_hi;

      // ---- P = exp2(S - m); partial row sums; P (bf16) over the RoPE block ---------------
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const float p0 = exp2f(s[nt][0] - m_lo), p1 = exp2f(s[nt][1] - m_lo);
        const float p2 = exp2f(s[nt][2] - m_hi), p3 = exp2f(s[nt][3] - m_hi);
        sum_lo += p0 + p1;
        sum_hi += p2 + p3;
        const int col = ch * 32 + nt * 8 + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(rope + p_offset(r_lo, col / 8) + col % 8) =
            MmaOp<bf16>::pack(p0, p1);
        *reinterpret_cast<uint32_t*>(rope + p_offset(r_hi, col / 8) + col % 8) =
            MmaOp<bf16>::pack(p2, p3);
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
      fence_proxy_async();  // P feeds wgmma, and each warpgroup reads all 64 rows of it
      __syncthreads();

      // ---- O += P V for dims ch*256.. ---------------------------------------------------------
      {
        float (&of)[128] = reinterpret_cast<float(&)[128]>(o);
        const uint32_t p_base = smem_addr(rope);
        const uint32_t v_base = smem_addr(sm.k_nope) + ch * 4 * kColBlockBytes;
        fence_regs(of);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kPageSize / 16; ++ks) {
          MmaOp<bf16>::pv(of, smem_desc(p_base + ks * 32, 16, 1024),
                          smem_desc(v_base + ks * 16 * 128, kColBlockBytes, 1024));
        }
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(of);
      }

      // ---- next page: its bytes landed (G1 / A_{i-1} + B_{i-1}; only A_i may be pending) ------
      if (i + 1 < n) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // the tile is free, and every thread's staged bytes are visible
      if (i + 1 < n) {
        if (kWithScale && i + 2 < n) load_rope(p, rope, req, kvh, blk + 2, seqlen);
        cp_async_commit();  // B_i
        dequant_page<kWithScale>(sm.stage[(i + 1) & 1], sm.k_nope, sm.k_rope[(i + 1) & 1]);
        fence_proxy_async();
        __syncthreads();
        if (i + 3 < n) load_stage<kWithScale>(p, sm.stage[(i + 1) & 1], req, kvh, blk + 3, seqlen);
        cp_async_commit();  // A_{i+1}
      }
    }

    // ---- epilogue: total row sums across the quad and the warp pair ---------------------------
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
    if constexpr (!kWithScale) {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        o[j][0] *= kv_scale;
        o[j][1] *= kv_scale;
        o[j][2] *= kv_scale;
        o[j][3] *= kv_scale;
      }
    }
    store_result<bf16>(p, pc, o, L_lo, L_hi, m_lo, m_hi, req, kvh, m0, r_lo, r_hi, ch, ch == 0);
  }
}

}  // namespace

cudaError_t prepare_staged_fp8() {
  cudaError_t err = cudaFuncSetAttribute(decode_fp8_kernel<true>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(decode_fp8_kernel<false>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
}

cudaError_t launch_staged_fp8(const DecodeFp8Params& p, Fp8Layout layout, cudaStream_t stream) {
  const dim3 grid((p.base.q_rows + kBlockM - 1) / kBlockM, p.base.h_kv, p.base.num_parts);
  if (layout == Fp8Layout::kWithScale) {
    decode_fp8_kernel<true><<<grid, kThreads, kSmemBytes, stream>>>(p);
  } else {
    decode_fp8_kernel<false><<<grid, kThreads, kSmemBytes, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t prepare_decode_fp8() {
  if (cudaError_t err = prepare_staged_fp8(); err != cudaSuccess) return err;
  return prepare_pipelined_fp8();
}

cudaError_t launch_decode_fp8(const DecodeFp8Params& p, Fp8Layout layout, Fp8Variant v,
                              cudaStream_t stream) {
  return v == Fp8Variant::kStaged ? launch_staged_fp8(p, layout, stream)
                                  : launch_pipelined_fp8(p, layout, stream);
}

}  // namespace jfm
