// Pieces shared by the XLA FFI decode handlers (handlers.cu, handlers_fp8.cu). Host code only; like
// the handlers, nothing here allocates device memory, syncs or reads device data, so it stays safe
// under command-buffer (CUDA graph) capture.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "kernels/mla.h"
#include "xla/ffi/api/ffi.h"

namespace jfm_ffi {

namespace ffi = ::xla::ffi;

inline ffi::Error cuda_error(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_flashmla: ") + what + ": " +
                              cudaGetErrorString(err));
}

inline ffi::Error invalid(const std::string& msg) {
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

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Experiment switches for the kernels (DecodeParams::tuning), from JAX_FLASHMLA_TUNING; read once.
inline int tuning_flags() {
  static const int flags = [] {
    const char* env = std::getenv("JAX_FLASHMLA_TUNING");
    return env ? std::atoi(env) : 0;
  }();
  return flags;
}

// JAX_FLASHMLA_DECODE_KERNEL (read once; "" if unset): forces a decode back end, for comparisons
// (docs/perf-notes.md). A host-side constant, so capture-safe.
inline const std::string& forced_decode_kernel() {
  static const std::string name = [] {
    const char* env = std::getenv("JAX_FLASHMLA_DECODE_KERNEL");
    return std::string(env ? env : "");
  }();
  return name;
}

constexpr int kMaxDevices = 64;
using PerDeviceFlags = std::atomic<bool>[kMaxDevices];

// Runs prepare() (cudaFuncSetAttribute and the like) once per device, tracked in the caller's
// flags, so later calls are free and capture-safe. Two threads may both run it the first time:
// the preparations are idempotent. `what` names prepare() in its error message.
template <typename Prepare>
ffi::Error run_once_per_device(PerDeviceFlags& done, const char* what, Prepare&& prepare) {
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    return cuda_error("cudaGetDevice", err);
  }
  if (device < 0 || device >= kMaxDevices) return invalid("device ordinal out of range");
  std::atomic<bool>& flag = done[device];
  if (flag.load(std::memory_order_acquire)) return ffi::Error::Success();
  if (cudaError_t err = prepare(); err != cudaSuccess) return cuda_error(what, err);
  flag.store(true, std::memory_order_release);
  return ffi::Error::Success();
}

// Checks shared by the bf16/fp16 and FP8 decode handlers (dtypes and layout specifics stay with
// them). k_row: k_cache's row width, elements or bytes. dims_msg(k_row) builds the head dim /
// row width message, so the FP8 handler formats a string only on failure. On success fills the
// DecodeParams fields both handlers share (not tuning); on failure leaves *p alone.
inline ffi::Error check_decode_args(
    ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32> block_table,
    ffi::Buffer<ffi::S32> seqlens, ffi::Buffer<ffi::S32> tile_md, ffi::Buffer<ffi::S32> num_splits,
    ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> lse,
    ffi::ResultBuffer<ffi::F32> o_accum, ffi::ResultBuffer<ffi::F32> lse_accum, float softmax_scale,
    bool causal, int64_t head_dim_v, int64_t k_row, std::string (*dims_msg)(int64_t k_row),
    jfm::DecodeParams* p) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return invalid("q and k_cache must be rank 4");
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2];
  const int64_t num_blocks = kd[0], h_kv = kd[2];
  if (qd[3] != jfm::kHeadDimQK || kd[3] != k_row || kd[1] != jfm::kPageSize ||
      head_dim_v != jfm::kHeadDimV) {
    return invalid(dims_msg(k_row));
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
  // q: 16-byte cp.async chunks; k_cache: 16-byte chunks, and the TMA tensor map needs a 16-byte
  // aligned base (XLA's buffers always are; pointer values only, no device reads).
  if (!aligned16(q.untyped_data()) || !aligned16(k_cache.untyped_data())) {
    return invalid("q and k_cache must be 16-byte aligned");
  }

  p->q = q.untyped_data();
  p->k_cache = k_cache.untyped_data();
  p->block_table = block_table.typed_data();
  p->seqlens = seqlens.typed_data();
  p->tile_md = tile_md.typed_data();
  p->num_splits = num_splits.typed_data();
  p->out = out->untyped_data();
  p->lse = lse->typed_data();
  p->o_accum = o_accum->typed_data();
  p->lse_accum = lse_accum->typed_data();
  p->b = (int)b;
  p->s_q = (int)s_q;
  p->h_q = (int)h_q;
  p->h_kv = (int)h_kv;
  p->ng = (int)(h_q / h_kv);
  p->q_rows = (int)q_rows;
  p->num_blocks = (int)num_blocks;
  p->max_blocks = (int)bt[1];
  p->num_parts = (int)parts;
  p->scale_log2 = softmax_scale * 1.44269504088896340736f;  // log2(e): the kernels use exp2
  p->causal = causal && s_q > 1;  // one query row per request has nothing to mask
  return ffi::Error::Success();
}

}  // namespace jfm_ffi
