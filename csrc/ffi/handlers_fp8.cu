// XLA FFI handler of the FP8 KV-cache decode (target jax_flashmla_decode_fp8_v1). Same contract as
// handlers.cu: decode XLA's buffers, re-check shapes cheaply (the Python layer validated them at
// trace time), launch on XLA's stream; no allocation, no host sync, no host reads of device data,
// so the handler is safe to capture into XLA command buffers (CUDA graphs).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "kernels/decode_fp8.h"
#include "kernels/mla.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error cuda_error(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_flashmla: ") + what + ": " +
                              cudaGetErrorString(err));
}

ffi::Error invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_flashmla: " + msg);
}

template <typename Buf>
bool has_dims(const Buf& buf, std::initializer_list<int64_t> dims) {
  auto d = buf.dimensions();
  if (d.size() != dims.size()) return false;
  size_t i = 0;
  for (int64_t v : dims) {
    if (d[i++] != v) return false;
  }
  return true;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// cudaFuncSetAttribute once per device; later calls are free and capture-safe.
ffi::Error ensure_fp8_prepared() {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    return cuda_error("cudaGetDevice", err);
  }
  if (device < 0 || device >= kMaxDevices) return invalid("device ordinal out of range");
  if (done[device].load(std::memory_order_acquire)) return ffi::Error::Success();
  if (cudaError_t err = jfm::prepare_decode_fp8(); err != cudaSuccess) {
    return cuda_error("cudaFuncSetAttribute(decode_fp8)", err);
  }
  done[device].store(true, std::memory_order_release);
  return ffi::Error::Success();
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
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return invalid("q and k_cache must be rank 4");
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2];
  const int64_t num_blocks = kd[0], h_kv = kd[2];
  if (qd[3] != jfm::kHeadDimQK || kd[3] != token_bytes || kd[1] != jfm::kPageSize ||
      head_dim_v != jfm::kHeadDimV) {
    return invalid("expected q head dim 576, k_cache rows of " + std::to_string(token_bytes) +
                   " bytes, head_dim_v 512 and page size 64");
  }
  if (b < 1 || b > jfm::kMaxBatch || s_q < 1 || h_q < 1 || h_kv < 1 || h_q % h_kv ||
      num_blocks < 1 || num_blocks > INT32_MAX) {
    return invalid("bad batch / head counts");
  }
  auto bt = block_table.dimensions();
  auto md = tile_md.dimensions();
  const int64_t q_rows = s_q * h_q / h_kv;
  if (bt.size() != 2 || bt[0] != b || bt[1] < 1 || !has_dims(seqlens, {b}) || md.size() != 2 ||
      md[1] != jfm::kMetadataRow || md[0] < 1 || md[0] > 65535 || !has_dims(num_splits, {b + 1})) {
    return invalid("block_table / cache_seqlens / metadata shapes do not match q");
  }
  if (kv_scale.dimensions().size() != 0) return invalid("kv_scale must be a float32 scalar");
  const int64_t parts = md[0];
  if (!has_dims(*out, {b, s_q, h_q, jfm::kHeadDimV}) || !has_dims(*lse, {b, h_q, s_q}) ||
      !has_dims(*o_accum, {b + parts, h_kv, q_rows, jfm::kHeadDimV}) ||
      !has_dims(*lse_accum, {b + parts, h_kv, q_rows})) {
    return invalid("output / workspace shapes do not match the inputs");
  }
  if (!(softmax_scale > 0.f) || !std::isfinite(softmax_scale)) {
    return invalid("softmax_scale must be finite and positive");
  }
  // 16-byte cp.async chunks (pointer values only: no device reads).
  if (!aligned16(q.untyped_data()) || !aligned16(k_cache.untyped_data())) {
    return invalid("q and k_cache must be 16-byte aligned");
  }
  if (ffi::Error e = ensure_fp8_prepared(); e.failure()) return e;

  jfm::DecodeFp8Params fp{};
  jfm::DecodeParams& p = fp.base;
  p.q = q.untyped_data();
  p.k_cache = k_cache.untyped_data();
  p.block_table = block_table.typed_data();
  p.seqlens = seqlens.typed_data();
  p.tile_md = tile_md.typed_data();
  p.num_splits = num_splits.typed_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  p.o_accum = o_accum->typed_data();
  p.lse_accum = lse_accum->typed_data();
  p.b = (int)b;
  p.s_q = (int)s_q;
  p.h_q = (int)h_q;
  p.h_kv = (int)h_kv;
  p.ng = (int)(h_q / h_kv);
  p.q_rows = (int)q_rows;
  p.num_blocks = (int)num_blocks;
  p.max_blocks = (int)bt[1];
  p.num_parts = (int)parts;
  p.scale_log2 = softmax_scale * 1.44269504088896340736f;
  p.causal = causal && s_q > 1;
  fp.kv_scale = kv_scale.typed_data();

  if (cudaError_t err = jfm::launch_decode_fp8(fp, lay, stream); err != cudaSuccess) {
    return cuda_error("decode_fp8 launch", err);
  }
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
