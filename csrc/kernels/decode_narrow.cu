// Split-KV MLA decode for few query rows per KV head (q_rows <= 32), sm_90a: the "narrow" kernel.
//
// With 16 query rows, v4's 64-row MMA tiles are 3/4 padding, and each page costs as much tensor work
// as in the compute-bound case: an FP8 cache then cannot run at its bandwidth (perf-notes). Here the
// MMAs are transposed so that M = 64 covers keys or channels and N = the query rows (16 or 32):
//   S^T [64 keys x N]   = K [64 x 576] . Q^T    (9 groups of 4 wgmma m64nNk16)
//   O^T [512 ch. x N]  += V^T [512 x 64] . P^T  (8 M-tiles of 64 channels x 4 k-steps of 16 keys)
// A (K, V^T) comes from registers: each thread loads its fragments from the page with ld.shared
// (FP8 bytes are dequantized on the way, so no converted copy of the page is ever stored), and B
// (Q, P^T) is a K-major 128-byte-swizzled shared-memory operand. The A fragment layout fixes which
// channels / keys a thread holds; the reduction index of each product may be permuted freely as long
// as A and B agree, and both permutations are chosen so that every thread loads 16 contiguous bytes
// per row and a warp's loads spread evenly over the banks:
//   QK^T: in each 64-channel block, thread (lane % 4 = q) holds channels 16q..16q+15 of its two key
//         rows; k16 step s takes channels 16q + 4s + {0,1} (k = 2q, 2q+1) and + {2,3} (k = 2q + 8,
//         2q + 9). Q is stored with the same permutation (load_q_narrow).
//   PV:   thread (warp w, lane / 4 = g) owns the 16 channels 16(8w + g).. of O^T: M-tile mt row
//         16w + g (+8) is channel 16(8w + g) + 2mt (+1). In key step ks, k = 2q, 2q+1, 2q+8, 2q+9 are
//         keys 16ks + q, +4, +8, +12; P^T is stored with that permutation.
// One consumer warpgroup (FP8: two, taking pages in turn, see kGroupsOf) computes; one producer
// warp streams whole pages into a ring of stages by TMA (one "full" mbarrier per stage; the
// consumers arrive on its "empty" mbarrier after their last read).
// The softmax runs over columns (query rows): maxima go through shared memory once per page, sums
// only at the end. Out-of-range page ids are out-of-bounds TMA boxes (zeros); keys past the length
// are masked in S^T and their V is zeroed (bf16/fp16) or their P^T is 0 (FP8).
// FP8 with scale multiplies no K or V value either: S^T is summed per 128-channel block (four
// accumulators, scaled per key afterwards, plus the RoPE's), and PV runs on four copies of P^T, one
// per block, each key's column times its scale. For that, an M-tile of O^T holds channels of one
// block (PV's with-scale channel map below), and each block's O^T is kept relative to a power of two
// S_b >= every scale seen so far (rescaled when it grows) so that P^T * scale / S_b * 2^120 stays in
// bf16's range for any scale.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/decode_common.cuh"
#include "kernels/decode_fp8.h"
#include "kernels/fp8_dequant.cuh"
#include "kernels/mla.h"
#include "kernels/part_clock.cuh"
#include "kernels/tma_pipeline.cuh"

