"""Loads the compiled CUDA extension and registers its XLA FFI targets (lazily, once)."""

from __future__ import annotations

import threading

import jax

#: FFI target names; the suffix versions the attribute/operand contract (exported artifacts
#: cannot bind to a changed handler).
METADATA_TARGET = "jax_flashmla_metadata_v1"
DECODE_TARGET = "jax_flashmla_decode_v1"
DECODE_FP8_TARGET = "jax_flashmla_decode_fp8_v1"

_lock = threading.Lock()
_registered = False
_ext = None
_ext_error: Exception | None = None


def extension():
    """The nanobind module ``_jax_flashmla_ext``, or None if the package was built without CUDA."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            import _jax_flashmla_ext as ext  # installed at site-packages top level
            _ext = ext
        except ImportError as e:  # CPU-only build
            _ext_error = e
    return _ext


def is_built_with_cuda() -> bool:
    return extension() is not None


def build_info() -> dict:
    ext = extension()
    if ext is None:
        return {"cuda": False, "reason": f"CUDA extension not built: {_ext_error}"}
    return {"cuda": True, **ext.build_info()}


def ensure_registered() -> None:
    """Registers our CUDA FFI targets with XLA once; raises a clear error if not built."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        ext = extension()
        if ext is None:
            raise RuntimeError(
                "jax_flashmla was built without its CUDA kernels (no nvcc at install time), so it "
                "cannot run on a GPU. Reinstall on a machine with CUDA >= 12.8 (nvcc on PATH), or "
                "run on CPU where the pure-JAX reference is used. Cause: " + str(_ext_error))
        for name, capsule in ext.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True
