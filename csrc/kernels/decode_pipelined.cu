// Split-KV MLA decode, sm_90a, v4: the seesaw schedule fed by a tile-granular TMA pipeline.
//
// Pages go in pairs (b in buffer K0, b + 1 in K1); WG0 owns QK^T of page b and O's left half,
// WG1 owns QK^T of page b + 1 and O's right half; they share the running row max through smem,
// and each warpgroup's softmax overlaps the other's MMAs. Per pair:
//   WG0: M0 = max(M, rowmax S0); s0 = 2^(M - M0)                                        -> S0
//        P0 = 2^(S0 - M0) (registers); O_L *= s0; O_L += P0 V0_L (RS);  wait S1
//        sp0 = P0 * s1 (P0 at WG1's max)                                                -> P0Ready
//        O_L *= s1; O_L += P1 V1_L; QK^T(b + 2)
//   WG1: wait S0; M1 = max(M0, rowmax S1); s1 = 2^(M0 - M1); P1 = 2^(S1 - M1) -> sp1    -> S1
//        O_R *= s0 s1; O_R += P1 V1_R; wait P0Ready; O_R += (P0 s1) V0_R; QK^T(b + 3)
// so after the pair both halves are at scale M1 and each O half was rescaled once per max update
// (FlashMLA's order). WG0 publishes M0 and s0 before computing P0, so WG1's softmax starts at once.
//
// Pages arrive as nine 64 x 64 tiles in four TMA copies (V_L in one, V_R in two, the RoPE tile
// alone; see PageLoader), each signalling its own mbarrier, and each copy is refilled the moment
// the last reader of its tiles is done with them (v3,
// decode_seesaw.cu, refilled a whole 72 KB buffer only after both warpgroups were done with it):
//   K0 tile 8 (RoPE of page b)  read only by WG0's QK^T(b)     -> refilled by WG0 at pair start
//   K1 tile 8 (RoPE of b + 1)   read only by WG1's QK^T(b + 1) -> refilled by WG1 at pair start
//   K0 tiles 0-3 (V_L of b)     WG0's PV(P0)                   -> refilled by WG0 after that PV
//   K0 tiles 4-7 (V_R of b)     WG1's PV(P0)                   -> refilled by WG1 after that PV
//   K1 tiles 0-3 (V_L of b + 1) WG0's PV(P1)                   -> refilled by WG0 after that PV
//   K1 tiles 4-7 (V_R of b + 1) WG1's PV(P1)                   -> refilled by WG1 after that PV
// P0 has its own tile (sp0); P1 takes Q's RoPE tile, which both warpgroups hold in registers from
// the start of a request (QK^T's tile 8 is an RS wgmma, as in FlashMLA). QK^T consumes tiles as
// they land, those refilled first first, waiting once per copy.
// Landed: a PV never waits on a tile barrier itself. The page's QK^T waited on every tile of
// it (WG0's for page b, WG1's for b + 1) before that warpgroup's S0 / S1 arrive, which the other
// warpgroup syncs on before its PV, so the TMA writes are ordered before it (FlashMLA relies on
// the same). Waiting again there cost up to 4 % where requests have four m-blocks (perf-notes v5.10).
// Out-of-range page ids become out-of-bounds TMA coordinates, which TMA fills with zeros; rows
// at or past seqlen of a partial last page are zeroed in smem before PV (garbage / NaN must not
// reach P * V; their logits are masked by selection).
//
// FP8 caches (issue 5) run the same consumer code with a third warpgroup, the converter. The MMA
// warpgroups issue TMA copies of the RAW bytes exactly where they issued tile copies: each
// 64-token x 128-channel block of e4m3 bytes (8 KB, the size of one bf16 tile) lands in the slot of
// the second of the two bf16 tiles it becomes; with scale, the bf16 RoPE goes straight to tile 8,
// per tensor its 4 KB of e4m3 land in tile 8's upper half. The converter waits for each raw block,
// dequantizes it in place (each thread reads its row before overwriting it), fences and arrives
// on the block's "ready" mbarrier, which is what the MMA warpgroups wait on instead of the TMA
// barrier. Blocks are converted in the order their raw loads are issued, two at a time, one by
// each half of the converter.
// With scale, the converter reads each token's scales from global memory itself, off the path
// of the TMA loads (see load_scales).
// setmaxnreg gives the MMA warpgroups 232 registers and the converter 40; the MMA warpgroups
// keep Q's RoPE in registers as for bf16, at the cost of a few words ptxas spills in each
// request's prologue and epilogue (none in the pair loop).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>
#include <utility>
#ifdef JFM_TRACE
#include <cstdio>
#include <cuda_runtime.h>
#endif

#include "kernels/decode_common.cuh"
#include "kernels/decode_fp8.h"
#include "kernels/fp8_dequant.cuh"
#include "kernels/mla.h"
#include "kernels/part_clock.cuh"
#include "kernels/tma_pipeline.cuh"