namespace jfm {
namespace {

using namespace decode_detail;

constexpr int kConsumerThreads = 128;  // one consumer warpgroup
constexpr int kBarGroup = 1;           // named barriers 1, 2: consumer warpgroup 0, 1
constexpr int kBarConsumers = 3;       // named barrier of all consumer warpgroups
constexpr int kKBlocks = kHeadDimQK / 64;             // 9 blocks of 64 channels
constexpr int kTileBytes = kColBlockBytes;            // 8 KB: 64 keys x 128 bytes
// P^T copies: with scale one per 128-channel block (each key's column times its scale there).
template <KvFormat F>
constexpr int kPtCopiesOf = F == KvFormat::kFp8WithScale ? 4 : 1;
template <KvFormat F>
constexpr int kNarrowMaxRowsOf =
    F == KvFormat::kFp8WithScale ? kNarrowMaxRowsWithScale : kNarrowMaxRows;

// Where a page lies in a stage. Native: nine 64 x 64 tiles (128-byte swizzled). FP8: four raw blocks
// of 64 keys x 128 e4m3 channels (swizzled), then the RoPE (with scale: a bf16 tile; per tensor:
// 64 x 64 e4m3, unswizzled 64-byte rows), then (with scale) 64 x 16 bytes of float32 scales.
template <KvFormat F>
struct Stage;
template <>
struct Stage<KvFormat::kNative> {
  static constexpr int kBytes = kKBlocks * kTileBytes, kCount = 2;
};
template <>
struct Stage<KvFormat::kFp8WithScale> {
  static constexpr int kRope = 4 * kTileBytes, kScales = 5 * kTileBytes;
  static constexpr int kBytes = kScales + kPageSize * kFp8ScaleBytes, kCount = 4;
};
template <>
struct Stage<KvFormat::kFp8PerTensor> {
  static constexpr int kRope = 4 * kTileBytes;
  static constexpr int kBytes = kRope + kPageSize * 64, kCount = 4;
};

// Consumer warpgroups: FP8 at 16 rows runs two, which take a request's pages in turn (each with
// its own softmax state, merged at the request's end), so that one's dequantization and MMAs run
// while the other waits on its softmax chain. (bf16's 72 KB pages leave no room for the third
// stage two warpgroups would need; 32 rows leave no registers.)
template <KvFormat F, int N>
constexpr int kGroupsOf = F != KvFormat::kNative && N == 16 ? 2 : 1;
// + the producer: one warp, or with two consumer warpgroups a warpgroup (setmaxnreg works per
// warpgroup: it gives the consumers 232 registers and the producer 40).
template <KvFormat F, int N>
constexpr int kNarrowThreads = kGroupsOf<F, N> * kConsumerThreads + (kGroupsOf<F, N> > 1 ? 128 : 32);

template <KvFormat F, int N>
struct NarrowSmem {
  static constexpr int kGroups = kGroupsOf<F, N>;
  // The SW128 operands (stage tiles, q, pt) start on 1024-byte boundaries (wgmma descriptors and
  // TMA assume it).
  alignas(1024) uint8_t stage[Stage<F>::kCount][Stage<F>::kBytes];  // 1024-byte multiples
  // B of QK^T: 9 blocks of N x 64, SW128. With two warpgroups, also where the second hands the
  // first half of its O^T to the first at a request's end; hand_hi takes the other half.
  alignas(1024) uint8_t q[kKBlocks * N * 128];
  float hand_hi[kGroups > 1 ? 4 * (N / 2) * kConsumerThreads : 1];
  alignas(1024) uint8_t pt[kGroups][kPtCopiesOf<F>][N * 128];  // B of PV: P^T, SW128
  float red_max[kGroups][2][4][N];       // per-warp column maxima, double-buffered across pages
  uint32_t red_scale[kGroups][2][4][4];  // with scale: per-warp maxima of the blocks' |scale| bits
  float red_sum[kGroups][4][N];
  float merge_m[N];          // the second warpgroup's running maxima ...
  uint32_t merge_pow2[4];    // ... and S_b (with scale), for the merge
  uint64_t full[Stage<F>::kCount];
  uint64_t empty[Stage<F>::kCount];
};
template <KvFormat F, int N>
constexpr int kNarrowSmemBytes = (int)sizeof(NarrowSmem<F, N>) + kSmemAlign;

__device__ __forceinline__ uint32_t prmt2(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
// Pins A fragments here: the compiler must not move their definitions past wgmma_fence (into the
// wgmma pipeline, where ptxas would then serialize the wgmmas).
__device__ __forceinline__ void fence_a(uint32_t (&a)[4][4]) {
#pragma unroll
  for (int m = 0; m < 4; ++m)
    for (int k = 0; k < 4; ++k) asm volatile("" : "+r"(a[m][k])::"memory");
}
// Four 8 x 8 b16 matrices in the mma accumulator layout (register i: matrix i), stored transposed:
// lane L gives the address of row L % 8 of matrix L / 8.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
               :: "r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

// FP8 values on their way to the MMAs: e4m3 codes become bf16 of (value * 2^-120) in 3 integer
// ops per two values (fp8_dequant.cuh) and are never multiplied. Q's NoPE is stored times 2^60, so
// S^T's NoPE part comes out times 2^-60 (per tensor the softmax scale absorbs it; with scale each
// block sum is multiplied back), and P^T goes in times 2^120, which V's 2^-120 cancels. Powers of
// two: exact.
constexpr uint32_t kPow2_60x2 = 0x5D805D80u;  // bf16x2 (2^60, 2^60)
constexpr float kPow2_60 = 0x1p60f, kPow2_120 = 0x1p120f;

// With scale: the power of two S_b kept per block is stored as its float bits; 2^-126 .. 2^126
// keeps 1 / S_b a normal float.
constexpr uint32_t kMinScaleBits = 0x00800000u, kMaxScaleBits = 0x7E800000u;
__device__ __forceinline__ float inverse_pow2(uint32_t bits) {
  return __uint_as_float((254u << 23) - bits);
}

// Column c (0 .. N/4 - 1) of this thread's accumulator columns 8j + 2(lane % 4) + e: c = 2j + e.
__device__ __forceinline__ int acc_col(int c) { return 8 * (c >> 1) + 2 * (threadIdx.x % 4) + (c & 1); }
// Accumulator i -> its column slot c and its row half (0: row g, 1: row g + 8).
__host__ __device__ constexpr int slot_of(int i) { return 2 * (i / 4) + (i & 1); }
__host__ __device__ constexpr int half_of(int i) { return (i >> 1) & 1; }

// ---- Q ---------------------------------------------------------------------------------------

// Q's N rows of (request, kv head) into the B operand of QK^T with the channel permutation above:
// logical channel 16s + 8hi + 2qq + e of a block holds physical channel 16qq + 4s + 2hi + e.
// Rows past q_rows are zeros. FP8: the e4m3 channels of Q are stored times 2^60 (see kPow2_60x2).
template <typename T, KvFormat F, int N>
__device__ __forceinline__ void load_q_narrow(const DecodeParams& p, uint8_t* sq, int req, int kvh,
                                              int tid, int threads) {
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < N * kKBlocks * 8; i += threads) {
    const int n = i / (kKBlocks * 8), blk = (i / 8) % kKBlocks, qq = (i / 2) % 4, u = i % 2;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (n < p.q_rows) {
      const int tok = n / p.ng, h = kvh * p.ng + n % p.ng;
      v = *reinterpret_cast<const uint4*>(
          q + (((int64_t)req * p.s_q + tok) * p.h_q + h) * kHeadDimQK + blk * 64 + 16 * qq + 8 * u);
    }
    uint32_t words[4] = {v.x, v.y, v.z, v.w};
    if (F == KvFormat::kFp8PerTensor || (F == KvFormat::kFp8WithScale && blk < 8)) {
#pragma unroll
      for (int j = 0; j < 4; ++j) words[j] = fp8_detail::bf16x2_mul(words[j], kPow2_60x2);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // word 4u + j = physical channels 16qq + 2(4u + j): s = 2u + j/2, hi = j % 2.
      const int l = 2 * (8 * (2 * u + j / 2) + 4 * (j % 2) + qq);  // logical channel in the block
      *reinterpret_cast<uint32_t*>(sq + blk * N * 128 + n * 128 + (((l >> 3) ^ (n & 7)) << 4) +
                                   (l & 7) * 2) = words[j];
    }
  }
}

// ---- K rows (A of QK^T) -----------------------------------------------------------------------

// 16 channels of key row r (16q.. of 64-channel block `blk`) as 8 bf16x2 words (word k = channels
// 2k, 2k + 1 of the 16); FP8 as e4m3 value * 2^-120 (unscaled).
template <typename T, KvFormat F>
__device__ __forceinline__ void load_k_row(uint32_t (&w)[8], uint32_t stage, int blk, int r, int q) {
  auto native_tile = [&](uint32_t tile) {
    const uint32_t row = tile + r * 128;
    const uint4 a = lds128(row + (((2 * q) ^ (r & 7)) << 4));
    const uint4 b = lds128(row + (((2 * q + 1) ^ (r & 7)) << 4));
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  };
  auto fp8_chunk = [&](uint32_t addr) {  // e4m3 * 2^-120
    const uint4 a = lds128(addr);
    fp8_detail::e4m3x4_scaled(a.x, w[0], w[1]);
    fp8_detail::e4m3x4_scaled(a.y, w[2], w[3]);
    fp8_detail::e4m3x4_scaled(a.z, w[4], w[5]);
    fp8_detail::e4m3x4_scaled(a.w, w[6], w[7]);
  };
  if constexpr (F == KvFormat::kNative) {
    native_tile(stage + blk * kTileBytes);
  } else if (blk < 8) {
    const uint32_t raw = stage + (blk >> 1) * kTileBytes + r * 128;
    fp8_chunk(raw + (((4 * (blk & 1) + q) ^ (r & 7)) << 4));
  } else if constexpr (F == KvFormat::kFp8WithScale) {
    native_tile(stage + Stage<F>::kRope);
  } else {
    fp8_chunk(stage + Stage<F>::kRope + r * 64 + q * 16);
  }
}

// S^T = K Q^T over the page in `stage`, waited for. With scale, `s` gets the RoPE part and sb[b]
// the (unscaled, times 2^-60) part of NoPE block b; otherwise `s` gets everything.
template <typename T, KvFormat F, int N>
__device__ __forceinline__ void qk_narrow(float (&s)[N / 2], float (&sb)[4][N / 2], uint32_t stage,
                                          uint32_t sq, int r0, int q) {
  constexpr bool kBlockSums = F == KvFormat::kFp8WithScale;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) s[i] = 0.f;
  fence_regs(s);
  if constexpr (kBlockSums) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      for (int i = 0; i < N / 2; ++i) sb[b][i] = 0.f;
      fence_regs(sb[b]);
    }
  }
