"""``jax.export`` of a serving step (cache write + metadata + decode): serialize it here, load and
run it in a fresh Python process, and get the same bits.

The fresh process is this file run as a script (``python test_export.py child ...``): it imports
jax_flashmla, deserializes the artifact, runs it on the inputs it is given and pickles the outputs
back. tests/gpu/test_serving_gpu.py reuses these helpers for a ``cuda`` artifact on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla import export as fx
from jax_flashmla.kv_cache import PageAllocator, PagedMLACache, read_tokens, write_tokens

SCALE = 192 ** -0.5      # DeepSeek's (nope + rope) ** -0.5
#: Fixed so the artifact's schedule shape does not depend on the machine that exports it.
NUM_SMS = 132
N_LAYERS, H_Q, S_Q = 2, 16, 2
PROMPTS = (70, 1, 130)    # crosses page boundaries; one request has a single cached token
NUM_PAGES, MAX_BLOCKS = 9, 4
TARGETS = ("jax_flashmla_metadata_v1", "jax_flashmla_decode_v1", "jax_flashmla_decode_fp8_v1")


def serving_step(caches, q, latent, rope, slots, block_table, seqlens):
    """One decode step of an ``N_LAYERS`` model: write the ``S_Q`` new tokens of every request
    into each layer's cache, schedule once, decode every layer (MTP-style causal)."""
    md, ns = fm.get_mla_metadata(seqlens, S_Q * H_Q, 1, num_sms=NUM_SMS)
    new, outs = [], []
    for layer, cache in enumerate(caches):
        cache = write_tokens(cache, latent[layer], rope[layer], slots)
        outs.append(fm.flash_mla_with_kvcache(q[layer], cache.pages, block_table, seqlens, 512,
                                              md, ns, softmax_scale=SCALE, causal=True,
                                              num_sms=NUM_SMS))
        new.append(cache)
    return tuple(new), outs, (md, ns)


def make_serving_inputs(seed=0):
    """Arguments of :func:`serving_step` (NumPy/JAX arrays): random pools, a fragmented page
    allocation, and slots for the new tokens."""
    rng = np.random.default_rng(seed)
    alloc = PageAllocator(NUM_PAGES)
    alloc.allocate("filler", 64)          # so block tables are not the identity
    ids = list(range(len(PROMPTS)))
    for i, n in zip(ids, PROMPTS):
        alloc.allocate(i, n)
    alloc.free("filler")
    slots = np.concatenate(alloc.allocate_batch(ids, [S_Q] * len(ids)))
    caches = tuple(PagedMLACache(jnp.asarray(rng.standard_normal((NUM_PAGES, 64, 1, 576)) / 4,
                                             jnp.bfloat16)) for _ in range(N_LAYERS))
    b = len(ids)
    q = jnp.asarray(rng.standard_normal((N_LAYERS, b, S_Q, H_Q, 576)), jnp.bfloat16)
    latent = jnp.asarray(rng.standard_normal((N_LAYERS, b * S_Q, 512)), jnp.float32)
    rope = jnp.asarray(rng.standard_normal((N_LAYERS, b * S_Q, 64)), jnp.float32)
    return (caches, q, latent, rope, jnp.asarray(slots),
            jnp.asarray(alloc.block_table(ids, MAX_BLOCKS)), jnp.asarray(alloc.cache_seqlens(ids)))


def specs(args):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)


def assert_bitwise(got_leaves, want_leaves):
    assert len(got_leaves) == len(want_leaves)
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        g, w = np.asarray(g), np.asarray(w)
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (i, g.dtype, g.shape, w.dtype, w.shape)
        if g.tobytes() != w.tobytes():
            diff = np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))
            raise AssertionError(f"output leaf {i} {w.dtype}{list(w.shape)} differs "
                                 f"(max abs diff {diff})")


def check_step_outputs(args, outputs):
    """The step did real work: finite, non-trivial attention and the new tokens in the caches."""
    caches, _, latent, _, slots, _, _ = args
    new_caches, outs, (md, ns) = outputs
    for out, lse in outs:
        assert np.all(np.isfinite(np.asarray(lse)))
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        assert float(np.std(np.asarray(out, np.float32))) > 1e-3
    assert np.asarray(md).shape == (fm.num_sm_parts(NUM_SMS, S_Q * H_Q, 1), 8)
    assert np.asarray(ns)[-1] >= len(PROMPTS)          # at least one split per request
    for layer, cache in enumerate(new_caches):
        got = np.asarray(read_tokens(cache, slots), np.float32)[:, :512]
        want = np.asarray(latent[layer].astype(jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(np.asarray(cache.pages, np.float32),
                                  np.asarray(caches[layer].pages, np.float32))


def run_in_fresh_process(blob: bytes, args, workdir, *, env=None, timeout=300):
    """Runs a serialized artifact on ``args`` in a new interpreter; returns (output leaves, info).

    ``info``: the child's backend and which of our targets its compiled executable calls.
    """
    blob_path, in_path, out_path = (os.path.join(str(workdir), n)
                                    for n in ("step.jax", "in.pkl", "out.pkl"))
    with open(blob_path, "wb") as f:
        f.write(blob)
    with open(in_path, "wb") as f:
        pickle.dump([np.asarray(x) for x in jax.tree.leaves(args)], f)
    # The child imports the same jax_flashmla as this process (source tree or installed).
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fm.__file__)))
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_root, child_env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "child", blob_path,
                           in_path, out_path], capture_output=True, text=True, env=child_env,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out_path, "rb") as f:
        return pickle.load(f)