namespace jfm {
namespace {

using namespace decode_detail;

// Named barriers (0 is __syncthreads). Cross-warpgroup ones: 128 arrive + 128 sync = 256.
constexpr int kBarS0 = 1;       // WG0 -> WG1: P0, M0, s0 published
constexpr int kBarS1 = 2;       // WG1 -> WG0: P1, M1, s1 published
constexpr int kBarP0Free = 3;   // WG1 -> WG0: WG1's PV(P0) retired, sp0 may be rewritten
constexpr int kBarP1Free = 4;   // WG0 -> WG1: WG0's PV(P1) retired, sp1 may be rewritten
constexpr int kBarWgBase = 5;   // 5 + wg: one warpgroup only (128)
constexpr int kBarP0Ready = 7;  // WG0 -> WG1: P0 * s1 is in sp0
constexpr int kBarMma = 8;      // both MMA warpgroups (the converter does not take part)
constexpr int kBarConvert = 9;  // the converter warpgroup only
constexpr int kTiles = kHeadDimQK / 64;          // 9 tiles of 64 columns per page
constexpr uint32_t kTileBytes = kColBlockBytes;  // 8 KB

template <KvFormat F>
constexpr bool kIsFp8 = F != KvFormat::kNative;
template <KvFormat F>
constexpr int kKernelThreads = kIsFp8<F> ? 3 * kWgThreads : 2 * kWgThreads;
// Barrier slots per buffer. Native: that of each copy's first tile (0, 4, 6, 8; see PageLoader).
// FP8: 0-3 raw e4m3 block j (channels 128j..128j+127, landing in tile slot 2j+1), 4 raw RoPE,
// 5-9 the same converted ("ready").
constexpr int kBarsPerBuf = 10;
constexpr int kRawRope = 4, kReady = 5;

#ifdef JFM_TRACE
constexpr int kTracePairs = 5, kTraceEvents = 12;  // timeline probe (see trace_stamp)
#ifndef JFM_TRACE_FIRST_PAIR
#define JFM_TRACE_FIRST_PAIR 0  // the first pair stamped (later ones: a settled running max)
#endif
#endif
template <typename T>
struct PipelinedSmem {
  T q[kTileElems];
  T k[2][kTileElems];
  T p0[kTileElem];           // P of the even page (WG0 writes, both read)
  float m[kBlockM];          // shared running row max (log2 units)
  float scale0[kBlockM];     // s0 of the current pair
  float scale1[kBlockM];     // s1 of the current pair
  float row_sum[2][kBlockM];
  uint64_t tile_bar[2][kBarsPerBuf];  // TMA landed (FP8: also "converted"), see kBarsPerBuf
#ifdef JFM_TRACE
  uint32_t trace[2 * kTracePairs * kTraceEvents];  // timeline probe, see trace_stamp
#endif
};
constexpr int kPipelinedSmemBytes = (int)sizeof(PipelinedSmem<__nv_bfloat16>) + kSmemAlign;
static_assert(kPipelinedSmemBytes <= 232448, "exceeds the sm_90 per-block opt-in shared memory");

// Experiment switch (DecodeParams::tuning, JAX_FLASHMLA_TUNING): 1 = after the first two pages
// of a request, issue no refills and wait for none (wrong results; times the schedule without
// load latency, to split compute/sync time from load time).
constexpr int kTuneNoLoads = 1;
// 2 = the same in odd m-blocks only, 4 = in every m-block but the first: the others load as
// usual, so L2 -> SM traffic drops to 1/2 or 1/m-blocks (what TMA multicast across an m-block
// cluster would move) while DRAM traffic and the loading CTAs' latency stay (timing only).
constexpr int kTuneNoLoadsOddMb = 2, kTuneLoadsFirstMbOnly = 4;
// 8 = O stored straight from the MMA fragments (store_result), the epilogue before v5.12 (A/B).
constexpr int kTuneDirectStore = 8;

// Timeline probe (build with -DJFM_TRACE, tests/gpu/run.sh trace; never in a shipped build):
// thread 0 of each MMA warpgroup of CTA (0, 0, 0) stamps the SM clock at fixed points of the
// first kTracePairs pairs of its first request; the first launch copies them to g_trace, which the
// host prints (dump_trace). The stores are predicated in asm, like the TMA issue, so that they add
// no branch between wgmmas. No printf in the kernel: a call makes ptxas serialize every wgmma
// (C7510), which is what the probe would then measure.
#ifdef JFM_TRACE
__device__ int g_trace_printed;
__device__ uint32_t g_trace[2 * kTracePairs * kTraceEvents];
// Stamps go to shared memory (a global store would hold up the next fence.proxy.async, which
// waits for this thread's outstanding memory operations). With `dep` (JFM_STAMP_AFTER), its
// register is an operand, so the clock read waits until that value is computed.
__device__ __forceinline__ void trace_stamp(bool on, uint32_t* slots, int wg, int pair, int ev,
                                            float dep = 0.f) {
  const bool in_range = pair >= 0 && pair < kTracePairs;
  const int slot = (wg * kTracePairs + (in_range ? pair : 0)) * kTraceEvents + ev;
  const uint32_t addr = smem_addr(slots + slot);
  asm volatile(
      "{\n.reg .pred p;\n.reg .u32 t;\n.reg .f32 d;\nsetp.ne.b32 p, %1, 0;\nmov.f32 d, %2;\n"
      "mov.u32 t, %%clock;\n@p st.shared.u32 [%0], t;\n}\n"
      :: "r"(addr), "r"((int)(on && in_range)), "f"(dep) : "memory");
}
#define JFM_STAMP(ev) trace_stamp(trace_on, sm.trace, wg, trace_pair, ev)
#define JFM_STAMP_AFTER(ev, dep) trace_stamp(trace_on, sm.trace, wg, trace_pair, ev, dep)
#else
#define JFM_STAMP(ev) ((void)0)
#define JFM_STAMP_AFTER(ev, dep) ((void)0)
#endif

// Everything a warpgroup needs to issue and wait for page tiles.
// Native pages come in copies of several tiles (perf-notes v5.9): the issue of one TMA copy is
// ~23 instructions in every thread of the issuing warpgroup, on the chains the softmax waits
// for. V_L (tiles 0-3) is one copy of 4 tiles, V_R (tiles 4-7) two copies of 2, the RoPE tile
// one of its own. V_R's copies are smaller because its refills are read soonest (WG1 refills
// K1's V_R right before its own QK^T(b + 3) reads it): one 32 KB copy for V_R showed its
// latency on the two-m-block cases (+3 %). Each copy completes the barrier slot of its first tile.
template <KvFormat F>
struct PageLoader {
  const CUtensorMap* map;       // native: V_L copies; FP8: 128-byte raw blocks (and the ws RoPE)
  const CUtensorMap* rope_map;  // native: the RoPE tile; FP8 per tensor: each token's 64 raw RoPE bytes
  const CUtensorMap* vr_map;    // native: V_R copies
  uint32_t k_base[2];    // smem address of buffer K0 / K1
  uint32_t bar_base[2];  // smem address of tile_bar[0][0] / tile_bar[1][0]
  int kvh;
  uint64_t policy;
  bool skip_waits;  // kTuneNoLoads experiment only

  static constexpr int kVlCopyTiles = 4, kVrCopyTiles = 2;
  // Native: the tiles of the copy that brings tile t, and that copy's first tile.
  static __device__ __forceinline__ constexpr int copy_tiles(int t) {
    return t < 4 ? kVlCopyTiles : t < 8 ? kVrCopyTiles : 1;
  }
  static __device__ __forceinline__ constexpr int copy_first(int t) {
    return t / copy_tiles(t) * copy_tiles(t);
  }

  __device__ __forceinline__ uint32_t bar(int buf, int slot) const {
    return bar_base[buf] + 8 * slot;
  }
  // Tiles [t0, t1) of cache page `page` into buffer `buf`, issued by the threads with `pred` (one
  // per warpgroup). Ranges are (0, 9), (0, 4), (4, 8), (8, 9). FP8: the raw blocks behind them.
  __device__ __forceinline__ void issue(bool pred, int buf, int page, int t0, int t1) const {
    if constexpr (!kIsFp8<F>) {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        if (t < t0 || t >= t1 || t != copy_first(t)) continue;
        mbar_expect_tx(pred, bar(buf, t), copy_tiles(t) * kTileBytes);
        tma_load_tiles(pred, k_base[buf] + t * kTileBytes, t < 4 ? map : t < 8 ? vr_map : rope_map,
                       bar(buf, t), t, kvh, page, policy);
      }
    } else {
      for (int j = t0 / 2; j < min(t1, 8) / 2; ++j) {
        mbar_expect_tx(pred, bar(buf, j), kTileBytes);
        tma_load_tile(pred, k_base[buf] + (2 * j + 1) * kTileBytes, map, bar(buf, j),
                      j * kFp8BlockBytes, kvh, page, policy);
      }
      if (t1 == kTiles) {
        const uint32_t rope = k_base[buf] + 8 * kTileBytes;
        if constexpr (F == KvFormat::kFp8WithScale) {
          mbar_expect_tx(pred, bar(buf, kRawRope), kTileBytes);
          tma_load_tile(pred, rope, map, bar(buf, kRawRope), kWsRopeByte, kvh, page, policy);
        } else {
          mbar_expect_tx(pred, bar(buf, kRawRope), kTileBytes / 2);
          tma_load_tile(pred, rope + kTileBytes / 2, rope_map, bar(buf, kRawRope), kHeadDimV, kvh, page,
                        policy);
        }
      }
    }
  }
  // wait() for tile t, read right after tile t - 1 unless `first`: a run of reads waits once
  // per native copy (readers take a copy's tiles in a row, its first tile first).
  __device__ __forceinline__ void wait_in_run(int buf, int t, uint32_t parity, bool first) const {
    if (!kIsFp8<F> && !first && t != copy_first(t)) return;
    wait(buf, t, parity);
  }
  // Waits until tile t of buffer `buf` holds the page of load parity `parity` (FP8: converted).
  __device__ __forceinline__ void wait(int buf, int t, uint32_t parity) const {
    if (skip_waits) return;
    if constexpr (!kIsFp8<F>) {
      mbar_wait(bar(buf, copy_first(t)), parity);
    } else if (t < 8) {
      mbar_wait(bar(buf, kReady + t / 2), parity);
    } else {
      mbar_wait(bar(buf, F == KvFormat::kFp8WithScale ? kRawRope : kReady + kRawRope), parity);
    }
  }
};

// Order in which warpgroup kWg consumes the tiles of its page: those refilled earliest first.
// Both RoPE tiles are refilled at pair start (QK^T is their only reader); WG0 refills K0's V_L
// (tiles 0-3) itself, WG1 K1's V_R (tiles 4-7).
template <int kWg>
__device__ __forceinline__ constexpr int tile_order(int i) {
  if (kWg == 0) return (i + 8) % kTiles;
  return i == 0 ? 8 : (i < 5 ? i + 3 : i - 5);
}

// P as wgmma A fragments (wgmma_rs.cuh): pf[kk] covers keys 16kk..16kk+15, i.e. the
// accumulator columns of n-tiles 2kk and 2kk + 1, each row times its scale.
template <typename T>
__device__ __forceinline__ void pack_p(const float (&s)[8][4], float sc_lo, float sc_hi,
                                       uint32_t (&pf)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    pf[kk][0] = MmaOp<T>::pack(s[2 * kk][0] * sc_lo, s[2 * kk][1] * sc_lo);
    pf[kk][1] = MmaOp<T>::pack(s[2 * kk][2] * sc_hi, s[2 * kk][3] * sc_hi);
    pf[kk][2] = MmaOp<T>::pack(s[2 * kk + 1][0] * sc_lo, s[2 * kk + 1][1] * sc_lo);
    pf[kk][3] = MmaOp<T>::pack(s[2 * kk + 1][2] * sc_hi, s[2 * kk + 1][3] * sc_hi);
  }
}

