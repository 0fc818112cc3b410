"""Serving on a Hopper GPU: donated caches updated in place around the kernel, the NNX layer's
absorbed decode through the kernel, and a ``jax.export`` artifact run in a fresh process.

Run by tests/gpu/run.sh on the lent H100; skipped elsewhere (conftest's gpu marker).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from gpu_cases import assert_close_device, reference_per_request
from jax_flashmla import export as fx
from jax_flashmla.kv_cache import (PageAllocator, PagedMLACache, read_tokens,
                                   write_tokens_layers)
from mla_testdata import OUT_TOL

pytestmark = pytest.mark.gpu

SCALE = 192 ** -0.5
DECODE_TARGET = "jax_flashmla_decode_v1"

# Any HLO instruction line, in any computation (XLA may move the top-level ops into command-buffer
# computations): "%name = <type> opcode(".
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s([\w\-]+)\(")


def _opcodes_with_shape(hlo: str, shape) -> list[str]:
    """Opcodes of every instruction whose result type (or a tuple element of it) has ``shape``."""
    dims = "[" + ",".join(str(d) for d in shape) + "]"
    out = []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m and dims in m.group(1):
            out.append(m.group(2))
    return out


# ------------------------------------------------------------------------------------------------
# (a) Donation: the step writes the new tokens and decodes, and the pools stay where they are
# ------------------------------------------------------------------------------------------------
N_LAYERS, H_Q, NUM_PAGES = 2, 128, 1024


def _step(caches, q, latent, rope, slots, block_table, seqlens):
    md, ns = fm.get_mla_metadata(seqlens, H_Q, 1)      # once per step, shared by the layers
    caches = write_tokens_layers(caches, latent, rope, slots)
    outs = [fm.flash_mla_with_kvcache(q[i], c.pages, block_table, seqlens, 512, md, ns,
                                      softmax_scale=SCALE)[0] for i, c in enumerate(caches)]
    return caches, jnp.stack(outs)


def _donation_inputs(seed=0):
    rng = np.random.default_rng(seed)
    alloc = PageAllocator(NUM_PAGES)
    alloc.allocate("filler", 5 * 64)              # fragment the pool: non-identity block tables
    ids = [0, 1, 2, 3]
    for i, n in zip(ids, (999, 3000, 63, 6)):     # +1 new token: page-edge 64 and short ones
        alloc.allocate(i, n)
    alloc.free("filler")
    slots = np.concatenate(alloc.allocate_batch(ids, [1] * len(ids)))
    keys = jax.random.split(jax.random.PRNGKey(seed), N_LAYERS + 1)
    # FlashMLA's data scale (randn / 10), which its tolerances (OUT_TOL) are calibrated for: with
    # larger values the bf16 rounding of P alone (in FlashMLA too) exceeds 8e-4 absolute.
    caches = tuple(PagedMLACache((jax.random.normal(k, (NUM_PAGES, 64, 1, 576)) / 10)
                                 .astype(jnp.bfloat16)) for k in keys[:N_LAYERS])
    q = (jax.random.normal(keys[-1], (N_LAYERS, len(ids), 1, H_Q, 576)) / 10).astype(jnp.bfloat16)
    latent = jnp.asarray(rng.standard_normal((N_LAYERS, len(ids), 512)) / 10, jnp.float32)
    rope = jnp.asarray(rng.standard_normal((N_LAYERS, len(ids), 64)) / 10, jnp.float32)
    return (caches, q, latent, rope, jnp.asarray(slots),
            jnp.asarray(alloc.block_table(ids, 64)), jnp.asarray(alloc.cache_seqlens(ids)))


def test_donated_write_and_decode_is_in_place():
    args = _donation_inputs()
    caches, q, latent, _, slots, bt, sl = args
    pool_shape, pool_bytes = caches[0].shape, caches[0].pages.nbytes

    donated = jax.jit(_step, donate_argnums=(0,))
    compiled = donated.lower(*args).compile()
    hlo = compiled.as_text()
    ops = _opcodes_with_shape(hlo, pool_shape)
    assert "parameter" in ops, "the HLO parser found no pool-shaped instruction"
    assert DECODE_TARGET in hlo                      # the CUDA kernel, not the reference
    assert "input_output_alias" in hlo
    assert not [o for o in ops if o.startswith("copy")], ops
    # A pool copy would need a pool-sized temporary; the split-KV workspaces are smaller.
    assert compiled.memory_analysis().temp_size_in_bytes < pool_bytes

    # Control: without donation XLA must copy each pool, and the same parser sees it.
    plain = jax.jit(_step).lower(*args).compile().as_text()
    assert [o for o in _opcodes_with_shape(plain, pool_shape) if o.startswith("copy")]

    before = [c.pages.unsafe_buffer_pointer() for c in caches]
    new, outs = compiled(*args)
    assert [c.pages.unsafe_buffer_pointer() for c in new] == before
    assert all(c.pages.is_deleted() for c in caches)

    for layer in range(N_LAYERS):
        got = np.asarray(read_tokens(new[layer], slots), np.float32)[:, :512]
        np.testing.assert_array_equal(
            got, np.asarray(latent[layer].astype(jnp.bfloat16), np.float32))
        # The kernel read the updated pool (new tokens included).
        ref_out, _ = reference_per_request(q[layer], new[layer].pages, bt, sl, SCALE, False)
        assert_close_device(outs[layer], ref_out.astype(jnp.bfloat16), name=f"layer {layer}",
                            **OUT_TOL)


# ------------------------------------------------------------------------------------------------
# (b) NNX MLA: absorbed decode through the kernel == textbook (non-absorbed) MLA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_heads", [16, 128])
def test_nnx_absorbed_decode_on_the_kernel_matches_textbook(n_heads):
    import test_nnx as nnx_cases                  # tests/test_nnx.py: oracle and serving loop

    ref_model, model = nnx_cases.bf16_twin(dict(nnx_cases.SMALL, n_heads=n_heads))
    x_prompt, x_new = nnx_cases._inputs(model.cfg)
    _, outs, cache = nnx_cases._serve(model, jnp.bfloat16, x_prompt, x_new)
    assert cache.dtype == jnp.bfloat16
    nnx_cases.assert_decode_steps_match_textbook(ref_model, outs, x_prompt, x_new, 2e-2)

    # The decode step above lowers to our kernel on this GPU (not the pure-JAX reference).
    state, _, _, decode = nnx_cases._steps(model)
    b, spec = len(nnx_cases.PROMPTS), jax.ShapeDtypeStruct
    text = decode.lower(state, cache, spec((b, 1, model.cfg.dim), jnp.bfloat16),
                        spec((b, 1), jnp.int32), spec((b,), jnp.int32),
                        spec((b, nnx_cases.MAX_BLOCKS), jnp.int32),
                        spec((b,), jnp.int32)).as_text()
    assert f"stablehlo.custom_call @{DECODE_TARGET}(" in text


# ------------------------------------------------------------------------------------------------
# (c) jax.export for cuda: serialize here, run in a fresh process on the GPU, same bits
# ------------------------------------------------------------------------------------------------
def test_cuda_export_round_trip_in_fresh_process(tmp_path):
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    import test_export as ex                      # tests/test_export.py: step and child runner

    args = ex.make_serving_inputs(seed=3)
    want = jax.jit(ex.serving_step)(*args)
    ex.check_step_outputs(args, want)
    exported = fx.export(jax.jit(ex.serving_step), platforms=("cuda",))(*ex.specs(args))
    # The child must not grab most of the GPU next to this process (and the other workers).
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.pop("JAX_PLATFORMS", None)
    got, info = ex.run_in_fresh_process(exported.serialize(), args, tmp_path, env=env)
    assert info["backend"] == "gpu"
    assert info["targets"] == list(ex.TARGETS[:2])   # it ran our (dense) metadata + decode
    ex.assert_bitwise(got, jax.tree.leaves(want))