#pragma unroll
  for (int blk = 0; blk < kKBlocks; ++blk) {
    float(&acc)[N / 2] = kBlockSums && blk < 8 ? sb[blk >> 1] : s;
    uint32_t w0[8], w1[8];
    load_k_row<T, F>(w0, stage, blk, r0, q);
    load_k_row<T, F>(w1, stage, blk, r0 + 8, q);
    uint32_t a[4][4];
#pragma unroll
    for (int st = 0; st < 4; ++st) {
      a[st][0] = w0[2 * st];
      a[st][1] = w1[2 * st];
      a[st][2] = w0[2 * st + 1];
      a[st][3] = w1[2 * st + 1];
    }
    fence_a(a);
    wgmma_wait<1>();  // the group before last retired: its A registers may be reused
    wgmma_fence();
#pragma unroll
    for (int st = 0; st < 4; ++st) {
      wgmma_rs_narrow<T, N>(acc, a[st], smem_desc(sq + blk * N * 128 + st * 32, 16, 1024));
    }
    wgmma_commit();
  }
  wgmma_wait<0>();
  fence_regs(s);
  if constexpr (kBlockSums) {
#pragma unroll
    for (int b = 0; b < 4; ++b) fence_regs(sb[b]);
  }
}

// ---- V^T (A of PV) ----------------------------------------------------------------------------

// bf16x2 (lo = key a, hi = key b) of e4m3 bytes selected by `sel` from x (key a) and y (key b),
// times 2^-120 (fp8_dequant.cuh's trick, sign-replicating prmt over two sources).
__device__ __forceinline__ uint32_t e4m3_pair(uint32_t x, uint32_t y, uint32_t sel) {
  return (prmt2(x, y, sel) << 4) & 0x87F087F0u;
}
// Byte b of x and of y as a sign-extended 16-bit lane pair.
__host__ __device__ constexpr uint32_t pair_sel(int b) {
  return (uint32_t)(b | ((b | 8) << 4) | ((4 + b) << 8) | ((12 + b) << 12));
}

// One PV commit group: M-tiles 4h..4h+3 of O^T += their A fragments times a k-step of P^T (M-tiles
// 4h, 4h+1: `desc_lo`; 4h+2, 4h+3: `desc_hi`), once the group before last has retired (its A
// registers are then free).
template <typename T, int N>
__device__ __forceinline__ void pv_group(float (&o)[8][N / 2], int h, uint32_t (&a)[4][4],
                                         uint64_t desc_lo, uint64_t desc_hi) {
  fence_a(a);
  wgmma_wait<1>();
  wgmma_fence();
#pragma unroll
  for (int m = 0; m < 4; ++m) wgmma_rs_narrow<T, N>(o[4 * h + m], a[m], m < 2 ? desc_lo : desc_hi);
  wgmma_commit();
}

// bf16/fp16 and per tensor: the key of A's k = 2q + e (hi = 0) or 2q + 8 + e (hi = 1) in key step
// ks (P^T is stored with this permutation).
__device__ __forceinline__ int key_of(int ks, int q, int hi, int e) {
  return 16 * ks + q + 4 * e + 8 * hi;
}