__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
               :: "r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}
// Those fragments as the [64 x 64] SW128 tile `sp` (the other warpgroup's SS operand), fenced
// for wgmma: one stmatrix per 16 keys (4 instructions, not 16 stores and their addresses: the
// softmax phases run at the latency of their instruction chains, perf-notes v5.8). pf[kk]
// holds the 8 x 8 matrices (rows r_lo, chunk 2kk), (r_hi, 2kk), (r_lo, 2kk + 1), (r_hi,
// 2kk + 1) in stmatrix's fragment layout; lane L gives the address of row L % 8 of matrix L / 8.
template <typename T>
__device__ __forceinline__ void store_p(const uint32_t (&pf)[4][4], T* sp, int r_lo) {
  const int lane = threadIdx.x % 32, mat = lane / 8;
  const int row = (r_lo & ~15) + (mat & 1) * 8 + lane % 8;
  const uint32_t base = smem_addr(sp) + row * 128;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    stmatrix_x4(base + (((2 * kk + (mat >> 1)) ^ (row & 7)) << 4), pf[kk]);
  }
  fence_proxy_async();
}

// mask_and_max (decode_common.cuh) with each row maximum as a tree (4 dependent FMNMX, not 16),
// each key compared with the border less the thread's first key (an immediate per compare, no
// add), and no compares at all for a warp with every key inside its borders.
__device__ __forceinline__ void mask_and_max_tree(float (&s)[8][4], int blk, const Piece& pc,
                                                  float& mx_lo, float& mx_hi) {
  const int first = blk * kPageSize + 2 * (threadIdx.x % 4);
  const int d_lo = pc.border_lo - first, d_hi = pc.border_hi - first;
  float lo[8], hi[8];
  // A thread's keys are first + 8j + e, e < 2: a warp whose keys are all inside its rows'
  // borders (every page but a request's last one or two) skips the selects.
  if (!__all_sync(0xffffffffu, d_lo > 57 && d_hi > 57)) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[j][e] = j * 8 + e < d_lo ? s[j][e] : -INFINITY;
        s[j][2 + e] = j * 8 + e < d_hi ? s[j][2 + e] : -INFINITY;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    lo[j] = fmaxf(s[j][0], s[j][1]);
    hi[j] = fmaxf(s[j][2], s[j][3]);
  }
#pragma unroll
  for (int w = 4; w >= 1; w /= 2) {
#pragma unroll
    for (int j = 0; j < w; ++j) {
      lo[j] = fmaxf(lo[j], lo[j + w]);
      hi[j] = fmaxf(hi[j], hi[j + w]);
    }
  }
  mx_lo = quad_max(lo[0]);
  mx_hi = quad_max(hi[0]);
}

// The running row max moves only when a page's maximum exceeds it by more than kMaxSlack (log2
// units; FlashAttention-4's lazy rescaling), so P = 2^(S * scale - m) <= 2^kMaxSlack, and once
// a row's max has settled its scales are exactly 1 and O's rescale is skipped (rescale_rows).
// The result is the same function: O and the row sum l are kept at the same m, and
// lse = log2(l) + m; only the bf16/fp16 rounding of P differs (P <= 256 instead of <= 1).
constexpr float kMaxSlack = 8.f;
__device__ __forceinline__ float next_max(float m, float page_max) {
  return page_max > m + kMaxSlack ? page_max : m;
}
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return m_new == m_old ? 1.f : fast_exp2(m_old - m_new);
}
// O *= the rows' factors, skipped when every row of the warp keeps its scale (a warp-uniform
// branch; no wgmma of this warpgroup may be in flight here).
__device__ __forceinline__ void rescale_rows(float (&o)[32][4], float lo, float hi) {
  if (__any_sync(0xffffffffu, lo != 1.f || hi != 1.f)) scale_rows(o, lo, hi);
}

// P = 2^(S * scale - m) in place (fp32); the thread's row sums.
__device__ __forceinline__ void exp_rows(float (&s)[8][4], float scale_log2, float m_lo,
                                         float m_hi, float& sum_lo, float& sum_hi) {
  sum_lo = sum_hi = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    s[j][0] = fast_exp2(fmaf(s[j][0], scale_log2, -m_lo));
    s[j][1] = fast_exp2(fmaf(s[j][1], scale_log2, -m_lo));
    s[j][2] = fast_exp2(fmaf(s[j][2], scale_log2, -m_hi));
    s[j][3] = fast_exp2(fmaf(s[j][3], scale_log2, -m_hi));
    sum_lo += s[j][0] + s[j][1];
    sum_hi += s[j][2] + s[j][3];
  }
}

// Q's RoPE tile (columns 512..575 = tile 8 of sq) as A fragments: QK^T reads it from registers,
// which frees its 8 KB of shared memory for P1 (FlashMLA's plan).
template <typename T>
__device__ __forceinline__ void load_q_rope(const T* sq, uint32_t (&rq)[4][4], int r_lo, int r_hi) {
  const int within = 2 * (threadIdx.x % 4);
  auto word = [&](int r, int chunk) {
    return *reinterpret_cast<const uint32_t*>(sq + tile_offset(r, 64 + chunk) + within);
  };
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    rq[kk][0] = word(r_lo, 2 * kk);
    rq[kk][1] = word(r_hi, 2 * kk);
    rq[kk][2] = word(r_lo, 2 * kk + 1);
    rq[kk][3] = word(r_hi, 2 * kk + 1);
  }
}

// A pair of O values as V (T: out, packed; float: split partials) at shared address addr.
template <typename V>
__device__ __forceinline__ void sts_pair(uint32_t addr, float a, float b) {
  if constexpr (std::is_same_v<V, float>) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" :: "r"(addr), "f"(a), "f"(b) : "memory");
  } else {
    sts32(addr, MmaOp<V>::pack(a, b));
  }
}

// O (64 rows x 512, this thread's fragments times inv_lo / inv_hi) to global rows dst(r)
// (nullptr: r and every later row are padding) through shared memory: stage0 holds rows 0-63
// of 16-bit V, or rows 0-31 of float with 32-63 in stage1 (64 KB each: a page buffer's V
// tiles, free once the request's last PV has retired). Stored from the fragments, each 4- or
// 8-byte store instruction touched 8 rows (8 wavefronts) with nothing to overlap them in the
// epilogue; here each warp stores 512 contiguous bytes per instruction (1.1 us less per piece,
// perf-notes v5.12). Row r's 16-byte chunk c sits at chunk c ^ (r & 7), so a fragment store's 8
// rows hit 8 bank groups.
// Both MMA warpgroups call it (it syncs them).
template <typename V, class RowPtr>
__device__ __forceinline__ void store_rows_staged(const float (&o)[32][4], float inv_lo,
                                                  float inv_hi, int r_lo, int r_hi, int wg,
                                                  uint32_t stage0, uint32_t stage1, RowPtr dst) {
  constexpr int kRowBytes = kHeadDimV * sizeof(V), kRowsPerBuf = 65536 / kRowBytes;
  auto row_addr = [&](int r) {
    return (r < kRowsPerBuf ? stage0 : stage1) + (r % kRowsPerBuf) * kRowBytes;
  };
  const int lane = threadIdx.x % 32, swz = r_lo & 7;  // r_hi = r_lo + 8: the same swizzle
  const uint32_t row_lo = row_addr(r_lo), row_hi = row_addr(r_hi);
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int byte = (wg * 256 + j * 8 + 2 * (lane % 4)) * (int)sizeof(V);
    const uint32_t off = (((byte >> 4) ^ swz) << 4) + (byte & 15);
    sts_pair<V>(row_lo + off, o[j][0] * inv_lo, o[j][1] * inv_lo);
    sts_pair<V>(row_hi + off, o[j][2] * inv_hi, o[j][3] * inv_hi);
  }
  bar_sync(kBarMma, 2 * kWgThreads);
  constexpr int kChunks = kRowBytes / 16, kRowsPerStep = 2 * kWgThreads / kChunks;
  const int c = threadIdx.x % kChunks;
