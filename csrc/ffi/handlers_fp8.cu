// XLA FFI handler of the FP8 KV-cache decode (target jax_flashmla_decode_fp8_v1). Same contract as
// handlers.cu: decode XLA's buffers, re-check shapes cheaply (the Python layer validated them at
// trace time), launch on XLA's stream; no allocation, no host sync, no host reads of device data,
// so the handler is safe to capture into XLA command buffers (CUDA graphs).
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

#include "ffi/handler_common.h"
#include "kernels/decode_fp8.h"
#include "kernels/mla.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jfm_ffi::check_decode_args;
using jfm_ffi::cuda_error;
using jfm_ffi::invalid;

// cudaFuncSetAttribute once per device.
ffi::Error ensure_fp8_prepared() {
  static jfm_ffi::PerDeviceFlags done;
  return jfm_ffi::run_once_per_device(done, "cudaFuncSetAttribute(decode_fp8)", [] {
    cudaError_t err = jfm::prepare_decode_fp8();
    return err != cudaSuccess ? err : jfm::prepare_narrow_fp8();
  });
}

// As for bf16: the narrow kernel up to kNarrowDefaultRows query rows per KV head (up to
// kNarrowMaxRows, with scale kNarrowMaxRowsWithScale, with JAX_FLASHMLA_DECODE_KERNEL=narrow; never
// with =pipelined), else the pipelined kernel with its converter warpgroup.
bool use_narrow(int q_rows, jfm::Fp8Layout layout) {
  const std::string& forced = jfm_ffi::forced_decode_kernel();
  if (forced == "pipelined") return false;
  const int most = layout == jfm::Fp8Layout::kWithScale ? jfm::kNarrowMaxRowsWithScale
                                                        : jfm::kNarrowMaxRows;
  return q_rows <= (forced == "narrow" ? most : std::min(most, jfm::kNarrowDefaultRows));
}

std::string dims_msg(int64_t token_bytes) {
  return "expected q head dim 576, k_cache rows of " + std::to_string(token_bytes) +
         " bytes, head_dim_v 512 and page size 64";
}

ffi::Error DecodeFp8Impl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                         ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> seqlens,
                         ffi::Buffer<ffi::S32> tile_md, ffi::Buffer<ffi::S32> num_splits,
                         ffi::Buffer<ffi::F32> kv_scale, ffi::Result<ffi::AnyBuffer> out,
                         ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> o_accum,
                         ffi::ResultBuffer<ffi::F32> lse_accum, float softmax_scale, bool causal,
                         int64_t head_dim_v, std::string_view layout) {
  jfm::Fp8Layout lay;
  int64_t token_bytes;
  const ffi::DataType kt = k_cache.element_type();
  if (layout == "fp8_with_scale") {
    lay = jfm::Fp8Layout::kWithScale;
    token_bytes = jfm::kFp8WithScaleBytes;
    if (kt != ffi::DataType::U8 && kt != ffi::DataType::S8 && kt != ffi::DataType::F8E4M3FN) {
      return invalid("fp8_with_scale: k_cache must hold bytes (uint8, int8 or float8_e4m3fn)");
    }
  } else if (layout == "fp8_per_tensor") {
    lay = jfm::Fp8Layout::kPerTensor;
    token_bytes = jfm::kFp8PerTensorBytes;
    if (kt != ffi::DataType::F8E4M3FN) return invalid("fp8_per_tensor: k_cache must be float8_e4m3fn");
  } else {
    return invalid("layout must be fp8_with_scale or fp8_per_tensor, got '" + std::string(layout) +
                   "'");
  }
  if (q.element_type() != ffi::DataType::BF16 || out->element_type() != ffi::DataType::BF16) {
    return invalid("q and out must be bfloat16 with an FP8 KV cache");
  }
  jfm::DecodeFp8Params fp{};
  jfm::DecodeParams& p = fp.base;
  if (ffi::Error e = check_decode_args(q, k_cache, block_table, seqlens, tile_md, num_splits, out,
                                       lse, o_accum, lse_accum, softmax_scale, causal, head_dim_v,
                                       token_bytes, dims_msg, &p);
      e.failure()) {
    return e;
  }
  if (kv_scale.dimensions().size() != 0) return invalid("kv_scale must be a float32 scalar");
  if (ffi::Error e = ensure_fp8_prepared(); e.failure()) return e;

  fp.kv_scale = kv_scale.typed_data();
  p.tuning = jfm_ffi::tuning_flags();

  cudaError_t launched = use_narrow(p.q_rows, lay) ? jfm::launch_narrow_fp8(fp, lay, stream)
                                              : jfm::launch_decode_fp8(fp, lay, stream);
  if (launched != cudaSuccess) return cuda_error("decode_fp8 launch", launched);
  if (cudaError_t err = jfm::launch_combine(p, jfm::ElemType::kBF16, stream); err != cudaSuccess) {
    return cuda_error("combine launch", err);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaDecodeFp8, DecodeFp8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()          // q (bf16)
                                  .Arg<ffi::AnyBuffer>()          // k_cache (FP8 bytes)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cache_seqlens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // tile_scheduler_metadata
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_splits
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv_scale (scalar; 1 if unused)
                                  .Ret<ffi::AnyBuffer>()          // out (bf16)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o_accum (workspace)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse_accum (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("head_dim_v")
                                  .Attr<std::string_view>("layout"),
                              {ffi::Traits::kCmdBufferCompatible});