// O^T += V^T P^T over the page in `stage`: 8 groups (key step ks, M-tiles 4h..4h+3), waited for.
// (Leaving PV in flight under the next page's QK^T makes ptxas serialize every wgmma of the
// kernel: C7514/C7515, accumulators touched inside the pipeline stage.) Keys >= valid contribute
// zeros (bf16/fp16: zeroed V; FP8: their P^T is 0 and e4m3 decodes to finite values only).
template <typename T, KvFormat F, int N>
__device__ __forceinline__ void pv_narrow(float (&o)[8][N / 2], uint32_t stage, uint32_t spt,
                                          int w, int g, int q, int valid) {
#pragma unroll
  for (int mt = 0; mt < 8; ++mt) fence_regs(o[mt]);  // the softmax's rescaling happens before
#pragma unroll
  for (int ks = 0; ks < kPageSize / 16; ++ks) {
    const uint64_t desc = smem_desc(spt + ks * 32, 16, 1024);
    if constexpr (F == KvFormat::kFp8WithScale) {
      // Channel map: M-tile mt row 16w + g (+8) is channel 128(mt / 2) + 4(8w + g) + 2(mt % 2)
      // (+1), so M-tiles 2B, 2B + 1 hold block B and take block B's P^T. Keys of A's k = 2q, 2q+1
      // (hi = 0) and 2q+8, 2q+9 (hi = 1): 16ks + 2q + e + 8hi (P^T in natural key order). Each key
      // gives 4 bytes per block; a warp's 32 loads hit 32 distinct banks.
      uint32_t raw[4][2][2];  // [block][hi][e]
#pragma unroll
      for (int hi = 0; hi < 2; ++hi)
        for (int e = 0; e < 2; ++e) {
          const int t = 16 * ks + 2 * q + e + 8 * hi;
          const uint32_t row = stage + t * 128 + ((((2 * w + (g >> 2)) ^ (t & 7))) << 4) + 4 * (g & 3);
#pragma unroll
          for (int blk = 0; blk < 4; ++blk) raw[blk][hi][e] = lds32(row + blk * kTileBytes);
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t a[4][4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const int blk = 2 * h + m / 2, j = m & 1;
#pragma unroll
          for (int hi = 0; hi < 2; ++hi) {
            a[m][2 * hi] = e4m3_pair(raw[blk][hi][0], raw[blk][hi][1], pair_sel(2 * j));
            a[m][2 * hi + 1] = e4m3_pair(raw[blk][hi][0], raw[blk][hi][1], pair_sel(2 * j + 1));
          }
        }
        pv_group<T, N>(o, h, a, smem_desc(spt + 2 * h * N * 128 + ks * 32, 16, 1024),
                       smem_desc(spt + (2 * h + 1) * N * 128 + ks * 32, 16, 1024));
      }
    } else if constexpr (F == KvFormat::kNative) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Channels 16(8w + g) + 8h .. + 7 of each key: one 16-byte chunk.
        uint32_t u[2][2][4];
#pragma unroll
        for (int hi = 0; hi < 2; ++hi)
          for (int e = 0; e < 2; ++e) {
            const int t = key_of(ks, q, hi, e);
            const uint4 v = lds128(stage + (2 * w + (g >> 2)) * kTileBytes + t * 128 +
                                   (((2 * (g & 3) + h) ^ (t & 7)) << 4));
            const bool ok = t < valid;
            u[hi][e][0] = ok ? v.x : 0u;
            u[hi][e][1] = ok ? v.y : 0u;
            u[hi][e][2] = ok ? v.z : 0u;
            u[hi][e][3] = ok ? v.w : 0u;
          }
        uint32_t a[4][4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          a[m][0] = prmt2(u[0][0][m], u[0][1][m], 0x5410);
          a[m][1] = prmt2(u[0][0][m], u[0][1][m], 0x7632);
          a[m][2] = prmt2(u[1][0][m], u[1][1][m], 0x5410);
          a[m][3] = prmt2(u[1][0][m], u[1][1][m], 0x7632);
        }
        pv_group<T, N>(o, h, a, desc, desc);
      }
    } else {
      // Channels 16(8w + g).. of each key: chunk g of raw block w, 16 e4m3 bytes.
      uint32_t b[2][2][4];
#pragma unroll
      for (int hi = 0; hi < 2; ++hi)
        for (int e = 0; e < 2; ++e) {
          const int t = key_of(ks, q, hi, e);
          const uint4 v = lds128(stage + w * kTileBytes + t * 128 + ((g ^ (t & 7)) << 4));
          b[hi][e][0] = v.x;
          b[hi][e][1] = v.y;
          b[hi][e][2] = v.z;
          b[hi][e][3] = v.w;
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t a[4][4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const int mt = 4 * h + m, word = mt >> 1, byte = 2 * (mt & 1);
#pragma unroll
          for (int hi = 0; hi < 2; ++hi) {
            a[m][2 * hi] = e4m3_pair(b[hi][0][word], b[hi][1][word], pair_sel(byte));  // row g
            a[m][2 * hi + 1] = e4m3_pair(b[hi][0][word], b[hi][1][word], pair_sel(byte + 1));
          }
        }
        pv_group<T, N>(o, h, a, desc, desc);  // P^T carries the 2^120
      }
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int mt = 0; mt < 8; ++mt) fence_regs(o[mt]);
}

// ---- producer ----------------------------------------------------------------------------------

