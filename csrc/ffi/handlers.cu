// XLA FFI handlers: decode XLA's buffers, re-check shapes cheaply (the Python layer already
// validated them at trace time), launch on XLA's stream. No allocation, no host sync, no host
// reads of device data: host work depends only on shapes and attributes, so the handlers are
// safe to capture into XLA command buffers (CUDA graphs).
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

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

// cudaFuncSetAttribute once per (device, dtype); later calls are free and capture-safe.
ffi::Error ensure_decode_prepared(jfm::ElemType t) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices][2];
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    return cuda_error("cudaGetDevice", err);
  }
  if (device < 0 || device >= kMaxDevices) return invalid("device ordinal out of range");
  std::atomic<bool>& flag = done[device][t == jfm::ElemType::kBF16 ? 0 : 1];
  if (flag.load(std::memory_order_acquire)) return ffi::Error::Success();
  if (cudaError_t err = jfm::prepare_decode(t); err != cudaSuccess) {
    return cuda_error("cudaFuncSetAttribute(decode)", err);
  }
  flag.store(true, std::memory_order_release);
  return ffi::Error::Success();
}

// Decode back end: the pipelined seesaw kernel (v4) for every shape.
// JAX_FLASHMLA_DECODE_KERNEL=pipelined|seesaw|wgmma|mma forces one (read once; a host-side
// constant, so capture-safe). The older back ends stay for comparison (docs/perf-notes.md).
jfm::DecodeVariant decode_variant(int64_t q_rows) {
  static const int forced = [] {
    const char* env = std::getenv("JAX_FLASHMLA_DECODE_KERNEL");
    if (!env) return -1;
    if (std::strcmp(env, "mma") == 0) return (int)jfm::DecodeVariant::kMmaSync;
    if (std::strcmp(env, "seesaw") == 0) return (int)jfm::DecodeVariant::kSeesaw;
    if (std::strcmp(env, "wgmma") == 0) return (int)jfm::DecodeVariant::kWgmma;
    if (std::strcmp(env, "pipelined") == 0) return (int)jfm::DecodeVariant::kPipelined;
    return -1;
  }();
  if (forced >= 0) return (jfm::DecodeVariant)forced;
  (void)q_rows;
  return jfm::DecodeVariant::kPipelined;
}

// Kernel experiment switches (bit flags, see decode_pipelined.cu); read once, 0 = defaults.
int tuning_flags() {
  static const int flags = [] {
    const char* env = std::getenv("JAX_FLASHMLA_TUNING");
    return env ? std::atoi(env) : 0;
  }();
  return flags;
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
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return invalid("q and k_cache must be rank 4");
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2];
  const int64_t num_blocks = kd[0], h_kv = kd[2];
  if (qd[3] != jfm::kHeadDimQK || kd[3] != jfm::kHeadDimQK || kd[1] != jfm::kPageSize ||
      head_dim_v != jfm::kHeadDimV) {
    return invalid("expected head dim 576, head_dim_v 512 and page size 64");
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
  const int64_t parts = md[0];
  if (!has_dims(*out, {b, s_q, h_q, jfm::kHeadDimV}) || !has_dims(*lse, {b, h_q, s_q}) ||
      !has_dims(*o_accum, {b + parts, h_kv, q_rows, jfm::kHeadDimV}) ||
      !has_dims(*lse_accum, {b + parts, h_kv, q_rows})) {
    return invalid("output / workspace shapes do not match the inputs");
  }
  if (!(softmax_scale > 0.f) || !std::isfinite(softmax_scale)) {
    return invalid("softmax_scale must be finite and positive");
  }
  if (ffi::Error e = ensure_decode_prepared(et); e.failure()) return e;

  jfm::DecodeParams p{};
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
  p.tuning = tuning_flags();

  cudaError_t launched = jfm::launch_decode(p, et, decode_variant(q_rows), stream);
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