#pragma unroll 4
  for (int r = threadIdx.x / kChunks; r < kBlockM; r += kRowsPerStep) {
    V* const row = dst(r);
    if (row == nullptr) break;
    const uint4 v = lds128(row_addr(r) + ((c ^ (r & 7)) << 4));
    *reinterpret_cast<uint4*>(reinterpret_cast<char*>(row) + c * 16) = v;
  }
  fence_proxy_async();  // the next request's TMA loads overwrite these tiles (async proxy)
}

// store_result's outputs (out and lse, or the split workspace), O through store_rows_staged.
template <typename T>
__device__ __forceinline__ void store_result_staged(const DecodeParams& p, const Piece& pc,
                                                    const float (&o)[32][4], float L_lo,
                                                    float L_hi, float m_lo, float m_hi, int req,
                                                    int kvh, int m0, int r_lo, int r_hi, int wg,
                                                    uint32_t stage0, uint32_t stage1) {
  const float inv_lo = L_lo > 0.f ? 1.f / L_lo : 0.f, inv_hi = L_hi > 0.f ? 1.f / L_hi : 0.f;
  const bool lse_writer = wg == 0 && threadIdx.x % 4 == 0;
  if (!pc.is_split) {
    if (lse_writer) {
      store_lse(p, L_lo, m_lo, req, kvh, m0 + r_lo);
      store_lse(p, L_hi, m_hi, req, kvh, m0 + r_hi);
    }
    store_rows_staged<T>(o, inv_lo, inv_hi, r_lo, r_hi, wg, stage0, stage1, [&](int r) -> T* {
      const int m = m0 + r;
      if (m >= p.q_rows) return nullptr;
      const int tok = m / p.ng, h = kvh * p.ng + m % p.ng;
      return static_cast<T*>(p.out) + (((int64_t)req * p.s_q + tok) * p.h_q + h) * kHeadDimV;
    });
  } else {
    if (pc.slot < 0 || pc.slot >= p.b + p.num_parts) return;  // bad metadata: never write OOB
    const int64_t row_base = ((int64_t)pc.slot * p.h_kv + kvh) * p.q_rows + m0;
    if (lse_writer) {
      store_lse_accum(p, L_lo, m_lo, row_base, r_lo, m0);
      store_lse_accum(p, L_hi, m_hi, row_base, r_hi, m0);
    }
    store_rows_staged<float>(o, inv_lo, inv_hi, r_lo, r_hi, wg, stage0, stage1,
                             [&](int r) -> float* {
      return m0 + r < p.q_rows ? p.o_accum + (row_base + r) * kHeadDimV : nullptr;
    });
  }
}

// Issues S = Q K^T over the page in buffer `buf`, each tile's MMAs as soon as its load lands
// (tile 8 with Q's RoPE from registers); one commit group, not waited for. Tiles i0..i1-1 of
// the warpgroup's order only: a range that starts at 0 starts S from zero, one that does not
// adds to the S of an earlier range (issued, maybe in flight).
template <typename T, int kWg, class Loader>
__device__ __forceinline__ void qk_issue(float (&s)[8][4], const T* sq, const uint32_t (&rq)[4][4],
                                         const Loader& ld, int buf, uint32_t parity, int i0 = 0,
                                         int i1 = kTiles) {
  float (&sf)[32] = reinterpret_cast<float(&)[32]>(s);
  if (i0 == 0) {
#pragma unroll
    for (int i = 0; i < 32; ++i) sf[i] = 0.f;
  }
  const uint32_t q_base = smem_addr(sq), k_base = ld.k_base[buf];
  const uint64_t q_desc = smem_desc(q_base, 16, 1024), k_desc = smem_desc(k_base, 16, 1024);
  fence_regs(sf);
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    if (i < i0 || i >= i1) continue;
    const int t = tile_order<kWg>(i);
    ld.wait_in_run(buf, t, parity, i == i0);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = t * kColBlockBytes + kk * 32;
      if (t == kTiles - 1) {
        wgmma_rs_m64n64k16<T>(sf, rq[kk], desc_plus(k_desc, off));
      } else {
        MmaOp<T>::qk(sf, desc_plus(q_desc, off), desc_plus(k_desc, off), 1);
      }
    }
  }
  wgmma_commit();
}

template <typename T, int kWg, class Loader>
__device__ __forceinline__ void qk_pipelined(float (&s)[8][4], const T* sq,
                                             const uint32_t (&rq)[4][4], const Loader& ld,
                                             int buf, uint32_t parity) {
  qk_issue<T, kWg>(s, sq, rq, ld, buf, parity);
  wgmma_wait_all();
  fence_regs(reinterpret_cast<float(&)[32]>(s));
}

// Issues O_half += P V_half with P from registers (A fragments, see pack_p); not waited. The
// fragments must stay untouched until the group retires.
template <typename T>
__device__ __forceinline__ void pv_issue_rs(float (&o)[32][4], const uint32_t (&pf)[4][4],
                                            const T* sv, int half) {
  float (&of)[128] = reinterpret_cast<float(&)[128]>(o);
  const uint32_t v_base = smem_addr(sv) + half * 4 * kColBlockBytes;
  fence_regs(of);
  wgmma_fence();
  const uint64_t v_desc = smem_desc(v_base, kColBlockBytes, 1024);
#pragma unroll
  for (int ks = 0; ks < kPageSize / 16; ++ks) {
    wgmma_rs_m64n256k16_tnsp_b<T>(of, pf[ks], desc_plus(v_desc, ks * 16 * 128));
  }
  wgmma_commit();
}