def _child_main(blob_path, in_path, out_path):
    # This process imported jax_flashmla and its export module (above) and nothing else ran.
    with open(blob_path, "rb") as f:
        exported = fx.deserialize(f.read())     # registers our CUDA targets if present
    with open(in_path, "rb") as f:
        leaves = pickle.load(f)
    args, kwargs = jax.tree.unflatten(exported.in_tree, [jnp.asarray(x) for x in leaves])
    compiled = jax.jit(exported.call).lower(*args, **kwargs).compile()
    outs = compiled(*args, **kwargs)
    hlo = compiled.as_text()
    info = {"backend": jax.default_backend(),
            "targets": [t for t in fx.CUSTOM_CALL_TARGETS if t in hlo]}
    with open(out_path, "wb") as f:
        pickle.dump(([np.asarray(x) for x in jax.tree.leaves(outs)], info), f)


# ------------------------------------------------------------------------------------------------
needs_flatbuffers = pytest.mark.skipif(
    importlib.util.find_spec("flatbuffers") is None,
    reason="jax.export serialization needs the 'flatbuffers' package (pip install flatbuffers)")
needs_extension = pytest.mark.skipif(
    not fm.is_built_with_cuda(),
    reason="jax_flashmla was built without its CUDA extension, so it cannot lower for cuda")


@pytest.fixture(scope="module")
def inputs():
    args = make_serving_inputs()
    want = jax.jit(serving_step)(*args)
    check_step_outputs(args, want)
    return args, jax.tree.leaves(want)


def test_disabled_checks_name_our_targets():
    assert fx.CUSTOM_CALL_TARGETS == TARGETS
    assert [str(c) for c in fx.export_disabled_checks()] == [f"custom_call:{t}" for t in TARGETS]


@needs_flatbuffers
@pytest.mark.parametrize("platforms", [("cpu",), pytest.param(("cpu", "cuda"),
                                                              marks=needs_extension)])
def test_cpu_round_trip_in_fresh_process_is_bitwise(inputs, platforms, tmp_path):
    args, want = inputs
    exported = fx.export(jax.jit(serving_step), platforms=platforms)(*specs(args))
    assert exported.platforms == platforms
    text = exported.mlir_module()
    if platforms == ("cpu",):
        # The CPU lowering is plain JAX: the artifact runs wherever JAX runs.
        assert "custom_call @jax_flashmla" not in text
    else:
        assert text.count("custom_call @jax_flashmla_decode_v1") == N_LAYERS
    got, info = run_in_fresh_process(exported.serialize(), args, tmp_path,
                                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert info["backend"] == "cpu" and info["targets"] == []
    assert_bitwise(got, want)


@needs_extension
def test_cuda_export_on_a_cpu_machine():
    args = make_serving_inputs()
    step = jax.jit(serving_step)
    # Without the helper's checks jax.export refuses our (unstable-to-JAX) custom calls.
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        jax.export.export(step, platforms=("cuda",))(*specs(args))
    exported = fx.export(step, platforms=("cuda",))(*specs(args))
    assert exported.platforms == ("cuda",)
    text = exported.mlir_module()
    # Metadata once per step, shared by the layers; one decode per layer.
    assert text.count("stablehlo.custom_call @jax_flashmla_metadata_v1(") == 1
    assert text.count("stablehlo.custom_call @jax_flashmla_decode_v1(") == N_LAYERS
    parts = fm.num_sm_parts(NUM_SMS, S_Q * H_Q, 1)
    assert f"num_sm_parts = {parts} : i64" in text


@needs_extension
@needs_flatbuffers
def test_cuda_artifact_serializes_and_names_our_targets():
    args = make_serving_inputs()
    blob = fx.export(jax.jit(serving_step), platforms=("cuda",))(*specs(args)).serialize()
    for target in TARGETS:
        assert target.encode() in bytes(blob)
    back = fx.deserialize(blob)
    assert back.platforms == ("cuda",)
    assert [str(c) for c in back.disabled_safety_checks] == [f"custom_call:{t}" for t in TARGETS]
    assert back.in_tree == jax.tree.structure(((specs(args)), {}))
    assert "stablehlo.custom_call @jax_flashmla_decode_v1(" in back.mlir_module()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "child":
    _child_main(*sys.argv[2:])
