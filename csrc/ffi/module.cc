// Python module `_jax_flashmla_ext`: hands the FFI handler symbols to Python as capsules.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" XLA_FFI_Error* JaxFlashmlaMetadata(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* JaxFlashmlaDecode(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* JaxFlashmlaDecodeFp8(XLA_FFI_CallFrame* call_frame);

NB_MODULE(_jax_flashmla_ext, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["jax_flashmla_metadata_v1"] = nb::capsule(reinterpret_cast<void*>(&JaxFlashmlaMetadata));
    d["jax_flashmla_decode_v1"] = nb::capsule(reinterpret_cast<void*>(&JaxFlashmlaDecode));
    d["jax_flashmla_decode_fp8_v1"] =
        nb::capsule(reinterpret_cast<void*>(&JaxFlashmlaDecodeFp8));
    return d;
  });
  m.def("build_info", []() {
    nb::dict d;
    d["xla_ffi_api"] = std::to_string(XLA_FFI_API_MAJOR) + "." + std::to_string(XLA_FFI_API_MINOR);
    d["cuda_version"] = JFM_CUDA_VERSION;
    d["archs"] = "sm_90a";
    return d;
  });
}