template <KvFormat F, int N>
__device__ __forceinline__ void produce(const DecodeParams& p, NarrowSmem<F, N>& sm,
                                        const CUtensorMap* kmap, const CUtensorMap* aux_map,
                                        const int32_t* md, int begin_req, int end_req, int kvh) {
  constexpr int kCount = Stage<F>::kCount;
  const uint64_t policy = evict_first_policy();
  uint32_t it = 0;
  for (int req = begin_req; req <= end_req; ++req) {
    const Piece pc = make_piece(p, md, req, begin_req, end_req, 0, 0, 0);
    const int32_t* bt = p.block_table + (int64_t)req * p.max_blocks;
    for (int b = pc.start; b < pc.end; ++b, ++it) {
      const int st = it % kCount;
      const uint32_t round = it / kCount;
      // The page id is loaded before the wait for a free stage, so its latency passes during the
      // wait instead of between the stage freeing and the TMA issue.
      const int page = bt[b];
      if (round > 0) mbar_wait(smem_addr(&sm.empty[st]), (round - 1) & 1);
      const uint32_t dst = smem_addr(sm.stage[st]), bar = smem_addr(&sm.full[st]);
      mbar_expect_tx(true, bar, Stage<F>::kBytes);
      if constexpr (F == KvFormat::kNative) {
        for (int t = 0; t < kKBlocks; ++t)
          tma_load_tile(true, dst + t * kTileBytes, kmap, bar, t * 64, kvh, page, policy);
      } else {
        for (int j = 0; j < 4; ++j)
          tma_load_tile(true, dst + j * kTileBytes, kmap, bar, j * kFp8BlockBytes, kvh, page, policy);
        if constexpr (F == KvFormat::kFp8WithScale) {
          tma_load_tile(true, dst + Stage<F>::kRope, kmap, bar, kWsRopeByte, kvh, page, policy);
          tma_load_tile(true, dst + Stage<F>::kScales, aux_map, bar, kHeadDimV, kvh, page, policy);
        } else {
          tma_load_tile(true, dst + Stage<F>::kRope, aux_map, bar, kHeadDimV, kvh, page, policy);
        }
      }
    }
  }
}

// ---- the kernel --------------------------------------------------------------------------------

