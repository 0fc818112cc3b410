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

#include "kernels/mla.h"
#include "kernels/wgmma_ops.cuh"

namespace jfm {
namespace {

constexpr int kThreads = 256;
constexpr int kChunksPerRow = kHeadDimQK / 8;             // 16-byte chunks in a 576-wide row
constexpr int kTileElems = kBlockM * kHeadDimQK;          // 64 x 576 (Q tile and K tile)
constexpr int kColBlockBytes = kBlockM * 128;  // one 64-row x 64-column bf16 block, SW128
constexpr int kSmemAlign = 1024;               // 128B-swizzle atoms must be 1024-byte aligned
constexpr float kLn2 = 0.69314718055994530942f;
constexpr float kMaxInit = -1e30f;  // finite: exp2(m_old - m_new) never sees inf - inf

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void qk(float (&d)[16], uint64_t a, uint64_t b, int acc) {
    wgmma_m64n32k16_bf16(d, a, b, acc);
  }
  static __device__ __forceinline__ void pv(float (&d)[128], uint64_t a, uint64_t b) {
    wgmma_m64n256k16_bf16_tnsp_b(d, a, b, 1);
  }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void qk(float (&d)[16], uint64_t a, uint64_t b, int acc) {
    wgmma_m64n32k16_f16(d, a, b, acc);
  }
  static __device__ __forceinline__ void pv(float (&d)[128], uint64_t a, uint64_t b) {
    wgmma_m64n256k16_f16_tnsp_b(d, a, b, 1);
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16-byte async copy; src_bytes == 0 zero-fills the destination without reading src.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

// Barrier for the two warps (64 threads) that share a row group; ids 1..4 (0 = __syncthreads).
__device__ __forceinline__ void pair_sync(int row_group) {
  asm volatile("bar.sync %0, 64;\n" :: "r"(row_group + 1));
}

// Element offset of 16-byte chunk `chunk` (0..71) of `row` in a [64 x 576] tile stored as nine
// [64 x 64] column blocks, each in the 128-byte-swizzle K-major layout that wgmma descriptors
// and TMA use: the chunk index within a 128-byte row is XOR-ed with row % 8. The same layout keeps
// ldmatrix bank-conflict free (the 8 rows of one 8x8 matrix land in 8 different bank groups).
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return (chunk >> 3) * (kColBlockBytes / 2) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}
// The [64 x 64] P tile is one such column block.
__device__ __forceinline__ int p_offset(int row, int chunk) { return tile_offset(row, chunk); }

// wgmma shared-memory matrix descriptor for a 128-byte-swizzled operand.
// K-major: SBO = 1024 B between 8-row groups (LBO unused). MN-major: LBO = stride between
// 64-element MN blocks, SBO = 1024 B between 8-row K groups.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
         ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Pins accumulator registers at this point: the compiler must not move their reads or writes
// across the asynchronous wgmma issue / wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Makes this thread's generic-proxy smem writes (cp.async, st.shared) visible to wgmma.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

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

// Loads the 64 folded query rows of (request, kv head, m-block); rows past q_rows are zeros.
template <typename T>
__device__ __forceinline__ void load_q(const DecodeParams& p, T* sq, int req, int kvh, int m0) {
  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kBlockM * kChunksPerRow; i += kThreads) {
    const int row = i / kChunksPerRow, chunk = i % kChunksPerRow;
    const int m = m0 + row;
    const T* src = q;
    int bytes = 0;
    if (m < p.q_rows) {
      const int s = m / p.ng, h = kvh * p.ng + m % p.ng;
      src = q + (((int64_t)req * p.s_q + s) * p.h_q + h) * kHeadDimQK + chunk * 8;
      bytes = 16;
    }
    cp_async_16(smem_addr(sq + tile_offset(row, chunk)), src, bytes);
  }
}

// Loads KV page `blk` of `req`; tokens >= seqlen and invalid page ids are zero-filled.
template <typename T>
__device__ __forceinline__ void load_kv(const DecodeParams& p, T* sk, int req, int kvh, int blk,
                                        int seqlen) {
  const T* kc = static_cast<const T*>(p.k_cache);
  const int page = p.block_table[(int64_t)req * p.max_blocks + blk];
  const bool page_ok = page >= 0 && page < p.num_blocks;
  const int valid = page_ok ? min(max(seqlen - blk * kPageSize, 0), kPageSize) : 0;
  const int64_t token_stride = (int64_t)p.h_kv * kHeadDimQK;
  const T* base = kc + ((int64_t)(page_ok ? page : 0) * kPageSize) * token_stride +
                  (int64_t)kvh * kHeadDimQK;
  for (int i = threadIdx.x; i < kPageSize * kChunksPerRow; i += kThreads) {
    const int row = i / kChunksPerRow, chunk = i % kChunksPerRow;
    const bool ok = row < valid;
    const T* src = ok ? base + row * token_stride + chunk * 8 : kc;
    cp_async_16(smem_addr(sk + tile_offset(row, chunk)), src, ok ? 16 : 0);
  }
}

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
  const int num_slots = p.b + p.num_parts;

  // This thread's two rows (mma accumulator rows g and g + 8 of its row group).
  const int r_lo = rg * 16 + lane / 4, r_hi = r_lo + 8;
  const int tok_lo = (m0 + r_lo) / p.ng, tok_hi = (m0 + r_hi) / p.ng;
  // Last valid row of the m-block sees the most keys: it bounds the causal block range.
  const int tok_last = (m0 + rows_here - 1) / p.ng;