// Zeroes rows >= valid of tiles [t0, t0 + 4) of a page buffer (one warpgroup), then makes the
// zeros visible to this warpgroup's wgmma.
template <typename T>
__device__ __forceinline__ void zero_rows(T* buf, int t0, int valid, int wg_tid, int wg) {
  const int rows = kPageSize - valid;
  for (int i = wg_tid; i < 4 * rows * 8; i += kWgThreads) {
    const int t = t0 + i / (rows * 8), row = valid + (i / 8) % rows, chunk = i % 8;
    *reinterpret_cast<uint4*>(buf + tile_offset(row, t * 8 + chunk)) = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async();
  bar_sync(kBarWgBase + wg, kWgThreads);
}

// ---- FP8: the converter warpgroup ---------------------------------------------------------

// Raw block j (64 tokens x 128 e4m3 channels, TMA 128-byte swizzled, in tile slot 2j + 1 of the
// page buffer at `buf`) -> bf16 tiles 2j (channels 0-63) and 2j + 1 (64-127), each value times
// the bf16x2 factor s (fp8_detail's one-multiply form; per tensor multiplies by 2^120). One thread
// converts all of row r, two raw chunks (32 values, four bf16 chunks) per step: steps 0-1 write
// tile 2j, steps 2-3 write tile 2j + 1 in place, where bf16 chunk c lands on raw chunk c, which
// this thread read in an earlier step (or, for step 3's chunks 6-7, earlier in the step). So a
// thread touches only its own row and needs no barrier. Eight consecutive rows make a
// shared-memory phase, and the swizzle spreads their accesses over the 8 bank groups.
__device__ __forceinline__ void convert_row(uint32_t buf, int j, uint32_t s, int r) {
  const uint32_t raw_row = buf + (2 * j + 1) * kTileBytes + r * 128;
  const uint32_t low_row = buf + 2 * j * kTileBytes + r * 128;
#pragma unroll
  for (int step = 0; step < 4; ++step) {
    const uint4 a = lds128(raw_row + (((2 * step) ^ (r & 7)) << 4));
    const uint4 b = lds128(raw_row + (((2 * step + 1) ^ (r & 7)) << 4));
    const uint32_t out_row = step < 2 ? low_row : raw_row;
    const int k0 = 4 * (step & 1);
    uint32_t v[4];
    fp8_detail::dequant8<true>(a.x, a.y, s, v);
    sts128(out_row + ((k0 ^ (r & 7)) << 4), v);
    fp8_detail::dequant8<true>(a.z, a.w, s, v);
    sts128(out_row + (((k0 + 1) ^ (r & 7)) << 4), v);
    fp8_detail::dequant8<true>(b.x, b.y, s, v);
    sts128(out_row + (((k0 + 2) ^ (r & 7)) << 4), v);
    fp8_detail::dequant8<true>(b.z, b.w, s, v);
    sts128(out_row + (((k0 + 3) ^ (r & 7)) << 4), v);
  }
}

// fp8_detail's two-multiply form for scales >= 2^8 (rare): convert_row with factor 2^120, then
// this multiplies the row the thread just wrote (its own) by s2 = scale_factor<true>. A second
// pass rather than a second instantiation of the conversion: that copy's code and registers
// cost the common case ~6 % (perf-notes v5.4).
__device__ __forceinline__ void rescale_row(uint32_t buf, int j, uint32_t s2, int r) {
#pragma unroll 1
  for (int c = 0; c < 16; ++c) {
    const uint32_t at = buf + (2 * j + c / 8) * kTileBytes + r * 128 + (((c % 8) ^ (r & 7)) << 4);
    const uint4 x = lds128(at);
    const uint32_t v[4] = {fp8_detail::bf16x2_mul(x.x, s2), fp8_detail::bf16x2_mul(x.y, s2),
                           fp8_detail::bf16x2_mul(x.z, s2), fp8_detail::bf16x2_mul(x.w, s2)};
    sts128(at, v);
  }
}

// Per tensor: the raw RoPE (64 tokens x 64 e4m3, unswizzled 64-byte rows in the upper half of tile
// slot 8) -> bf16 tile 8. Thread (r, h) converts half of row r; rows overlap across warps, so the
// whole converter reads, then syncs.
__device__ __forceinline__ void convert_rope(uint32_t buf, int r, int h) {
  const uint32_t rope = buf + 8 * kTileBytes;
  const uint32_t raw_row = rope + kTileBytes / 2 + r * 64 + h * 32;
  const uint4 in[2] = {lds128(raw_row), lds128(raw_row + 16)};
  bar_sync(kBarConvert, kWgThreads);
  const uint32_t out_row = rope + r * 128;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint32_t v[4];
    const int c = 4 * h + 2 * i;
    fp8_detail::dequant8<false>(in[i].x, in[i].y, 0u, v);
    sts128(out_row + ((c ^ (r & 7)) << 4), v);
    fp8_detail::dequant8<false>(in[i].z, in[i].w, 0u, v);
    sts128(out_row + (((c + 1) ^ (r & 7)) << 4), v);
  }
}

// With scale: the two scales of token r that converter thread (r, h) applies, those of blocks h
// and 2 + h (see convert_pages), as bf16 (fp8_detail::bf16_bits) in one word, and whether one of
// them needs fp8_detail's two-multiply form (`twice`; the thread's rows then take rescale_row).
// The converter loads them from global memory at the start of a pair, under its wait for the
// pair's first block: with no TMA box of scales in the page buffer, neither the page's loads
// nor a converter-wide barrier waits on them (perf-notes v5.5). An out-of-range page id reads
// nothing: TMA fills that page with zeros, so any finite scale does.
struct PackedScales {
  uint32_t w;
  bool twice;
};
__device__ __forceinline__ float4 load_scales(const DecodeParams& p, int page, int r, int kvh) {
  if (page < 0 || page >= p.num_blocks) return make_float4(1.f, 1.f, 1.f, 1.f);
  const int64_t token = ((int64_t)page * kPageSize + r) * p.h_kv + kvh;
  return __ldg(reinterpret_cast<const float4*>(static_cast<const uint8_t*>(p.k_cache) +
                                               token * kFp8WithScaleBytes + kHeadDimV));
}
// Packed after the wait for the pair's first block (bf16_bits is volatile), the loads' first use.
__device__ __forceinline__ PackedScales pack_scales(float4 v, int h) {
  const uint32_t lo = fp8_detail::bf16_bits(h ? v.y : v.x);
  const uint32_t hi = fp8_detail::bf16_bits(h ? v.w : v.z);
  return {lo | (hi << 16), fp8_detail::needs_twice(lo) || fp8_detail::needs_twice(hi)};
}

// The converter's loop: the same requests and pages as the MMA warpgroups, a pair (b in K0,
// b + 1 in K1) at a time, raw blocks two by two in the order their loads are issued: K0's and
// K1's RoPE (pair start, per tensor), K0 0-1 (after WG0's PV(P0)), K1 2-3 (after WG1's PV(P1)),
// K0 2-3 (after WG1's PV(P0)), K1 0-1 (after WG0's PV(P1)). That is also the order the next
// QK^Ts need them in (WG0: tiles 8, 0-7 of K0; WG1: 8, 4-7, 0-3 of K1). Of each two blocks,
// warps 0-1 (h = 0) convert the first and warps 2-3 (h = 1) the second, a row per thread, so
// the two halves of the converter never wait for each other; each block's "ready" barrier
// takes the 64 arrivals of its half.
template <KvFormat F>
__device__ __forceinline__ void convert_pages(const DecodeParams& p,
                                              PipelinedSmem<__nv_bfloat16>& sm, const int32_t* md,
                                              int begin_req, int end_req, int m0, int kvh) {
  constexpr bool kScaled = F == KvFormat::kFp8WithScale;
  const int t = threadIdx.x - 2 * kWgThreads, r = t & 63, h = t >> 6;
  uint32_t fills0 = 0, fills1 = 0;  // loads into K0 / K1 so far (their barriers' phase count)
  // Addresses come from the smem struct (offsets from one base register), where a PageLoader
  // would hold four more of the converter's 40.
  auto bar = [&](int buf, int slot) { return smem_addr(&sm.tile_bar[buf][slot]); };
  auto rope = [&](int buf, uint32_t parity) {
    mbar_wait(bar(buf, kRawRope), parity);
    convert_rope(smem_addr(sm.k[buf]), r, h);
    fence_proxy_async();
    mbar_arrive(bar(buf, kReady + kRawRope));
  };
  for (int req = begin_req; req <= end_req; ++req) {
    const Piece pc = make_piece(p, md, req, begin_req, end_req, m0, 0, 0);
    const int32_t* bt = p.block_table + (int64_t)req * p.max_blocks;
#pragma unroll 1
    for (int b = pc.start; b < pc.end; b += 2) {
      const bool has1 = b + 1 < pc.end;
      const uint32_t par0 = fills0 & 1, par1 = fills1 & 1;
      PackedScales s0{0u, false}, s1 = s0;
      if (kScaled) {
        // Loaded where their latency hides under the wait for the pair's first block and used
        // right after it: a global load left in flight would hold up the MEMBAR of the next
        // proxy fence (and page ids kept across the block loop would spill).
        const int page1 = has1 ? bt[b + 1] : -1;
        const float4 raw0 = load_scales(p, bt[b], r, kvh), raw1 = load_scales(p, page1, r, kvh);
        mbar_wait(bar(0, h), par0);
        s0 = pack_scales(raw0, h);
        s1 = pack_scales(raw1, h);
      } else {
        rope(0, par0);
        if (has1) rope(1, par1);
      }
      // Step k converts blocks base and base + 1 of buffer buf, this thread block base + h:
      // (0, 0-1) (1, 2-3) (0, 2-3) (1, 0-1). A loop, not unrolled: one copy of the conversion
      // code (the kernel's code is larger than the instruction cache).
#pragma unroll 1
      for (int k = 0; k < 4; ++k) {
        const int buf = k & 1, base = 2 * ((k >> 1) ^ buf), j = base + h;
        if (buf == 1 && !has1) continue;
        mbar_wait(bar(buf, j), buf ? par1 : par0);
        // By value: a reference to one of the two structs would put both in local memory.
        const uint32_t w = buf ? s1.w : s0.w;
        const bool twice = buf ? s1.twice : s0.twice;
        const uint32_t sb = base ? w >> 16 : w & 0xFFFFu;
        const uint32_t tiles = smem_addr(sm.k[buf]);
        const uint32_t factor = !kScaled || twice ? fp8_detail::kPow2_120x2
                                                  : fp8_detail::scale_factor<false>(sb);
        convert_row(tiles, j, factor, r);
        if (kScaled && twice) rescale_row(tiles, j, fp8_detail::scale_factor<true>(sb), r);
        fence_proxy_async();  // the MMA warpgroups read the tiles through the async proxy
        mbar_arrive(bar(buf, kReady + j));
      }
      ++fills0;
      fills1 += has1 ? 1 : 0;
    }
  }
}

