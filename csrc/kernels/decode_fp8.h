// Host-side interface of the FP8 KV-cache decode kernel (issue 5). Knows nothing about JAX or XLA.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kernels/mla.h"

namespace jfm {

// FP8 cache layouts (jax_flashmla/fp8.py):
//   kWithScale  DeepSeek V3.2's 656-byte tokens: 512 e4m3 (NoPE), 4 float32 scales (one per 128
//               NoPE channels), 64 bf16 (RoPE). k_cache [num_blocks, 64, h_kv, 656] bytes.
//   kPerTensor  [num_blocks, 64, h_kv, 576] e4m3 holding kv / kv_scale, kv_scale a device scalar.
enum class Fp8Layout { kWithScale, kPerTensor };

constexpr int kFp8WithScaleBytes = 656;  // bytes per token (and KV head) of kWithScale
constexpr int kFp8PerTensorBytes = 576;  // bytes per token (and KV head) of kPerTensor

struct DecodeFp8Params {
  // q, block_table, seqlens, metadata, outputs, workspace and sizes exactly as for the bf16 decode;
  // k_cache points at the raw FP8 bytes; q and out are bf16.
  DecodeParams base;
  const float* kv_scale;  // kPerTensor: device float32 scalar; kWithScale: unused (may be null)
};

// The kernel is v4's tile pipeline (decode_pipelined.cu) with a converter warpgroup: raw e4m3
// blocks arrive by TMA and are dequantized to bf16 tiles in place while the two MMA warpgroups run
// the seesaw schedule.

// Opts the FP8 decode kernels into large shared memory on the current device (idempotent).
cudaError_t prepare_decode_fp8();

// Split-KV decode over an FP8 cache: unsplit requests write out/lse, split pieces write
// o_accum/lse_accum (merge with launch_combine(p.base, ElemType::kBF16, stream)).
cudaError_t launch_decode_fp8(const DecodeFp8Params& p, Fp8Layout layout, cudaStream_t stream);

// The same over the narrow kernel (decode_narrow.cu; p.base.q_rows <= kNarrowMaxRows), which
// dequantizes each thread's MMA fragments on their way from shared memory to registers.
// With scale it takes at most kNarrowMaxRowsWithScale query rows per KV head (its four NoPE block
// sums of S^T would not fit in registers beside 32 rows of O^T).
constexpr int kNarrowMaxRowsWithScale = 16;
cudaError_t prepare_narrow_fp8();
cudaError_t launch_narrow_fp8(const DecodeFp8Params& p, Fp8Layout layout, cudaStream_t stream);

}  // namespace jfm
