"""Which GPU we compile for: SM count and compute capability, resolved at trace time."""

from __future__ import annotations

import jax

#: SM count used when no GPU is visible and none is given (H100/H800/H200 SXM have 132).
DEFAULT_NUM_SMS = 132


def _gpu_device():
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return devices[0] if devices else None


def resolve_num_sms(num_sms: int | None) -> int:
    """``num_sms`` if given, else the target GPU's ``core_count``, else ``DEFAULT_NUM_SMS``.

    Metadata depends on the SM count (it fixes ``num_sm_parts``), so CPU and GPU give the same
    metadata for the same inputs only when they resolve to the same count; pass ``num_sms``
    explicitly for AOT / export / cross-compilation.
    """
    if num_sms is not None:
        if int(num_sms) < 1:
            raise ValueError(f"num_sms must be a positive int, got {num_sms!r}")
        return int(num_sms)
    try:
        mesh_device = jax.sharding.get_abstract_mesh().abstract_device
        cores = getattr(mesh_device, "num_cores", None) if mesh_device is not None else None
        if cores:
            return int(cores)
    except Exception:  # noqa: BLE001 - older jax without abstract meshes
        pass
    dev = _gpu_device()
    cores = getattr(dev, "core_count", None) if dev is not None else None
    return int(cores) if cores else DEFAULT_NUM_SMS


def gpu_compute_capability() -> str | None:
    dev = _gpu_device()
    return getattr(dev, "compute_capability", None) if dev is not None else None