// kv_scale: FP8 per tensor only (device scalar; logits and O are scaled by it, K is not).
template <typename T, KvFormat F, int N>
__global__ void __launch_bounds__(kNarrowThreads<F, N>, 1)
    narrow_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap kmap,
                  const __grid_constant__ CUtensorMap aux_map, const float* kv_scale) {
  constexpr int kCount = Stage<F>::kCount, kCols = N / 4, kGroups = kGroupsOf<F, N>;
  constexpr int kConsumers = kGroups * kConsumerThreads;
  static_assert(kGroups == 1 || 4 * (N / 2) * kConsumerThreads * 4 <= kKBlocks * N * 128,
                "narrow: half of O^T must fit where Q lies");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t misalign = smem_addr(smem_raw) & (kSmemAlign - 1);
  NarrowSmem<F, N>& sm =
      *reinterpret_cast<NarrowSmem<F, N>*>(smem_raw + (misalign ? kSmemAlign - misalign : 0));

  JFM_PART_BEGIN();
  const int kvh = blockIdx.y, part = blockIdx.z;
  const int32_t* md = p.tile_md + (int64_t)part * kMetadataRow;
  const int begin_req = md[0];
  if (begin_req < 0 || begin_req >= p.b) {
    JFM_PART_END();
    return;
  }
  const int end_req = min(md[1], p.b - 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    for (int i = 0; i < kCount; ++i) {
      mbar_init(smem_addr(&sm.full[i]), 1);
      mbar_init(smem_addr(&sm.empty[i]), kConsumerThreads);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (warp >= kConsumers / 32) {
    if constexpr (kGroups > 1) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp == kConsumers / 32 && lane == 0)
      produce<F, N>(p, sm, &kmap, &aux_map, md, begin_req, end_req, kvh);
    return;
  }
  if constexpr (kGroups > 1) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  const int grp = kGroups > 1 ? warp / 4 : 0, w = warp % 4, g = lane / 4, q = lane % 4;
  const int bar_group = kBarGroup + grp;
  const int r0 = 16 * w + g;  // this thread's key rows in S^T: r0, r0 + 8
  constexpr bool kScaled = F == KvFormat::kFp8WithScale;
  constexpr int kPtCopies = kPtCopiesOf<F>;
  const float out_scale = F == KvFormat::kFp8PerTensor ? *kv_scale : 1.f;
  // Per tensor, S^T comes out times 2^-60 (Q * 2^60, K * 2^-120).
  const float scale_log2 =
      p.scale_log2 * out_scale * (F == KvFormat::kFp8PerTensor ? kPow2_60 : 1.f);
  // ... and P^T goes in times 2^120, which V's 2^-120 cancels (with scale: times scale / S_b too).
  constexpr float kPScale = F == KvFormat::kFp8PerTensor ? kPow2_120 : 1.f;
  const uint32_t sq = smem_addr(sm.q), spt = smem_addr(sm.pt[grp][0]);
  T* const pt = reinterpret_cast<T*>(sm.pt[grp][0]);
  uint32_t it0 = 0;   // ring position of the request's first page (pages of earlier requests)
  uint32_t done = 0;  // pages this warpgroup has consumed (double-buffers the reductions)

  for (int req = begin_req; req <= end_req; ++req) {
    const Piece pc = make_piece(p, md, req, begin_req, end_req, 0, 0, 0);
    load_q_narrow<T, F, N>(p, sm.q, req, kvh, threadIdx.x, kConsumers);
    fence_proxy_async();
    bar_sync(kBarConsumers, kConsumers);

    float o[8][N / 2];
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
      for (int i = 0; i < N / 2; ++i) o[mt][i] = 0.f;
    float m[kCols], l[kCols];
    int border[kCols];  // keys < border count for column c (bottom-right causal mask)
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int n = acc_col(c);
      m[c] = kMaxInit;
      l[c] = 0.f;
      border[c] = pc.seqlen - (p.causal && n < p.q_rows ? p.s_q - 1 - n / p.ng : 0);
    }
    uint32_t block_pow2[4];  // with scale: S_b's float bits (O^T of block b is kept divided by S_b)
#pragma unroll
    for (int b = 0; b < 4; ++b) block_pow2[b] = kMinScaleBits;

    // Warpgroup grp takes the pages at ring positions grp, grp + kGroups, ...
    const int first = pc.start + (int)((grp + kGroups - it0 % kGroups) % kGroups);
#pragma unroll 1
    for (int b = first; b < pc.end; b += kGroups, ++done) {
      const uint32_t it = it0 + (uint32_t)(b - pc.start);
      const int st = it % kCount;
      const uint32_t stage = smem_addr(sm.stage[st]);
      mbar_wait(smem_addr(&sm.full[st]), (it / kCount) & 1);
      const int valid = valid_rows(pc.seqlen, b);

      float s[N / 2], sb[4][N / 2];
      qk_narrow<T, F, N>(s, sb, stage, sq, r0, q);
      float key_scale[2][4];  // with scale: the scales of key rows r0, r0 + 8 (0 past `valid`)
      if constexpr (kScaled) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = r0 + 8 * hf;
          const uint4 v = lds128(stage + Stage<F>::kScales + r * 16);
          const uint32_t bits[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) key_scale[hf][j] = r < valid ? __uint_as_float(bits[j]) : 0.f;
        }
        // S^T = RoPE part + 2^60 * sum over blocks of block sum * the key's scale. (The 2^60 comes
        // last: folded into the scales it would overflow for scales >= 2^68, and a sum too small
        // for float32 here is one that 2^60 would not make count.)
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
          const float(&ksc)[4] = key_scale[half_of(i)];
          const float nope = fmaf(sb[3][i], ksc[3],
                                  fmaf(sb[2][i], ksc[2], fmaf(sb[1][i], ksc[1], sb[0][i] * ksc[0])));
          s[i] = fmaf(nope, kPow2_60, s[i]);
        }
      }

      // ---- softmax over columns ----
      float mx[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) mx[c] = -INFINITY;
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        const int c = slot_of(i), key = b * kPageSize + r0 + 8 * half_of(i);
        s[i] = key < border[c] ? s[i] : -INFINITY;
        mx[c] = fmaxf(mx[c], s[i]);
      }
      const int rb = done & 1;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 4));
        mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 8));
        mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 16));
        if (g == 0) sm.red_max[grp][rb][w][acc_col(c)] = mx[c];
      }
      if constexpr (kScaled) {  // the page's largest |scale| per block (non-negative floats: as bits)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t mb = __reduce_max_sync(
              0xffffffffu, max(__float_as_uint(key_scale[0][j]), __float_as_uint(key_scale[1][j])) &
                               0x7FFFFFFFu);
          if (lane == 0) sm.red_scale[grp][rb][w][j] = mb;
        }
      }
      bar_sync(bar_group, kConsumerThreads);
      float alpha[kCols], psum[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int n = acc_col(c);
        const float(&rm)[4][N] = sm.red_max[grp][rb];
        const float cm = fmaxf(fmaxf(rm[0][n], rm[1][n]), fmaxf(rm[2][n], rm[3][n]));
        const float new_m = fmaxf(m[c], cm * scale_log2);
        alpha[c] = fast_exp2(m[c] - new_m);
        m[c] = new_m;
        psum[c] = 0.f;
      }
      float block_alpha[4] = {1.f, 1.f, 1.f, 1.f};  // with scale: S_b(old) / S_b(new)
      float key_factor[2][4];                        // with scale: 2^120 * scale / S_b
      if constexpr (kScaled) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t(&rs)[4][4] = sm.red_scale[grp][rb];
          const uint32_t mb = max(max(rs[0][j], rs[1][j]), max(rs[2][j], rs[3][j]));
          // S_b: the largest power of two <= the page's largest scale, or the old S_b if larger,
          // so that scale / S_b < 2 (clamped to 2^-126 .. 2^126).
          const uint32_t page_pow2 = min(max(mb & 0x7F800000u, kMinScaleBits), kMaxScaleBits);
          const uint32_t pow2 = max(block_pow2[j], page_pow2);
          const float inv = inverse_pow2(pow2);
          block_alpha[j] = __uint_as_float(block_pow2[j]) * inv;
          block_pow2[j] = pow2;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) key_factor[hf][j] = key_scale[hf][j] * inv * kPow2_120;
        }
      }
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        const int c = slot_of(i);
        const float pv = fast_exp2(fmaf(s[i], scale_log2, -m[c]));
        psum[c] += pv;
        if constexpr (kScaled) {
          s[i] = pv;  // stored below, one 8 x 8 matrix per (column group, half) and copy
        } else {
          // P^T row n = column, logical key k (SW128): key row r0 + 8 half = 16w + (g + 8 half)
          // holds key q' + 4e + 8hi of step w with q' = g % 4, e = g / 4, hi = half (key_of), so
          // k = 2q' + e + 8hi.
          const int n = acc_col(c);
          const int k = 16 * w + 2 * (g & 3) + (g >> 2) + 8 * half_of(i);
          pt[n * 64 + (((k >> 3) ^ (n & 7)) << 3) + (k & 7)] = T(pv * kPScale);
        }
      }
      if constexpr (kScaled) {
        // With scale, P^T is in natural key order (S^T row r0 + 8 half is key r0 + 8 half), so
        // each copy is four 8 x 8 matrices in the accumulator layout: matrix mi = (column group
        // mi / 2, half mi % 2) holds columns 8(mi / 2).., keys 16w + 8(mi % 2).., stored
        // transposed by one stmatrix (lane L gives row L % 8 of matrix L / 8 of P^T: column
        // 8(mi / 2) + L % 8, the 16-byte chunk of keys 2w + mi % 2).
        static_assert(N == 16, "with scale: 16 query rows (two column groups)");
        const int mi = lane >> 3, n = 8 * (mi >> 1) + (lane & 7);
        const uint32_t row = spt + n * 128 + ((((2 * w + (mi & 1)) ^ (n & 7))) << 4);
#pragma unroll
        for (int j = 0; j < kPtCopies; ++j) {
          uint32_t r[4];
#pragma unroll
          for (int mm = 0; mm < 4; ++mm) {
            const int i = 4 * (mm >> 1) + 2 * (mm & 1);  // accumulators i, i + 1: columns e = 0, 1
            const float f = key_factor[mm & 1][j];
            r[mm] = MmaOp<T>::pack(s[i] * f, s[i + 1] * f);
          }
          stmatrix_x4_trans(row + j * N * 128, r);
        }
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) l[c] = l[c] * alpha[c] + psum[c];
#pragma unroll
      for (int mt = 0; mt < 8; ++mt)
        for (int i = 0; i < N / 2; ++i) o[mt][i] *= alpha[slot_of(i)] * block_alpha[mt / 2];
      fence_proxy_async();  // P^T feeds wgmma
      bar_sync(bar_group, kConsumerThreads);

      pv_narrow<T, F, N>(o, stage, spt, w, g, q, valid);
      mbar_arrive(smem_addr(&sm.empty[st]));  // this thread's reads of the stage are done
    }
    it0 += (uint32_t)max(pc.end - pc.start, 0);
    // ---- epilogue: column sums (merged across warpgroups), then the first warpgroup writes ----
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      l[c] += __shfl_xor_sync(0xffffffffu, l[c], 4);
      l[c] += __shfl_xor_sync(0xffffffffu, l[c], 8);
      l[c] += __shfl_xor_sync(0xffffffffu, l[c], 16);
      if (g == 0) sm.red_sum[grp][w][acc_col(c)] = l[c];
    }
    if (kGroups > 1 && grp == 1) {
      if (w == 0 && g == 0) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) sm.merge_m[acc_col(c)] = m[c];
      }
      if (threadIdx.x == kConsumerThreads) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sm.merge_pow2[j] = block_pow2[j];
      }
    }
    bar_sync(kGroups > 1 ? kBarConsumers : bar_group, kConsumers);
    // Column n's sum over warpgroup h's four warps.
    auto group_sum = [&](int h, int n) {
      const float(&rsum)[4][N] = sm.red_sum[h];
      return rsum[0][n] + rsum[1][n] + rsum[2][n] + rsum[3][n];
    };
    float L[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) L[c] = group_sum(grp, acc_col(c));
    if constexpr (kGroups > 1) {
      // The first warpgroup takes the second's state: m = max of both, each side's O^T, l times
      // 2^(its m - m) (with scale also S_b(its) / S_b(merged)).
      float keep[kCols], take[kCols], keep_blk[4] = {1.f, 1.f, 1.f, 1.f},
                                     take_blk[4] = {1.f, 1.f, 1.f, 1.f};
      if (grp == 0) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int n = acc_col(c);
          const float m1 = sm.merge_m[n], l1 = group_sum(1, n);
          const float mm = fmaxf(m[c], m1);
          keep[c] = fast_exp2(m[c] - mm);
          take[c] = fast_exp2(m1 - mm);
          L[c] = L[c] * keep[c] + l1 * take[c];
          m[c] = mm;
        }
        if constexpr (kScaled) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t other = sm.merge_pow2[j], pow2 = max(block_pow2[j], other);
            const float inv = inverse_pow2(pow2);
            keep_blk[j] = __uint_as_float(block_pow2[j]) * inv;
            take_blk[j] = __uint_as_float(other) * inv;
            block_pow2[j] = pow2;
          }
        }
      }
      // [4 M-tiles x N/2][128 threads] per half: M-tiles 0..3 where Q was, 4..7 in hand_hi.
      float* const hand[2] = {reinterpret_cast<float*>(sm.q), sm.hand_hi};
      const int ct = threadIdx.x % kConsumerThreads;
      if (grp == 1) {
#pragma unroll
        for (int mt = 0; mt < 8; ++mt)
          for (int i = 0; i < N / 2; ++i)
            hand[mt / 4][((mt % 4) * (N / 2) + i) * kConsumerThreads + ct] = o[mt][i];
      }
      bar_sync(kBarConsumers, kConsumers);
      if (grp == 0) {
#pragma unroll
        for (int mt = 0; mt < 8; ++mt)
          for (int i = 0; i < N / 2; ++i)
            o[mt][i] = o[mt][i] * (keep[slot_of(i)] * keep_blk[mt / 2]) +
                       hand[mt / 4][((mt % 4) * (N / 2) + i) * kConsumerThreads + ct] *
                           (take[slot_of(i)] * take_blk[mt / 2]);
      }  // the request's last barrier orders these reads before the next request's writes
    }
    // The thread's channels come in 4 runs of 4: run r holds M-tiles 2r, 2r + 1 (rows g, g + 8)
    // and starts at channel 16(8w + g) + 4r, or with scale at 128r + 4(8w + g) (block r).
    int run_start[4];
    float run_scale[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      run_start[r] = kScaled ? 128 * r + 4 * (8 * w + g) : 16 * (8 * w + g) + 4 * r;
      run_scale[r] = kScaled ? __uint_as_float(block_pow2[r]) : 1.f;
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int n = acc_col(c);
      if (grp != 0 || n >= p.q_rows) continue;
      const bool empty = !(L[c] > 0.f);
      const float inv = empty ? 0.f : out_scale / L[c];
      float v[16];  // run r: v[4r .. 4r + 3]
#pragma unroll
      for (int mt = 0; mt < 8; ++mt)
        for (int hf = 0; hf < 2; ++hf)
          v[2 * mt + hf] = o[mt][4 * (c >> 1) + 2 * hf + (c & 1)] * (inv * run_scale[mt / 2]);
      const int tok = n / p.ng, h = kvh * p.ng + n % p.ng;
      const bool lse_writer = w == 0 && g == 0;
      if (!pc.is_split) {
        T* row = static_cast<T*>(p.out) + (((int64_t)req * p.s_q + tok) * p.h_q + h) * kHeadDimV;
#pragma unroll
        for (int r = 0; r < 4; ++r)
          *reinterpret_cast<uint2*>(row + run_start[r]) =
              make_uint2(MmaOp<T>::pack(v[4 * r], v[4 * r + 1]),
                         MmaOp<T>::pack(v[4 * r + 2], v[4 * r + 3]));
        if (lse_writer)
          p.lse[((int64_t)req * p.h_q + h) * p.s_q + tok] =
              empty ? INFINITY : (log2f(L[c]) + m[c]) * kLn2;
      } else if (pc.slot >= 0 && pc.slot < p.b + p.num_parts) {  // bad metadata: never write OOB
        const int64_t row_idx = ((int64_t)pc.slot * p.h_kv + kvh) * p.q_rows + n;
        float* acc = p.o_accum + row_idx * kHeadDimV;
#pragma unroll
        for (int r = 0; r < 4; ++r)
          *reinterpret_cast<float4*>(acc + run_start[r]) =
              make_float4(v[4 * r], v[4 * r + 1], v[4 * r + 2], v[4 * r + 3]);
        if (lse_writer) p.lse_accum[row_idx] = empty ? -INFINITY : log2f(L[c]) + m[c];
      }
    }
    bar_sync(kBarConsumers, kConsumers);  // red_sum and Q are reused by the next request
  }
  JFM_PART_END();
}

