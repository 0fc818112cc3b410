"""``jax.export`` of steps that call jax_flashmla (serialize once, run in another process).

- **Exporting for ``cuda``** embeds our XLA FFI custom calls (:data:`CUSTOM_CALL_TARGETS`).
  ``jax.export`` refuses to serialize custom calls that JAX itself does not guarantee stable
  unless each is named in ``disabled_checks``: :func:`export_disabled_checks` gives that list,
  and :func:`export` passes it for you. It is safe to disable: the target names carry a version
  suffix (``_v1``) that changes whenever their operands or attributes change, so an artifact can
  never bind to a handler with another contract.
- **Exporting for ``cpu``** needs nothing: the CPU lowering is plain JAX, inlined, so a CPU
  artifact holds no custom call and runs wherever JAX runs. One artifact may target both
  (``platforms=("cpu", "cuda")``).
- **Loading.** Importing jax_flashmla does not register the CUDA targets with XLA (that happens
  lazily, at the first CUDA lowering), and a deserialized artifact is never lowered, so the
  process that runs a ``cuda`` artifact must register them first: :func:`deserialize` does it
  (or call :func:`register_targets`).
- **Pytrees.** Importing this module registers :class:`~jax_flashmla.kv_cache.PagedMLACache` for
  export serialization, so exported steps can take and return caches. Import it (or use
  :func:`deserialize`) in the loading process too.
- **SM count.** The split-KV schedule's size (``num_sm_parts``) is fixed at export time from
  ``num_sms`` (default: the exporting machine's GPU, else 132). Pass ``num_sms=`` to
  :func:`~jax_flashmla.get_mla_metadata` / :func:`~jax_flashmla.flash_mla_with_kvcache` for the
  GPU you will serve on; any value gives correct results, the matching one is fastest.
- Shapes must be concrete: symbolic (shape-polymorphic) dimensions are not supported.

Example::

    from jax_flashmla import export as fx
    blob = fx.export(jax.jit(step), platforms=("cuda",))(*arg_specs).serialize()
    ...                                       # another process, with jax_flashmla installed
    outs = fx.deserialize(blob).call(*args)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax import export as _jax_export

from . import _ffi
from .kv_cache import PagedMLACache

#: The XLA FFI targets our CUDA lowering emits (scheduler metadata, split-KV decode).
CUSTOM_CALL_TARGETS: tuple[str, ...] = (_ffi.METADATA_TARGET, _ffi.DECODE_TARGET,
                                         _ffi.DECODE_FP8_TARGET)


def export_disabled_checks() -> list[_jax_export.DisabledSafetyCheck]:
    """``disabled_checks`` for ``jax.export.export`` of anything that calls our CUDA kernels."""
    return [_jax_export.DisabledSafetyCheck.custom_call(name) for name in CUSTOM_CALL_TARGETS]


def export(fun_jit, *, platforms: Sequence[str] | None = None,
           disabled_checks: Sequence[_jax_export.DisabledSafetyCheck] = ()
           ) -> Callable[..., _jax_export.Exported]:
    """``jax.export.export`` with our custom-call checks disabled (see the module docstring)."""
    return _jax_export.export(fun_jit, platforms=platforms,
                              disabled_checks=[*export_disabled_checks(), *disabled_checks])


def register_targets() -> None:
    """Registers the CUDA targets with XLA (idempotent); raises if built without CUDA."""
    _ffi.ensure_registered()


def deserialize(blob) -> _jax_export.Exported:
    """``jax.export.deserialize`` that first registers our CUDA targets when the artifact may run
    on CUDA and this install has them. A CPU-only install can still load any artifact (to run a
    multi-platform one's CPU lowering, or to inspect it); only on a GPU does a CUDA-only artifact
    without the extension raise the build hint."""
    exported = _jax_export.deserialize(bytearray(blob))
    if "cuda" in exported.platforms:
        if _ffi.is_built_with_cuda():
            _ffi.ensure_registered()
        elif exported.platforms == ("cuda",) and jax.default_backend() == "gpu":
            # Fail here with the build hint rather than at compile time with XLA's
            # "no FFI handler registered".
            _ffi.ensure_registered()
    return exported


def _register_cache_serialization() -> None:
    # PagedMLACache is a dataclass pytree with no static fields: its aux data is always ().
    try:
        _jax_export.register_pytree_node_serialization(
            PagedMLACache, serialized_name="jax_flashmla.kv_cache.PagedMLACache",
            serialize_auxdata=lambda aux: b"", deserialize_auxdata=lambda data: ())
    except ValueError:  # already registered (e.g. the module was reloaded)
        pass


_register_cache_serialization()

__all__ = ["CUSTOM_CALL_TARGETS", "deserialize", "export", "export_disabled_checks",
           "register_targets"]
