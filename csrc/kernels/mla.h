// Host-side interface of our MLA decode kernels. Knows nothing about JAX or XLA.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace jfm {

constexpr int kHeadDimQK = 576;       // 512 latent ("NoPE") + 64 RoPE channels
constexpr int kHeadDimV = 512;        // V = the first 512 channels of the cache
constexpr int kPageSize = 64;         // tokens per cache page = KV tokens per tile
constexpr int kBlockM = 64;           // query rows (s_q * h_q / h_kv folded) per CTA tile
constexpr int kFixedOverheadBlocks = 5;
constexpr int kMetadataRow = 8;
constexpr int kMaxBatch = 32768;      // scheduler stages seqlens in shared memory

enum class ElemType { kBF16, kFP16 };

// Decode kernel back end: per-warp mma.sync (v1), warpgroup wgmma (v2), wgmma with the two
// warpgroups alternating pages so softmax overlaps MMAs (v3, "seesaw"), and v3's schedule fed by
// per-tile TMA loads that refill each tile as soon as it is free (v4, "pipelined").
// v5 ("narrow", decode_narrow.cu): for at most kNarrowMaxRows query rows per KV head, MMAs with the
// keys / channels as M and the query rows as N (S^T = K Q^T, O^T = V^T P^T), no padding rows.
// It is the default up to kNarrowDefaultRows (measured faster there; at 32 rows it ties v4 for
// bf16) and can be forced up to kNarrowMaxRows.
enum class DecodeVariant { kMmaSync, kWgmma, kSeesaw, kPipelined, kNarrow };
constexpr int kNarrowMaxRows = 32;
constexpr int kNarrowDefaultRows = 16;

// One decode call. All tensors are dense row-major, as XLA hands them over.
struct DecodeParams {
  const void* q;            // [b, s_q, h_q, 576]
  const void* k_cache;      // [num_blocks, 64, h_kv, 576]
  const int32_t* block_table;  // [b, max_blocks]
  const int32_t* seqlens;      // [b]
  const int32_t* tile_md;      // [num_parts, 8]
  const int32_t* num_splits;   // [b + 1]
  void* out;                // [b, s_q, h_q, 512]
  float* lse;               // [b, h_q, s_q]
  float* o_accum;           // [b + num_parts, h_kv, q_rows, 512]
  float* lse_accum;         // [b + num_parts, h_kv, q_rows], base 2
  int b, s_q, h_q, h_kv, ng, q_rows, num_blocks, max_blocks, num_parts;
  float scale_log2;         // softmax_scale * log2(e)
  bool causal;
  int tuning;               // experiment switches (JAX_FLASHMLA_TUNING), 0 = defaults
};

// Fills tile_md [parts, 8] and num_splits [b + 1] from seqlens [b]; 1 <= b <= kMaxBatch.
cudaError_t launch_scheduler(const int32_t* seqlens, int b, int parts, int32_t* tile_md,
                             int32_t* num_splits, cudaStream_t stream);

// Opts the decode kernels into large shared memory on the current device (idempotent).
cudaError_t prepare_decode(ElemType t);
cudaError_t prepare_seesaw(ElemType t);
cudaError_t launch_seesaw(const DecodeParams& p, ElemType t, cudaStream_t stream);
cudaError_t prepare_pipelined(ElemType t);
cudaError_t launch_pipelined(const DecodeParams& p, ElemType t, cudaStream_t stream);
cudaError_t prepare_narrow(ElemType t);
// q_rows <= kNarrowMaxRows only (else cudaErrorInvalidValue).
cudaError_t launch_narrow(const DecodeParams& p, ElemType t, cudaStream_t stream);

// Split-KV decode: unsplit requests write out/lse, split pieces write o_accum/lse_accum.
cudaError_t launch_decode(const DecodeParams& p, ElemType t, DecodeVariant v,
                          cudaStream_t stream);

// Merges split pieces into out/lse.
cudaError_t launch_combine(const DecodeParams& p, ElemType t, cudaStream_t stream);

}  // namespace jfm