template <typename T, KvFormat F, int N>
cudaError_t launch_n(const DecodeParams& p, const CUtensorMap& map, const CUtensorMap& aux,
                     const float* kv_scale, cudaStream_t stream) {
  const dim3 grid(1, p.h_kv, p.num_parts);
  narrow_kernel<T, F, N><<<grid, kNarrowThreads<F, N>, kNarrowSmemBytes<F, N>, stream>>>(p, map, aux,
                                                                                  kv_scale);
#ifdef JFM_PART_TIMES
  if (cudaPeekAtLastError() == cudaSuccess) part_clock::print_if_asked(stream, "narrow", grid);
#endif
  return cudaGetLastError();
}

template <typename T, KvFormat F>
cudaError_t launch_rows(const DecodeParams& p, const CUtensorMap& map, const CUtensorMap& aux,
                        const float* kv_scale, cudaStream_t stream) {
  if (p.q_rows > kNarrowMaxRowsOf<F>) return cudaErrorInvalidValue;
  if constexpr (kNarrowMaxRowsOf<F> == 16) {
    return launch_n<T, F, 16>(p, map, aux, kv_scale, stream);
  } else {
    return p.q_rows <= 16 ? launch_n<T, F, 16>(p, map, aux, kv_scale, stream)
                          : launch_n<T, F, 32>(p, map, aux, kv_scale, stream);
  }
}

