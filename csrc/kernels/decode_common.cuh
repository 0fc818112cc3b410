// Device code shared by the decode kernel variants (decode.cu, decode_seesaw.cu,
// decode_pipelined.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/mla.h"
#include "kernels/wgmma_ops.cuh"
#include "kernels/wgmma_rs.cuh"

namespace jfm {
namespace decode_detail {

constexpr int kThreads = 256;
constexpr int kChunksPerRow = kHeadDimQK / 8;             // 16-byte chunks in a 576-wide row
constexpr int kTileElems = kBlockM * kHeadDimQK;          // 64 x 576 (Q tile and K tile)
constexpr int kColBlockBytes = kBlockM * 128;  // one 64-row x 64-column bf16 block, SW128
constexpr int kTileElem = kColBlockBytes / 2;   // elements of one such block
constexpr int kPTileElem = 8 * kTileElem;       // offset of tile 8 (RoPE) in a page buffer
constexpr int kWgThreads = 128;
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
  static __device__ __forceinline__ void qk(float (&d)[32], uint64_t a, uint64_t b, int acc) {
    wgmma_m64n64k16_bf16(d, a, b, acc);
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
  static __device__ __forceinline__ void qk(float (&d)[32], uint64_t a, uint64_t b, int acc) {
    wgmma_m64n64k16_f16(d, a, b, acc);
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
// The descriptor of base + off from base's: the 14-bit address field holds addr >> 4 and shared
// addresses stay below 2^18, so adding off >> 4 to the low word never carries out of the field
// (one add per operand per wgmma instead of the mask, shift and or of smem_desc; in the
// pipelined kernel every instruction of a pair counts, perf-notes v5.8).
__device__ __forceinline__ uint64_t desc_plus(uint64_t d, uint32_t off) {
  return ((d >> 32) << 32) | (uint32_t)((uint32_t)d + (off >> 4));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Waits until at most N commit groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
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

// Loads the 64 folded query rows of (request, kv head, m-block); rows past q_rows are zeros.
// Threads tid, tid + nthreads, ... of the CTA take part (all threads, or one warpgroup).
template <typename T>
__device__ __forceinline__ void load_q(const DecodeParams& p, T* sq, int req, int kvh, int m0,
                                       int tid = threadIdx.x, int nthreads = kThreads) {
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < kBlockM * kChunksPerRow; i += nthreads) {
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
                                        int seqlen, int tid = threadIdx.x,
                                        int nthreads = kThreads) {
  const T* kc = static_cast<const T*>(p.k_cache);
  const int page = p.block_table[(int64_t)req * p.max_blocks + blk];
  const bool page_ok = page >= 0 && page < p.num_blocks;
  const int valid = page_ok ? min(max(seqlen - blk * kPageSize, 0), kPageSize) : 0;
  const int64_t token_stride = (int64_t)p.h_kv * kHeadDimQK;
  const T* base = kc + ((int64_t)(page_ok ? page : 0) * kPageSize) * token_stride +
                  (int64_t)kvh * kHeadDimQK;
  for (int i = tid; i < kPageSize * kChunksPerRow; i += nthreads) {
    const int row = i / kChunksPerRow, chunk = i % kChunksPerRow;
    const bool ok = row < valid;
    const T* src = ok ? base + row * token_stride + chunk * 8 : kc;
    cp_async_16(smem_addr(sk + tile_offset(row, chunk)), src, ok ? 16 : 0);
  }
}


// The slice of one request that a CTA handles: KV pages [start, end) after causal trimming,
// whether it is one piece of a split request (then it writes partials to slot `slot`), and the
// key borders of this thread's two rows (bottom-right causal mask).
struct Piece {
  int seqlen, start, end, slot;
  bool is_split;
  int border_lo, border_hi;
};

__device__ __forceinline__ Piece make_piece(const DecodeParams& p, const int32_t* md, int req,
                                            int begin_req, int end_req, int m0, int r_lo,
                                            int r_hi) {
  Piece pc;
  pc.seqlen = max(p.seqlens[req], 0);
  const int sched_blocks = (max(pc.seqlen - 1, 0)) / kPageSize + 1;
  pc.start = max(req == begin_req ? md[2] : 0, 0);
  int end = req == end_req ? md[3] : sched_blocks;
  pc.is_split = (req == begin_req && md[5]) || (req == end_req && md[6]);
  pc.slot = p.num_splits[req] + (req == begin_req ? md[4] : 0);
  // The last valid row of the m-block sees the most keys: it bounds the page range.
  const int rows_here = min(kBlockM, p.q_rows - m0);
  const int tok_last = (m0 + rows_here - 1) / p.ng;
  const int keys_needed = max(pc.seqlen - (p.causal ? p.s_q - 1 - tok_last : 0), 0);
  pc.end = min(min(end, (keys_needed + kPageSize - 1) / kPageSize), p.max_blocks);
  // Padding rows (past q_rows) keep seqlen as border: they are never stored.
  auto border = [&](int r) {
    const int m = m0 + r;
    return pc.seqlen - (p.causal && m < p.q_rows ? p.s_q - 1 - m / p.ng : 0);
  };
  pc.border_lo = border(r_lo);
  pc.border_hi = border(r_hi);
  return pc;
}

// Keys of page `blk` below seqlen (0..64).
__device__ __forceinline__ int valid_rows(int seqlen, int blk) {
  return min(max(seqlen - blk * kPageSize, 0), kPageSize);
}

// 2^x in one MUFU op (ex2.approx, ~2 ulp; flushes denormal results to 0, exp2(-inf) = 0).
// exp2f without fast-math adds range fix-ups around it; the tolerances do not need them.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Sum over the 4 threads of a quad (the threads that share an accumulator row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// The natural-log lse of query row `row` (of q_rows) of an unsplit piece; +inf where the row
// attended to nothing (L = 0, or NaN); rows past q_rows are padding and write nothing.
__device__ __forceinline__ void store_lse(const DecodeParams& p, float L, float m, int req,
                                          int kvh, int row) {
  if (row >= p.q_rows) return;
  const int tok = row / p.ng, h = kvh * p.ng + row % p.ng;
  p.lse[((int64_t)req * p.h_q + h) * p.s_q + tok] = L > 0.f ? (log2f(L) + m) * kLn2 : INFINITY;
}

// The base-2 lse of row `row` (of q_rows) of a split piece at workspace row row_base + row;
// -inf where the row attended to nothing; rows past q_rows write nothing.
__device__ __forceinline__ void store_lse_accum(const DecodeParams& p, float L, float m,
                                                int64_t row_base, int row, int m0) {
  if (m0 + row < p.q_rows) p.lse_accum[row_base + row] = L > 0.f ? log2f(L) + m : -INFINITY;
}

// Writes this thread's part of the result for rows r_lo / r_hi: its 256-wide half `ch` of O
// (o, normalized by the row sums L) and, if write_lse, the lse. Unsplit pieces write out/lse
// (natural log; empty rows: out 0, lse +inf); split pieces write fp32 partials and base-2 lse
// (empty: o 0, lse -inf) to their workspace slot.
template <typename T>
__device__ __forceinline__ void store_result(const DecodeParams& p, const Piece& pc,
                                             const float (&o)[32][4], float L_lo, float L_hi,
                                             float m_lo, float m_hi, int req, int kvh, int m0,
                                             int r_lo, int r_hi, int ch, bool write_lse) {
  const int lane = threadIdx.x % 32;
  const bool empty_lo = !(L_lo > 0.f), empty_hi = !(L_hi > 0.f);  // 0 or NaN
  const float inv_lo = empty_lo ? 0.f : 1.f / L_lo, inv_hi = empty_hi ? 0.f : 1.f / L_hi;
  const bool ok_lo = m0 + r_lo < p.q_rows, ok_hi = m0 + r_hi < p.q_rows;
  const int col0 = ch * 256 + 2 * (lane % 4);
  write_lse = write_lse && lane % 4 == 0;

  if (!pc.is_split) {
    const int tok_lo = (m0 + r_lo) / p.ng, tok_hi = (m0 + r_hi) / p.ng;
    const int h_lo = kvh * p.ng + (m0 + r_lo) % p.ng, h_hi = kvh * p.ng + (m0 + r_hi) % p.ng;
    T* out = static_cast<T*>(p.out);
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
    if (write_lse) {
      store_lse(p, L_lo, m_lo, req, kvh, m0 + r_lo);
      store_lse(p, L_hi, m_hi, req, kvh, m0 + r_hi);
    }
  } else {
    if (pc.slot < 0 || pc.slot >= p.b + p.num_parts) return;  // bad metadata: never write OOB
    const int64_t row_base = ((int64_t)pc.slot * p.h_kv + kvh) * p.q_rows + m0;
    float* acc_lo = p.o_accum + (row_base + r_lo) * kHeadDimV;
    float* acc_hi = p.o_accum + (row_base + r_hi) * kHeadDimV;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = col0 + j * 8;
      if (ok_lo)
        *reinterpret_cast<float2*>(acc_lo + col) = make_float2(o[j][0] * inv_lo, o[j][1] * inv_lo);
      if (ok_hi)
        *reinterpret_cast<float2*>(acc_hi + col) = make_float2(o[j][2] * inv_hi, o[j][3] * inv_hi);
    }
    if (write_lse) {
      store_lse_accum(p, L_lo, m_lo, row_base, r_lo, m0);
      store_lse_accum(p, L_hi, m_hi, row_base, r_hi, m0);
    }
  }
}

// ---- building blocks of the two-warpgroup schedules (seesaw v3, pipelined v4) -------------

__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}

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

// Issues O_half += P V_half (P: a [64 x 64] SW128 tile `sp`; V = dims half*256.. of the page in
// `sv`, read MN-major); not waited.
template <typename T>
__device__ __forceinline__ void pv_issue(float (&o)[32][4], const T* sp, const T* sv,
                                         int half) {
  float (&of)[128] = reinterpret_cast<float(&)[128]>(o);
  const uint64_t p_desc = smem_desc(smem_addr(sp), 16, 1024);
  const uint64_t v_desc = smem_desc(smem_addr(sv) + half * 4 * kColBlockBytes, kColBlockBytes, 1024);
  fence_regs(of);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kPageSize / 16; ++ks) {
    MmaOp<T>::pv(of, desc_plus(p_desc, ks * 32), desc_plus(v_desc, ks * 16 * 128));
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

// P = 2^(S * scale - m) into the [64 x 64] tile `sp` (bf16/fp16); returns the thread's row sums.
template <typename T>
__device__ __forceinline__ void exp_and_store(const float (&s)[8][4], float scale_log2,
                                              float m_lo, float m_hi, T* sp, int r_lo,
                                              int r_hi, float& sum_lo, float& sum_hi) {
  const int lane = threadIdx.x % 32;
  sum_lo = sum_hi = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float p0 = fast_exp2(fmaf(s[j][0], scale_log2, -m_lo));
    const float p1 = fast_exp2(fmaf(s[j][1], scale_log2, -m_lo));
    const float p2 = fast_exp2(fmaf(s[j][2], scale_log2, -m_hi));
    const float p3 = fast_exp2(fmaf(s[j][3], scale_log2, -m_hi));
    sum_lo += p0 + p1;
    sum_hi += p2 + p3;
    const int within = 2 * (lane % 4);
    *reinterpret_cast<uint32_t*>(sp + p_offset(r_lo, j) + within) = MmaOp<T>::pack(p0, p1);
    *reinterpret_cast<uint32_t*>(sp + p_offset(r_hi, j) + within) = MmaOp<T>::pack(p2, p3);
  }
  fence_proxy_async();  // P feeds wgmma (async proxy) of both warpgroups
}

}  // namespace decode_detail
}  // namespace jfm