  for (int req = begin_req; req <= end_req; ++req) {
    const int seqlen = max(p.seqlens[req], 0);
    const int sched_blocks = (max(seqlen - 1, 0)) / kPageSize + 1;
    int start = req == begin_req ? md[2] : 0;
    int end = req == end_req ? md[3] : sched_blocks;
    const bool is_split = (req == begin_req && md[5]) || (req == end_req && md[6]);
    const int split_idx = req == begin_req ? md[4] : 0;

    const int shift_last = p.causal ? p.s_q - 1 - tok_last : 0;
    const int keys_needed = max(seqlen - shift_last, 0);
    end = min(min(end, (keys_needed + kPageSize - 1) / kPageSize), p.max_blocks);
    start = max(start, 0);

    // Per-row key borders (bottom-right causal mask). Padding rows keep seqlen: never stored.
    const int border_lo = seqlen - (p.causal && m0 + r_lo < p.q_rows ? p.s_q - 1 - tok_lo : 0);
    const int border_hi = seqlen - (p.causal && m0 + r_hi < p.q_rows ? p.s_q - 1 - tok_hi : 0);

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
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
          mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
          mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
        }
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
          float (&of)[128] = reinterpret_cast<float(&)[128]>(o);
          const uint32_t p_base = smem_addr(sm.p);
          const uint32_t v_base = smem_addr(sk) + ch * 4 * kColBlockBytes;
          fence_regs(of);
          wgmma_fence();
#pragma unroll
          for (int ks = 0; ks < kPageSize / 16; ++ks) {
            MmaOp<T>::pv(of, smem_desc(p_base + ks * 32, 16, 1024),
                         smem_desc(v_base + ks * 16 * 128, kColBlockBytes, 1024));
          }
          wgmma_commit();
          wgmma_wait_all();
          fence_regs(of);
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
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
      l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    if (lane % 4 == 0) {
      sm.row_sum[ch][r_lo] = l_lo;
      sm.row_sum[ch][r_hi] = l_hi;
    }
    pair_sync(rg);
    const float L_lo = sm.row_sum[0][r_lo] + sm.row_sum[1][r_lo];
    const float L_hi = sm.row_sum[0][r_hi] + sm.row_sum[1][r_hi];
    pair_sync(rg);  // row_sum is reused by the next request
    const bool empty_lo = !(L_lo > 0.f), empty_hi = !(L_hi > 0.f);  // 0 or NaN
    const float inv_lo = empty_lo ? 0.f : 1.f / L_lo, inv_hi = empty_hi ? 0.f : 1.f / L_hi;
    const bool ok_lo = m0 + r_lo < p.q_rows, ok_hi = m0 + r_hi < p.q_rows;
    const int col0 = ch * 256 + 2 * (lane % 4);

    if (!is_split) {
      T* out = static_cast<T*>(p.out);
      const int h_lo = kvh * p.ng + (m0 + r_lo) % p.ng, h_hi = kvh * p.ng + (m0 + r_hi) % p.ng;
      T* row_lo = out + (((int64_t)req * p.s_q + tok_lo) * p.h_q + h_lo) * kHeadDimV;
      T* row_hi = out + (((int64_t)req * p.s_q + tok_hi) * p.h_q + h_hi) * kHeadDimV;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int col = col0 + j * 8;
        if (ok_lo)
          *reinterpret_cast<uint32_t*>(row_lo + col) =
              MmaOp<T>::pack(o[j][0] * inv_lo, o[j][1] * inv_lo);
        if (ok_hi)
          *reinterpret_cast<uint32_t*>(row_hi + col) =
              MmaOp<T>::pack(o[j][2] * inv_hi, o[j][3] * inv_hi);
      }
      if (ch == 0 && lane % 4 == 0) {
        if (ok_lo)
          p.lse[((int64_t)req * p.h_q + h_lo) * p.s_q + tok_lo] =
              empty_lo ? INFINITY : (log2f(L_lo) + m_lo) * kLn2;
        if (ok_hi)
          p.lse[((int64_t)req * p.h_q + h_hi) * p.s_q + tok_hi] =
              empty_hi ? INFINITY : (log2f(L_hi) + m_hi) * kLn2;
      }
    } else {
      const int slot = p.num_splits[req] + split_idx;
      if (slot < 0 || slot >= num_slots) continue;  // inconsistent metadata: never write OOB
      const int64_t row_base = ((int64_t)slot * p.h_kv + kvh) * p.q_rows + m0;
      float* acc_lo = p.o_accum + (row_base + r_lo) * kHeadDimV;
      float* acc_hi = p.o_accum + (row_base + r_hi) * kHeadDimV;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int col = col0 + j * 8;
        if (ok_lo) *reinterpret_cast<float2*>(acc_lo + col) =
            make_float2(o[j][0] * inv_lo, o[j][1] * inv_lo);
        if (ok_hi) *reinterpret_cast<float2*>(acc_hi + col) =
            make_float2(o[j][2] * inv_hi, o[j][3] * inv_hi);
      }
      if (ch == 0 && lane % 4 == 0) {
        if (ok_lo) p.lse_accum[row_base + r_lo] = empty_lo ? -INFINITY : log2f(L_lo) + m_lo;
        if (ok_hi) p.lse_accum[row_base + r_hi] = empty_hi ? -INFINITY : log2f(L_hi) + m_hi;
      }
    }
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
  return t == ElemType::kBF16 ? set_smem_attr<__nv_bfloat16>() : set_smem_attr<__half>();
}

cudaError_t launch_decode(const DecodeParams& p, ElemType t, DecodeVariant v,
                          cudaStream_t stream) {
  return t == ElemType::kBF16 ? launch<__nv_bfloat16>(p, v, stream)
                              : launch<__half>(p, v, stream);
}

}  // namespace jfm