template <typename T, KvFormat F>
cudaError_t set_smem() {
  cudaError_t err = cudaFuncSetAttribute(narrow_kernel<T, F, 16>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kNarrowSmemBytes<F, 16>);
  if constexpr (kNarrowMaxRowsOf<F> == 16) {
    return err;
  } else {
    if (err != cudaSuccess) return err;
    return cudaFuncSetAttribute(narrow_kernel<T, F, 32>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, kNarrowSmemBytes<F, 32>);
  }
}

static_assert(kNarrowSmemBytes<KvFormat::kNative, 32> <= 232448, "narrow: too much shared memory");
static_assert(kNarrowSmemBytes<KvFormat::kFp8WithScale, 16> <= 232448,
              "narrow: too much shared memory");
static_assert(kNarrowSmemBytes<KvFormat::kFp8PerTensor, 32> <= 232448,
              "narrow: too much shared memory");

}  // namespace

cudaError_t prepare_narrow(ElemType t) {
  return t == ElemType::kBF16 ? set_smem<__nv_bfloat16, KvFormat::kNative>()
                              : set_smem<__half, KvFormat::kNative>();
}

cudaError_t launch_narrow(const DecodeParams& p, ElemType t, cudaStream_t stream) {
  const bool bf16 = t == ElemType::kBF16;
  CUtensorMap map;
  const CUresult r = encode_cache_map(
      &map, p, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      kHeadDimQK, 64, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE);
  if (r != CUDA_SUCCESS) return tensor_map_error(r);
  return bf16 ? launch_rows<__nv_bfloat16, KvFormat::kNative>(p, map, map, nullptr, stream)
              : launch_rows<__half, KvFormat::kNative>(p, map, map, nullptr, stream);
}

cudaError_t prepare_narrow_fp8() {
  if (cudaError_t err = set_smem<__nv_bfloat16, KvFormat::kFp8WithScale>(); err != cudaSuccess) {
    return err;
  }
  return set_smem<__nv_bfloat16, KvFormat::kFp8PerTensor>();
}

cudaError_t launch_narrow_fp8(const DecodeFp8Params& fp, Fp8Layout layout, cudaStream_t stream) {
  const bool ws = layout == Fp8Layout::kWithScale;
  CUtensorMap map, aux;
  if (const CUresult r = encode_fp8_cache_maps(&map, &aux, fp.base, layout); r != CUDA_SUCCESS) {
    return tensor_map_error(r);
  }
  return ws ? launch_rows<__nv_bfloat16, KvFormat::kFp8WithScale>(fp.base, map, aux, nullptr,
                                                                  stream)
            : launch_rows<__nv_bfloat16, KvFormat::kFp8PerTensor>(fp.base, map, aux, fp.kv_scale,
                                                                 stream);
}

}  // namespace jfm