// kv_scale: FP8 per tensor only (device scalar; logits and O are scaled by it, K is not).
template <typename T, KvFormat F>
__global__ void __launch_bounds__(kKernelThreads<F>, 1)
    pipelined_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap kmap,
                     const __grid_constant__ CUtensorMap rope_map, const float* kv_scale,
                     const __grid_constant__ CUtensorMap vr_map) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t misalign = smem_addr(smem_raw) & (kSmemAlign - 1);
  PipelinedSmem<T>& sm =
      *reinterpret_cast<PipelinedSmem<T>*>(smem_raw + (misalign ? kSmemAlign - misalign : 0));

  JFM_PART_BEGIN();
  const int mb = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp >> 2, rg = warp & 3;
  const int wg_tid = threadIdx.x % kWgThreads;
  const bool issuer = wg_tid == 0;  // the thread of each warpgroup that issues its TMA copies
  const int m0 = mb * kBlockM;

  const int32_t* md = p.tile_md + (int64_t)part * kMetadataRow;
  const int begin_req = md[0];
  if (begin_req < 0 || begin_req >= p.b) {
    JFM_PART_END();
    return;
  }
  const int end_req = min(md[1], p.b - 1);
  const int r_lo = rg * 16 + lane / 4, r_hi = r_lo + 8;
  const bool quad_leader = lane % 4 == 0;

  PageLoader<F> ld;
  ld.map = &kmap;
  ld.rope_map = &rope_map;
  ld.vr_map = &vr_map;
  ld.k_base[0] = smem_addr(sm.k[0]);
  ld.k_base[1] = smem_addr(sm.k[1]);
  ld.bar_base[0] = smem_addr(&sm.tile_bar[0][0]);
  ld.bar_base[1] = smem_addr(&sm.tile_bar[1][0]);
  ld.kvh = kvh;
  ld.policy = evict_first_policy();
  ld.skip_waits = false;
  // The no-loads experiment would starve the FP8 converter: native caches only.
  const bool refills = kIsFp8<F> || !((p.tuning & kTuneNoLoads) ||
                                       ((p.tuning & kTuneNoLoadsOddMb) && (mb & 1)) ||
                                       ((p.tuning & kTuneLoadsFirstMbOnly) && mb > 0));
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2 * kBarsPerBuf; ++i) {
      // FP8 "ready" barriers take one arrival per converter thread that converts the block
      // (half the converter; all of it for the per-tensor RoPE); TMA barriers one expect_tx.
      const int slot = i % kBarsPerBuf;
      const int arrivals = !kIsFp8<F> || slot < kReady ? 1
                           : slot == kReady + kRawRope ? kWgThreads
                                                       : kWgThreads / 2;
      mbar_init(ld.bar_base[0] + 8 * i, arrivals);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if constexpr (kIsFp8<F>) {
    if (wg == 2) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
      convert_pages<F>(p, sm, md, begin_req, end_req, m0, kvh);
      return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  }
  // Per tensor, S = kv_scale * (Q . K8) and O = kv_scale * (P . V8).
  const float out_scale = F == KvFormat::kFp8PerTensor ? *kv_scale : 1.f;
  const float scale_log2 = p.scale_log2 * out_scale;

  // Loads into buffer k completed so far; the page now expected there is load number fills[k],
  // so its tile barriers complete the phase of parity fills[k] & 1.
  uint32_t fills[2] = {0, 0};

  for (int req = begin_req; req <= end_req; ++req) {
    const Piece pc = make_piece(p, md, req, begin_req, end_req, m0, r_lo, r_hi);
    const int32_t* bt = p.block_table + (int64_t)req * p.max_blocks;
    float o[32][4];
#pragma unroll
    for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_lo = kMaxInit, m_hi = kMaxInit, l_lo = 0.f, l_hi = 0.f;
    float s[8][4];
    uint32_t rq[4][4];  // Q's RoPE tile as A fragments (tile 8 of QK^T)
    uint32_t pf[4][4];  // WG0's P0 as A fragments (its own PV)
    T* const sp1 = sm.q + kPTileElem;  // P1: where Q's RoPE tile was (rq holds that)

    if (pc.start < pc.end) {
      ld.skip_waits = false;
      ld.issue(threadIdx.x == 0, 0, bt[pc.start], 0, kTiles);
      if (pc.start + 1 < pc.end) ld.issue(threadIdx.x == 0, 1, bt[pc.start + 1], 0, kTiles);
      load_q<T>(p, sm.q, req, kvh, m0);
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();
      bar_sync(kBarMma, 2 * kWgThreads);
      // Both warpgroups read Q's RoPE before WG1 writes P1 over it (after S0, which WG0
      // signals after this).
      load_q_rope<T>(sm.q, rq, r_lo, r_hi);
      if (wg == 0) {
        qk_pipelined<T, 0>(s, sm.q, rq, ld, 0, fills[0] & 1);
      } else if (pc.start + 1 < pc.end) {
        qk_pipelined<T, 1>(s, sm.q, rq, ld, 1, fills[1] & 1);
      }
    }

    int next_page2 = issuer && pc.start + 2 < pc.end && refills ? bt[pc.start + 2] : 0;
    int next_page3 = issuer && pc.start + 3 < pc.end && refills ? bt[pc.start + 3] : 0;
    for (int b = pc.start; b < pc.end; b += 2) {
      const bool has1 = b + 1 < pc.end, has2 = b + 2 < pc.end, has3 = b + 3 < pc.end;
      const uint32_t par0 = fills[0] & 1, par1 = fills[1] & 1;
      ld.skip_waits = !refills && b > pc.start;
#ifdef JFM_TRACE
      const bool trace_on = wg_tid == 0 && req == begin_req && mb == 0 && kvh == 0 && part == 0;
      const int trace_pair = (b - pc.start) / 2 - JFM_TRACE_FIRST_PAIR;
#endif
      // Page ids of this pair's refills were fetched during the previous pair (the issuing
      // thread would otherwise stall on the load right at pair start). The next pair's are
      // fetched after the softmax's proxy fence: fence.proxy.async compiles to a
      // MEMBAR.ALL.CTA, which waits for this thread's outstanding loads.
      const int page2 = next_page2, page3 = next_page3;
      auto fetch_next_pages = [&] {
        next_page2 = issuer && b + 4 < pc.end && refills ? bt[b + 4] : 0;
        next_page3 = issuer && b + 5 < pc.end && refills ? bt[b + 5] : 0;
      };
      if (wg == 0) {
        JFM_STAMP(0);
        if (has2) ld.issue(issuer && refills, 0, page2, 8, 9);  // QK^T(b) is done with the RoPE tile
        float mx_lo, mx_hi;
        mask_and_max_tree(s, b, pc, mx_lo, mx_hi);
        JFM_STAMP_AFTER(9, mx_lo + mx_hi);
        const float new_lo = next_max(m_lo, mx_lo * scale_log2);
        const float new_hi = next_max(m_hi, mx_hi * scale_log2);
        const float s0_lo = rescale_factor(m_lo, new_lo), s0_hi = rescale_factor(m_hi, new_hi);
        // WG1 needs only M0 and s0: publish them first, so that its softmax starts while this
        // one computes P0.
        if (quad_leader) {
          sm.m[r_lo] = new_lo;
          sm.m[r_hi] = new_hi;
          sm.scale0[r_lo] = s0_lo;
          sm.scale0[r_hi] = s0_hi;
        }
        bar_arrive(kBarS0, kThreads);
        JFM_STAMP(1);
        float sum_lo, sum_hi;
        exp_rows(s, scale_log2, new_lo, new_hi, sum_lo, sum_hi);
        JFM_STAMP_AFTER(10, sum_lo + sum_hi);
        pack_p<T>(s, 1.f, 1.f, pf);  // P0
        l_lo = l_lo * s0_lo + sum_lo;
        l_hi = l_hi * s0_hi + sum_hi;
        rescale_rows(o, s0_lo, s0_hi);
        JFM_STAMP(2);
        const int valid0 = valid_rows(pc.seqlen, b);
        if (valid0 < kPageSize) zero_rows(sm.k[0], 0, valid0, wg_tid, 0);
        pv_issue_rs<T>(o, pf, sm.k[0], 0);  // O_L += P0 V0_L, overlapping WG1's softmax
        pv_wait(o);
        JFM_STAMP(3);
        bar_sync(kBarWgBase + 0, kWgThreads);  // all of WG0's reads of V0_L retired
        if (has2) ld.issue(issuer && refills, 0, page2, 0, 4);
        bar_sync(kBarS1, kThreads);
        JFM_STAMP(4);
        const float s1_lo = sm.scale1[r_lo], s1_hi = sm.scale1[r_hi];
        m_lo = sm.m[r_lo];
        m_hi = sm.m[r_hi];
        // WG1 takes P0 at its own (newer) max: P0 * s1 into sp0, once WG1's PV of the previous
        // pair's P0 has retired.
        // pf still holds P0 at scale 1 (its PV has retired): repacked only in a warp where s1
        // moved a row's max (with the lazy max, rarely).
        if (__any_sync(0xffffffffu, s1_lo != 1.f || s1_hi != 1.f)) pack_p<T>(s, s1_lo, s1_hi, pf);
        if (b > pc.start) bar_sync(kBarP0Free, kThreads);
        store_p<T>(pf, sm.p0, r_lo);
        fetch_next_pages();
        bar_arrive(kBarP0Ready, kThreads);
        rescale_rows(o, s1_lo, s1_hi);
        l_lo *= s1_lo;
        l_hi *= s1_hi;
        if (has3) {
          // Steady state (pages b + 1 .. b + 3 exist, so page b + 1 is full and its V_L needs
          // no zeroing): branch-free while wgmmas are in flight (a branch there makes ptxas
          // wait or serialize).
          // QK^T(b + 2) over the tiles refilled first (8, 0-3) goes right behind PV(P1), the
          // rest once PV(P1) has retired and K1's V_L refill is issued (FlashMLA's WG0 order).
          JFM_STAMP(5);
          pv_issue<T>(o, sp1, sm.k[1], 0);  // O_L += P1 V1_L (see "Landed" above)
          ld.skip_waits = !refills;
          qk_issue<T, 0>(s, sm.q, rq, ld, 0, par0 ^ 1, 0, 5);
          wgmma_wait<1>();  // PV(P1) retired (groups retire in order)
          fence_regs(reinterpret_cast<float(&)[128]>(o));
          JFM_STAMP(6);
          bar_sync(kBarWgBase + 0, kWgThreads);  // all of WG0's reads of P1 and V1_L retired
          bar_arrive(kBarP1Free, kThreads);
          ld.issue(issuer && refills, 1, page3, 0, 4);
          JFM_STAMP(7);
          qk_issue<T, 0>(s, sm.q, rq, ld, 0, par0 ^ 1, 5, kTiles);
          wgmma_wait_all();
          fence_regs(reinterpret_cast<float(&)[32]>(s));
          JFM_STAMP(8);
        } else {  // the request's last pair or two
          if (has1) {
            JFM_STAMP(5);
            const int valid1 = valid_rows(pc.seqlen, b + 1);
            if (valid1 < kPageSize) zero_rows(sm.k[1], 0, valid1, wg_tid, 0);
            pv_issue<T>(o, sp1, sm.k[1], 0);  // O_L += P1 V1_L
            pv_wait(o);
            JFM_STAMP(6);
          }
          if (has2) {
            ld.skip_waits = !refills;
            JFM_STAMP(7);
            qk_pipelined<T, 0>(s, sm.q, rq, ld, 0, par0 ^ 1);
            JFM_STAMP(8);
          }
        }
      } else {
        JFM_STAMP(0);
        if (has3) ld.issue(issuer && refills, 1, page3, 8, 9);  // QK^T(b + 1) is done
        bar_sync(kBarS0, kThreads);
        JFM_STAMP(1);
        const float m0_lo = sm.m[r_lo], m0_hi = sm.m[r_hi];
        const float s0_lo = sm.scale0[r_lo], s0_hi = sm.scale0[r_hi];
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        if (has1) mask_and_max_tree(s, b + 1, pc, mx_lo, mx_hi);
        JFM_STAMP_AFTER(9, mx_lo + mx_hi + m0_lo + m0_hi);
        const float new_lo = next_max(m0_lo, mx_lo * scale_log2);
        const float new_hi = next_max(m0_hi, mx_hi * scale_log2);
        const float s1_lo = rescale_factor(m0_lo, new_lo), s1_hi = rescale_factor(m0_hi, new_hi);
        float sum_lo = 0.f, sum_hi = 0.f;
        if (has1) {
          exp_rows(s, scale_log2, new_lo, new_hi, sum_lo, sum_hi);
          JFM_STAMP_AFTER(10, sum_lo + sum_hi);
          pack_p<T>(s, 1.f, 1.f, pf);
          // In Q's RoPE tile, the last P1 may still be read by WG0's PV.
          if (b > pc.start) bar_sync(kBarP1Free, kThreads);
          store_p<T>(pf, sp1, r_lo);
          JFM_STAMP(11);
        }
        fetch_next_pages();
        if (quad_leader) {
          sm.m[r_lo] = new_lo;
          sm.m[r_hi] = new_hi;
          sm.scale1[r_lo] = s1_lo;
          sm.scale1[r_hi] = s1_hi;
        }
        bar_arrive(kBarS1, kThreads);
        JFM_STAMP(2);
        // O_R absorbs both max updates of the pair at once; P0 arrives already at scale M1.
        rescale_rows(o, s0_lo * s1_lo, s0_hi * s1_hi);
        l_lo = l_lo * (s0_lo * s1_lo) + sum_lo;
        l_hi = l_hi * (s0_hi * s1_hi) + sum_hi;
        m_lo = new_lo;
        m_hi = new_hi;
        if (has1) {
          const int valid1 = valid_rows(pc.seqlen, b + 1);
          if (valid1 < kPageSize) zero_rows(sm.k[1], 4, valid1, wg_tid, 1);
          // From sp1, not pf: the registers are not there to keep pf and rq across the PVs.
          pv_issue<T>(o, sp1, sm.k[1], 1);  // O_R += P1 V1_R
          JFM_STAMP(8);
        }
        const int valid0 = valid_rows(pc.seqlen, b);
        if (valid0 < kPageSize) zero_rows(sm.k[0], 4, valid0, wg_tid, 1);
        JFM_STAMP(3);
        bar_sync(kBarP0Ready, kThreads);
        JFM_STAMP(4);
        pv_issue<T>(o, sm.p0, sm.k[0], 1);  // O_R += (P0 s1) V0_R
        if (has1) {
          wgmma_wait<1>();  // PV(P1) retired (groups retire in order)
          fence_regs(reinterpret_cast<float(&)[128]>(o));
          if (has3) {
            bar_sync(kBarWgBase + 1, kWgThreads);  // all of WG1's reads of V1_R retired
            ld.issue(issuer && refills, 1, page3, 4, 8);
          }
        }
        pv_wait(o);
        JFM_STAMP(5);
        if (has2) {
          bar_sync(kBarWgBase + 1, kWgThreads);  // all of WG1's reads of P0 and V0_R retired
          bar_arrive(kBarP0Free, kThreads);
          ld.issue(issuer && refills, 0, page2, 4, 8);
        }
        if (has3) {
          JFM_STAMP(6);
          ld.skip_waits = !refills;
          qk_pipelined<T, 1>(s, sm.q, rq, ld, 1, par1 ^ 1);
          JFM_STAMP(7);
        }
      }
      if (refills || b == pc.start) {
        fills[0] += 1;
        fills[1] += has1 ? 1 : 0;
      }
    }

    // ---- epilogue: both halves are at the same scale; add the two partial row sums ------
    l_lo = quad_sum(l_lo);
    l_hi = quad_sum(l_hi);
    if (quad_leader) {
      sm.row_sum[wg][r_lo] = l_lo;
      sm.row_sum[wg][r_hi] = l_hi;
    }
    bar_sync(kBarMma, 2 * kWgThreads);
    const float L_lo = sm.row_sum[0][r_lo] + sm.row_sum[1][r_lo];
    const float L_hi = sm.row_sum[0][r_hi] + sm.row_sum[1][r_hi];
    if constexpr (F == KvFormat::kFp8PerTensor) scale_rows(o, out_scale, out_scale);
    // Staged in the page buffers for native caches (FP8 not measured: its converter owns them).
    if (!kIsFp8<F> && !(p.tuning & kTuneDirectStore)) {
      store_result_staged<T>(p, pc, o, L_lo, L_hi, m_lo, m_hi, req, kvh, m0, r_lo, r_hi, wg,
                             smem_addr(sm.k[0]), smem_addr(sm.k[1]));
    } else {
      store_result<T>(p, pc, o, L_lo, L_hi, m_lo, m_hi, req, kvh, m0, r_lo, r_hi, wg, wg == 0);
    }
    bar_sync(kBarMma, 2 * kWgThreads);  // row sums and buffers are reused by the next request
  }
  JFM_PART_END();
#ifdef JFM_TRACE
  if (threadIdx.x == 0 && mb == 0 && kvh == 0 && part == 0 && atomicExch(&g_trace_printed, 1) == 0) {
    for (int i = 0; i < 2 * kTracePairs * kTraceEvents; ++i) g_trace[i] = sm.trace[i];
  }
#endif
}

