// XLA FFI handlers: decode XLA's buffers, re-check shapes cheaply (the Python layer already
// validated them at trace time), launch on XLA's stream. No allocation, no host sync, no host
// reads of device data: host work depends only on shapes and attributes, so the handlers are
// safe to capture into XLA command buffers (CUDA graphs).
#include <cstdlib>
#include <string>

#include "ffi/handler_common.h"
#include "kernels/mla.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jfm_ffi::check_decode_args;
using jfm_ffi::cuda_error;
using jfm_ffi::has_dims;
using jfm_ffi::invalid;

// cudaFuncSetAttribute once per (device, dtype).
ffi::Error ensure_decode_prepared(jfm::ElemType t) {
  static jfm_ffi::PerDeviceFlags done[2];
  return jfm_ffi::run_once_per_device(done[t == jfm::ElemType::kBF16 ? 0 : 1],
                                      "cudaFuncSetAttribute(decode)",
                                      [t] { return jfm::prepare_decode(t); });
}

// Decode back end: the narrow kernel (v5) up to kNarrowDefaultRows query rows per KV head, else
// the pipelined seesaw kernel (v4). JAX_FLASHMLA_DECODE_KERNEL=narrow|pipelined|seesaw|wgmma|mma
// forces one (narrow up to kNarrowMaxRows). The older back ends stay for comparison
// (docs/perf-notes.md).
jfm::DecodeVariant decode_variant(int64_t q_rows) {
  static const int forced = [] {
    const std::string& env = jfm_ffi::forced_decode_kernel();
    if (env == "mma") return (int)jfm::DecodeVariant::kMmaSync;
    if (env == "seesaw") return (int)jfm::DecodeVariant::kSeesaw;
    if (env == "wgmma") return (int)jfm::DecodeVariant::kWgmma;
    if (env == "pipelined") return (int)jfm::DecodeVariant::kPipelined;
    if (env == "narrow") return (int)jfm::DecodeVariant::kNarrow;
    return -1;
  }();
  if (forced >= 0 && (forced != (int)jfm::DecodeVariant::kNarrow || q_rows <= jfm::kNarrowMaxRows)) {
    return (jfm::DecodeVariant)forced;
  }
  return q_rows <= jfm::kNarrowDefaultRows ? jfm::DecodeVariant::kNarrow
                                           : jfm::DecodeVariant::kPipelined;
}


ffi::Error MetadataImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> seqlens,
                        ffi::ResultBuffer<ffi::S32> tile_md, ffi::ResultBuffer<ffi::S32> num_splits,
                        int64_t num_sm_parts) {
  auto d = seqlens.dimensions();
  if (d.size() != 1) return invalid("cache_seqlens must be rank 1");
  const int64_t b = d[0];
  if (b < 1 || b > jfm::kMaxBatch) return invalid("batch out of the supported range");
  if (num_sm_parts < 1 || !has_dims(*tile_md, {num_sm_parts, jfm::kMetadataRow}) ||
      !has_dims(*num_splits, {b + 1})) {
    return invalid("metadata output shapes do not match num_sm_parts / batch");
  }
  cudaError_t err = jfm::launch_scheduler(seqlens.typed_data(), (int)b, (int)num_sm_parts,
                                          tile_md->typed_data(), num_splits->typed_data(), stream);
  if (err != cudaSuccess) return cuda_error("scheduler launch", err);
  return ffi::Error::Success();
}

std::string dims_msg(int64_t) { return "expected head dim 576, head_dim_v 512 and page size 64"; }

ffi::Error DecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                      ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> seqlens,
                      ffi::Buffer<ffi::S32> tile_md, ffi::Buffer<ffi::S32> num_splits,
                      ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> lse,
                      ffi::ResultBuffer<ffi::F32> o_accum, ffi::ResultBuffer<ffi::F32> lse_accum,
                      float softmax_scale, bool causal, int64_t head_dim_v) {
  jfm::ElemType et;
  if (q.element_type() == ffi::DataType::BF16) {
    et = jfm::ElemType::kBF16;
  } else if (q.element_type() == ffi::DataType::F16) {
    et = jfm::ElemType::kFP16;
  } else {
    return invalid("q must be bfloat16 or float16");
  }
  if (k_cache.element_type() != q.element_type() || out->element_type() != q.element_type()) {
    return invalid("k_cache and out must have q's dtype");
  }
  jfm::DecodeParams p{};
  if (ffi::Error e = check_decode_args(q, k_cache, block_table, seqlens, tile_md, num_splits, out,
                                       lse, o_accum, lse_accum, softmax_scale, causal, head_dim_v,
                                       jfm::kHeadDimQK, dims_msg, &p);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = ensure_decode_prepared(et); e.failure()) return e;
  p.tuning = jfm_ffi::tuning_flags();

  cudaError_t launched = jfm::launch_decode(p, et, decode_variant(p.q_rows), stream);
  if (launched != cudaSuccess) {
    return cuda_error("decode launch", launched);
  }
  if (cudaError_t err = jfm::launch_combine(p, et, stream); err != cudaSuccess) {
    return cuda_error("combine launch", err);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaMetadata, MetadataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_sm_parts"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaDecode, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cache_seqlens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // tile_scheduler_metadata
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_splits
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o_accum (workspace)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse_accum (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("head_dim_v"),
                              {ffi::Traits::kCmdBufferCompatible});
