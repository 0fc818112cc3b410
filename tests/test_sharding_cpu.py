"""shard_map decode wrappers on 4 fake CPU devices.

The fake-device flag only takes effect before jax initializes its CPU backend, and other test
modules in this pytest process import jax first, so the checks run in a fresh interpreter
(tests/_sharding_cpu_check.py) and this module asserts on the JSON it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharding_cpu_check.py")


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runs_on_four_devices(result):
    assert result["devices"] == 4


@pytest.mark.parametrize("layout", ["dp", "dp_auto", "tp", "2d"])
def test_sharded_decode_equals_unsharded(result, layout):
    # Same per-request float32 math on each shard: the results are bit-identical.
    assert result[f"{layout}_out_diff"] == 0.0
    if layout != "dp_auto":
        assert result[f"{layout}_lse_diff"] == 0.0


@pytest.mark.parametrize("layout", ["dp", "dp_auto", "tp", "2d", "write"])
def test_no_collectives_in_compiled_hlo(result, layout):
    # No all-gather of q or the cache (nor any other collective): each device works locally.
    assert result[f"{layout}_collectives"] == []


def test_bare_op_on_sharded_operands_gathers(result):
    """Why the wrappers exist: the same check sees the gather XLA adds around the bare op."""
    assert "all-gather" in result["bare_collectives"]


@pytest.mark.parametrize("ctx", ["", "ctx_"])
def test_bare_op_on_explicit_mesh_operands(result, ctx):
    """Explicit axes: JAX does not gather for the op; the primitives take their operands whole
    (with or without a mesh context) and compute the unsharded result exactly."""
    assert result[f"bare_explicit_{ctx}out_diff"] == 0.0
    assert result[f"bare_explicit_{ctx}lse_diff"] == 0.0


def test_outputs_stay_sharded(result):
    assert result["dp_out_sharding"] == "P('data', None, None, None)"
    assert result["tp_out_sharding"] == "P(None, None, 'model', None)"


def test_data_parallel_write_is_local_and_in_place(result):
    assert result["write_diff"] == 0.0
    assert result["write_in_place"] is True