#ifdef JFM_TRACE
// Prints the first launch's stamps once, from the host. Needs the stream not to be captured
// (run.sh trace turns XLA's command buffers off).
void dump_trace(cudaStream_t stream) {
  static bool printed = false;
  cudaStreamCaptureStatus status;
  if (printed || cudaStreamIsCapturing(stream, &status) != cudaSuccess ||
      status != cudaStreamCaptureStatusNone || cudaStreamSynchronize(stream) != cudaSuccess) {
    return;
  }
  int written = 0;
  uint32_t stamps[2 * kTracePairs * kTraceEvents];
  if (cudaMemcpyFromSymbol(&written, g_trace_printed, sizeof(written)) != cudaSuccess || !written ||
      cudaMemcpyFromSymbol(stamps, g_trace, sizeof(stamps)) != cudaSuccess) {
    return;
  }
  printed = true;
  for (int w = 0; w < 2; ++w)
    for (int i = 0; i < kTracePairs; ++i)
      for (int e = 0; e < kTraceEvents; ++e)
        printf("JFM_TRACE %d %d %d %u\n", w, i, e, stamps[(w * kTracePairs + i) * kTraceEvents + e]);
  fflush(stdout);
}
#endif

template <typename T, KvFormat F>
cudaError_t launch_kernel(const DecodeParams& p, const CUtensorMap& map, const CUtensorMap& rope,
                          const CUtensorMap& vr, const float* kv_scale, cudaStream_t stream) {
  const dim3 grid((p.q_rows + kBlockM - 1) / kBlockM, p.h_kv, p.num_parts);
  pipelined_kernel<T, F><<<grid, kKernelThreads<F>, kPipelinedSmemBytes, stream>>>(p, map, rope,
                                                                                   kv_scale, vr);
#ifdef JFM_PART_TIMES
  if (cudaPeekAtLastError() == cudaSuccess) part_clock::print_if_asked(stream, "pipelined", grid);
#endif
  return cudaGetLastError();
}

