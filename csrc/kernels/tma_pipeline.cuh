// mbarrier, TMA and shared-memory helpers shared by the TMA-fed decode kernels
// (decode_pipelined.cu, decode_narrow.cu), and the host-side tensor-map encoding of a paged cache.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/decode_fp8.h"
#include "kernels/mla.h"

namespace jfm {
namespace decode_detail {

// What the cache holds. kNative: T (bf16/fp16), one TMA copy per tile. kFp8*: e4m3 pages (see
// decode_fp8.h), dequantized to bf16 on chip.
enum class KvFormat { kNative, kFp8WithScale, kFp8PerTensor };

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
// The TMA issue helpers are predicated inside the asm rather than branched around: a branch on
// "the issuing thread" while wgmma accumulators are in flight makes ptxas serialize the wgmmas.
__device__ __forceinline__ void mbar_expect_tx(bool pred, uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n"
      "@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n}\n"
      :: "r"(bar), "r"(bytes), "r"((int)pred) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// One 64-token x 64-column tile of a cache page (box of the 4-D map {576, 64, h_kv, pages}).
__device__ __forceinline__ void tma_load_tile(bool pred, uint32_t dst, const CUtensorMap* map,
                                              uint32_t bar, int col, int kvh, int page,
                                              uint64_t policy) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %8, 0;\n"
      "@p cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%3, %4, %5, %6}], [%2], %7;\n}\n"
      :: "r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(col), "r"(0), "r"(kvh),
         "r"(page), "l"(policy), "r"((int)pred)
      : "memory");
}

// Tiles col_block.. of a cache page, as many as the box of `map` (encode_cache_copy_map) holds.
__device__ __forceinline__ void tma_load_tiles(bool pred, uint32_t dst, const CUtensorMap* map,
                                               uint32_t bar, int col_block, int kvh, int page,
                                               uint64_t policy) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %8, 0;\n"
      "@p cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%3, %4, %5, %6, %9}], [%2], %7;\n}\n"
      :: "r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(0), "r"(0), "r"(col_block),
         "r"(kvh), "l"(policy), "r"((int)pred), "r"(page)
      : "memory");
}

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void sts32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void sts128(uint32_t addr, const uint32_t (&v)[4]) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n"
               :: "r"(addr), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]) : "memory");
}

// cuTensorMapEncodeTiled from the driver the runtime already loaded (no -lcuda at link time).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn encode_tiled_fn() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                         cudaEnableDefault, &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      ptr = nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// A 4-D map {row bytes / elements, 64 tokens, h_kv, pages} of the cache with a box of `box_cols`
// x 64 tokens. Coordinates past any edge (a bad page id) read as zeros.
// `promotion`: the L2 fetch granularity. bf16 pages read best without promotion (256 bytes was
// 0-2 % slower on short contexts), FP8 pages with 256 bytes (their rows straddle sectors; none
// was 1-3 % slower), perf-notes v5.5.
inline CUresult encode_cache_map(CUtensorMap* map, const DecodeParams& p, CUtensorMapDataType type,
                          int elem_bytes, int row_elems, int box_cols, CUtensorMapSwizzle swizzle,
                          CUtensorMapL2promotion promotion) {
  EncodeTiledFn encode = encode_tiled_fn();
  if (!encode) return CUDA_ERROR_NOT_SUPPORTED;
  const cuuint64_t dims[4] = {(cuuint64_t)row_elems, (cuuint64_t)kPageSize, (cuuint64_t)p.h_kv,
                              (cuuint64_t)p.num_blocks};
  const cuuint64_t token_bytes = (cuuint64_t)p.h_kv * row_elems * elem_bytes;
  const cuuint64_t strides[3] = {token_bytes, (cuuint64_t)row_elems * elem_bytes,
                                 token_bytes * kPageSize};
  const cuuint32_t box[4] = {(cuuint32_t)box_cols, (cuuint32_t)kPageSize, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  return encode(map, type, 4, const_cast<void*>(p.k_cache), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, promotion,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// A 5-D map {64 columns, 64 tokens, column blocks, h_kv, pages} of a native cache (the strides
// are not in increasing order: tokens, then the 128-byte column blocks inside a row) with a box
// of 64 columns x 64 tokens x `tiles` column blocks: `tiles` consecutive SW128 tiles of a page
// in one copy, laid out in shared memory one after the other. Coordinates past any edge (a bad
// page id) read as zeros.
inline CUresult encode_cache_copy_map(CUtensorMap* map, const DecodeParams& p,
                                       CUtensorMapDataType type, int elem_bytes, int tiles) {
  EncodeTiledFn encode = encode_tiled_fn();
  if (!encode) return CUDA_ERROR_NOT_SUPPORTED;
  const cuuint64_t row_bytes = (cuuint64_t)kHeadDimQK * elem_bytes;
  const cuuint64_t token_bytes = (cuuint64_t)p.h_kv * row_bytes;
  const cuuint64_t dims[5] = {64, (cuuint64_t)kPageSize, (cuuint64_t)kHeadDimQK / 64,
                              (cuuint64_t)p.h_kv, (cuuint64_t)p.num_blocks};
  const cuuint64_t strides[4] = {token_bytes, 64 * (cuuint64_t)elem_bytes, row_bytes,
                                 token_bytes * kPageSize};
  const cuuint32_t box[5] = {64, (cuuint32_t)kPageSize, (cuuint32_t)tiles, 1, 1};
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  return encode(map, type, 5, const_cast<void*>(p.k_cache), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// An FP8 cache as both FP8 kernels read it: `blocks`, boxes of kFp8BlockBytes e4m3 bytes x 64
// tokens, 128-byte swizzled like a bf16 tile (with scale, the bf16 RoPE's 128 bytes through it land
// exactly as a bf16 tile); `aux`, unswizzled: with scale each token's kFp8ScaleBytes of float32
// scales, per tensor its 64 e4m3 RoPE bytes.
constexpr int kFp8BlockBytes = 128;
constexpr int kFp8ScaleBytes = 4 * (int)sizeof(float);
constexpr int kWsRopeByte = kHeadDimV + kFp8ScaleBytes;  // with scale: where a token's RoPE starts
inline CUresult encode_fp8_cache_maps(CUtensorMap* blocks, CUtensorMap* aux, const DecodeParams& p,
                                      Fp8Layout layout) {
  const bool ws = layout == Fp8Layout::kWithScale;
  const int row = ws ? kFp8WithScaleBytes : kFp8PerTensorBytes;
  const CUresult r = encode_cache_map(blocks, p, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, row,
                                      kFp8BlockBytes, CU_TENSOR_MAP_SWIZZLE_128B,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
  if (r != CUDA_SUCCESS) return r;
  return encode_cache_map(aux, p, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, row,
                          ws ? kFp8ScaleBytes : kHeadDimQK - kHeadDimV, CU_TENSOR_MAP_SWIZZLE_NONE,
                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

// A failed encode_cache_map as the launchers report it: no driver entry point -> not supported,
// anything else -> invalid value.
inline cudaError_t tensor_map_error(CUresult r) {
  return r == CUDA_ERROR_NOT_SUPPORTED ? cudaErrorNotSupported : cudaErrorInvalidValue;
}

}  // namespace decode_detail
}  // namespace jfm
