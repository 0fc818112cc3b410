"""pytest configuration for jax_flashmla.

* JAX runs with its defaults: 32-bit types (``jax_enable_x64`` off), so int32 / float32 are what
  the library sees unless a test opts in with ``jax.enable_x64``.
* Tests marked ``@pytest.mark.gpu`` run only when a Hopper GPU (compute capability ``"9.0"``) is
  visible to JAX **and** jax_flashmla was built with its CUDA extension; elsewhere they are skipped
  with the reason. ``requires_hopper`` (a ``skipif`` marker) carries the same condition for use in
  test modules that want it explicitly.
* ``tests/`` is put on ``sys.path`` so that test modules in sub-folders (``tests/gpu``) can
  ``import mla_testdata``; the repository root is added only if jax_flashmla is not importable.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import pytest

jax.config.update("jax_enable_x64", False)

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

try:  # an installed jax_flashmla, or the source tree when run as `python -m pytest` from the root
    import jax_flashmla  # noqa: F401
except ImportError:  # plain `pytest` without an install: use the source tree
    sys.path.insert(0, os.path.dirname(_TESTS_DIR))


@functools.lru_cache(maxsize=1)
def hopper_skip_reason() -> str | None:
    """None if GPU tests can run here, else why not."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        return "no GPU visible to JAX"
    cc = getattr(gpus[0], "compute_capability", None)
    if cc != "9.0":
        return f"needs a Hopper GPU (compute capability 9.0), found {cc!r}"
    import jax_flashmla

    if not jax_flashmla.is_built_with_cuda():
        return ("jax_flashmla was built without its CUDA extension: "
                f"{jax_flashmla.build_info().get('reason', '')}")
    return None


requires_hopper = pytest.mark.skipif(hopper_skip_reason() is not None,
                                     reason=str(hopper_skip_reason()))


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so the marker is known under any rootdir/ini.
    config.addinivalue_line(
        "markers", "gpu: needs an sm_90 (Hopper) GPU and the compiled CUDA extension")


def pytest_collection_modifyitems(config, items):
    reason = hopper_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test skipped: {reason}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