template <typename T, KvFormat F>
cudaError_t set_smem(void) {
  return cudaFuncSetAttribute(pipelined_kernel<T, F>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              kPipelinedSmemBytes);
}

template <typename T>
cudaError_t launch_pipelined_t(const DecodeParams& p, cudaStream_t stream) {
  using Loader = PageLoader<KvFormat::kNative>;
  const CUtensorMapDataType type = std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                  : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUtensorMap vl, vr, rope;
  for (auto [map, tiles] : {std::pair{&vl, Loader::kVlCopyTiles}, std::pair{&vr, Loader::kVrCopyTiles},
                            std::pair{&rope, 1}}) {
    if (const CUresult r = encode_cache_copy_map(map, p, type, sizeof(T), tiles); r != CUDA_SUCCESS) {
      return tensor_map_error(r);
    }
  }
#ifdef JFM_TRACE
  const cudaError_t err = launch_kernel<T, KvFormat::kNative>(p, vl, rope, vr, nullptr, stream);
  if (err == cudaSuccess) dump_trace(stream);
  return err;
#else
  return launch_kernel<T, KvFormat::kNative>(p, vl, rope, vr, nullptr, stream);
#endif
}

}  // namespace

cudaError_t prepare_pipelined(ElemType t) {
  return t == ElemType::kBF16 ? set_smem<__nv_bfloat16, KvFormat::kNative>()
                              : set_smem<__half, KvFormat::kNative>();
}

cudaError_t launch_pipelined(const DecodeParams& p, ElemType t, cudaStream_t stream) {
  return t == ElemType::kBF16 ? launch_pipelined_t<__nv_bfloat16>(p, stream)
                              : launch_pipelined_t<__half>(p, stream);
}

cudaError_t prepare_decode_fp8() {
  if (cudaError_t err = set_smem<__nv_bfloat16, KvFormat::kFp8WithScale>(); err != cudaSuccess) {
    return err;
  }
  return set_smem<__nv_bfloat16, KvFormat::kFp8PerTensor>();
}

cudaError_t launch_decode_fp8(const DecodeFp8Params& fp, Fp8Layout layout,
                              cudaStream_t stream) {
  // Raw blocks (kFp8BlockBytes e4m3 channels each = one bf16 tile's bytes per row) and, in the
  // second map, the per-tensor RoPE (with scale this kernel leaves the second map unused: its
  // converter loads the scales itself; the narrow kernel's producer uses it).
  const bool ws = layout == Fp8Layout::kWithScale;
  CUtensorMap map, rope;
  if (const CUresult r = encode_fp8_cache_maps(&map, &rope, fp.base, layout); r != CUDA_SUCCESS) {
    return tensor_map_error(r);
  }
  // (The third map, native V_R copies, is unused by the FP8 instantiations.)
  return ws ? launch_kernel<__nv_bfloat16, KvFormat::kFp8WithScale>(fp.base, map, rope, map,
                                                                    nullptr, stream)
            : launch_kernel<__nv_bfloat16, KvFormat::kFp8PerTensor>(fp.base, map, rope, map,
                                                                    fp.kv_scale, stream);
}

}  // namespace jfm
