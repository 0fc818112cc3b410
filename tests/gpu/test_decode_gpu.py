"""Our CUDA kernels on a Hopper GPU: scheduler, FlashMLA's dense grid and corner cases, jit/scan/vmap.

Run by tests/gpu/run.sh on the lent H100; skipped elsewhere (conftest's gpu marker).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from gpu_cases import (CORNER_SUBCASES, DENSE_SUBCASES, HEAD_PAIRS, assert_close_device,
                       make_merged, reference_per_request)
from mla_testdata import LSE_TOL, OUT_TOL, check_close

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}
SCALE = 576 ** -0.5


def _seed(*parts) -> int:
    """Deterministic per-case seed (Python's str hash is salted per process)."""
    return zlib.crc32(repr(parts).encode())


@functools.partial(jax.jit, static_argnames=("causal",))
def _decode(q, k_cache, block_table, seqlens, causal):
    md, ns = fm.get_mla_metadata(seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2],
                                 k_cache.shape[2])
    return fm.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, md, ns,
                                     softmax_scale=SCALE, causal=causal)


def _check_against_reference(q, kc, bt, sl, causal, name, scale=SCALE):
    out, lse = jax.block_until_ready(_decode(q, kc, bt, sl, causal))
    causal_eff = causal and q.shape[1] > 1
    ref_out, ref_lse = reference_per_request(q, kc, bt, sl, scale, causal_eff)
    # The reference's output is rounded to q's dtype exactly like the kernel's.
    assert_close_device(out, ref_out.astype(q.dtype), name=f"{name} out", **OUT_TOL)
    check_close(np.asarray(lse), np.asarray(ref_lse), name=f"{name} lse", **LSE_TOL)
    return out, lse


# --------------------------------------------------------------------------------------------
# Scheduler: device kernel bit-identical to the host walk
# --------------------------------------------------------------------------------------------
def _adversarial_seqlens():
    rng = np.random.default_rng(7)
    yield "zeros", np.zeros(37, np.int32)
    yield "ones", np.ones(5, np.int32)
    yield "edges", np.array([0, 1, 63, 64, 65, 127, 128, 129] * 3, np.int32)
    yield "one_long", np.array([70000], np.int32)
    yield "long_and_empty", np.array([0, 262144, 0, 1, 131072], np.int32)
    yield "b4096_short", rng.integers(0, 300, 4096).astype(np.int32)
    yield "b4096_mixed", np.where(rng.random(4096) < 0.5, 0,
                                  rng.integers(1, 20000, 4096)).astype(np.int32)
    for i in range(6):
        b = int(rng.integers(1, 700))
        yield f"random{i}", rng.integers(0, 40000, b).astype(np.int32)


@pytest.mark.parametrize("name,seqlens", list(_adversarial_seqlens()))
@pytest.mark.parametrize("rows,h_kv,num_sms", [(16, 1, 132), (128, 1, 132), (256, 1, 132),
                                               (64, 8, 132), (16, 1, 78)])
def test_scheduler_matches_host(name, seqlens, rows, h_kv, num_sms):
    md, ns = jax.jit(functools.partial(fm.get_mla_metadata, num_q_tokens_per_head_k=rows,
                                       num_heads_k=h_kv, num_sms=num_sms))(jnp.asarray(seqlens))
    want_md, want_ns = fm.schedule_numpy(seqlens, fm.num_sm_parts(num_sms, rows, h_kv))
    np.testing.assert_array_equal(np.asarray(md), want_md)
    np.testing.assert_array_equal(np.asarray(ns), want_ns)


# --------------------------------------------------------------------------------------------
# FlashMLA's dense grid (2304 cases per dtype, merged per head/s_q/causal configuration)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_q,h_kv", HEAD_PAIRS)
@pytest.mark.parametrize("s_q", [1, 2, 4])
def test_dense_grid(s_q, h_q, h_kv, causal, dtype):
    seed = _seed(s_q, h_q, h_kv, causal, dtype)
    q, kc, bt, sl = make_merged(seed, DENSE_SUBCASES, s_q, h_q, h_kv, DTYPES[dtype])
    out, _ = _check_against_reference(q, kc, bt, sl, causal,
                                      f"dense s_q={s_q} h_q={h_q} h_kv={h_kv} causal={causal}")
    assert not bool(jnp.any(jnp.isnan(out)))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_q,h_kv", HEAD_PAIRS)
def test_corner_zero_lengths(h_q, h_kv, causal, dtype):
    q, kc, bt, sl = make_merged(_seed(h_q, h_kv, causal, dtype, "corner"), CORNER_SUBCASES, 2,
                                h_q, h_kv, DTYPES[dtype])
    out, lse = _check_against_reference(q, kc, bt, sl, causal, f"corner h_q={h_q} h_kv={h_kv}")
    empty = np.asarray(sl) == 0
    assert empty.any()
    assert not np.asarray(jnp.any(out[empty] != 0)), "zero-length rows must give out = 0"
    assert np.all(np.isposinf(np.asarray(lse)[empty])), "zero-length rows must give lse = +inf"


@pytest.mark.parametrize("subcases,s_q,h_q,causal", [
    ([(1, 4096, False, 0.0)], 1, 128, False),     # one request split over ~64 parts
    ([(2, 70000, False, 0.0)], 1, 16, False),     # past 65536 tokens
    ([(2, 70000, True, 0.0)], 2, 128, True),
    ([(1, 1, False, 0.0)], 4, 128, True),         # s_q > seqlen: causal rows with no key
    ([(512, 200, True, 0.1)], 1, 64, False),      # many short requests
])
def test_extremes(subcases, s_q, h_q, causal):
    q, kc, bt, sl = make_merged(11, subcases, s_q, h_q, 1, jnp.bfloat16)
    _check_against_reference(q, kc, bt, sl, causal, f"extreme {subcases}")


@pytest.mark.parametrize("s_q,h_q,h_kv,causal", [(1, 128, 1, False), (2, 128, 1, True),
                                                  (2, 64, 2, True), (1, 32, 1, False),
                                                  (1, 16, 1, True), (2, 8, 1, False)])
def test_many_short_requests_per_part(s_q, h_q, h_kv, causal):
    """Requests of 0-6 pages, many per CTA: every page-count parity, empty requests between
    others, and each request's epilogue followed by the next request's loads into the same
    buffers (16 rows: the narrow kernel's ring of stages wrapping across requests)."""
    q, kc, bt, sl = make_merged(_seed(s_q, h_q, h_kv, causal, "short"), [(1024, 200, True, 0.2)],
                                s_q, h_q, h_kv, jnp.bfloat16)
    md, _ = fm.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
    md = np.asarray(md)
    assert np.max(md[:, 1] - md[:, 0]) >= 8, "expected parts holding many requests"
    assert (np.asarray(sl) == 0).any() and (np.asarray(sl) > 3 * 64).any()
    out, _ = _check_against_reference(q, kc, bt, sl, causal,
                                      f"short requests s_q={s_q} h_q={h_q} h_kv={h_kv}")
    assert not bool(jnp.any(jnp.isnan(out)))


def test_deepseek_scale_and_fp16_large_logits():
    q, kc, bt, sl = make_merged(5, [(6, 1000, True, 0.0)], 2, 128, 1, jnp.float16)
    scale = fm.deepseek_softmax_scale(mscale=fm.yarn_mscale(40.0, 1.0))
    md, ns = fm.get_mla_metadata(sl, 256, 1)
    out, lse = fm.flash_mla_with_kvcache(q, kc, bt, sl, 512, md, ns, softmax_scale=scale,
                                         causal=True)
    ref_out, ref_lse = reference_per_request(q, kc, bt, sl, scale, True)
    assert_close_device(out, ref_out.astype(q.dtype), name="deepseek-scale out", **OUT_TOL)
    check_close(np.asarray(lse), np.asarray(ref_lse), name="deepseek-scale lse", **LSE_TOL)


# --------------------------------------------------------------------------------------------
# JAX integration on the GPU: metadata shared by layers, scan over layers, vmap
# --------------------------------------------------------------------------------------------
def test_metadata_shared_by_layers_and_scan():
    n_layers = 3
    q, kc, bt, sl = make_merged(3, [(8, 3000, True, 0.0)], 2, 64, 1, jnp.bfloat16)
    qs = jnp.stack([q * (i + 1) for i in range(n_layers)])
    kcs = jnp.stack([jnp.roll(kc, i, axis=-1) for i in range(n_layers)])

    @jax.jit
    def step_unrolled(qs, kcs, bt, sl):
        md, ns = fm.get_mla_metadata(sl, 128, 1)  # once per step, shared by all layers
        return [fm.flash_mla_with_kvcache(qs[i], kcs[i], bt, sl, 512, md, ns, causal=True)
                for i in range(n_layers)]

    @jax.jit
    def step_scan(qs, kcs, bt, sl):
        md, ns = fm.get_mla_metadata(sl, 128, 1)

        def layer(carry, x):
            out, lse = fm.flash_mla_with_kvcache(x[0], x[1], bt, sl, 512, md, ns, causal=True)
            return carry, (out, lse)
        return jax.lax.scan(layer, 0, (qs, kcs))[1]

    unrolled = step_unrolled(qs, kcs, bt, sl)
    outs, lses = step_scan(qs, kcs, bt, sl)
    for i in range(n_layers):
        ref_out, ref_lse = reference_per_request(qs[i], kcs[i], bt, sl, SCALE, True)
        assert_close_device(unrolled[i][0], ref_out.astype(q.dtype), name=f"layer {i}", **OUT_TOL)
        np.testing.assert_array_equal(np.asarray(outs[i]), np.asarray(unrolled[i][0]))
        np.testing.assert_array_equal(np.asarray(lses[i]), np.asarray(unrolled[i][1]))
        check_close(np.asarray(lses[i]), np.asarray(ref_lse), name=f"layer {i} lse", **LSE_TOL)


def test_vmap_folds_into_batch():
    q, kc, bt, sl = make_merged(4, [(6, 900, True, 0.2)], 1, 16, 1, jnp.bfloat16)
    qv = jnp.stack([q, -q, q * 0.5])
    slv = jnp.stack([sl, jnp.maximum(sl - 7, 0), sl])
    md, ns = fm.get_mla_metadata(sl, 16, 1)

    f = jax.jit(jax.vmap(lambda q, s: fm.flash_mla_with_kvcache(q, kc, bt, s, 512, md, ns)))
    outs, lses = f(qv, slv)
    for i in range(3):
        ref_out, ref_lse = reference_per_request(qv[i], kc, bt, slv[i], SCALE, False)
        assert_close_device(outs[i], ref_out.astype(q.dtype), name=f"vmap {i}", **OUT_TOL)
        check_close(np.asarray(lses[i]), np.asarray(ref_lse), name=f"vmap {i} lse", **LSE_TOL)


# --------------------------------------------------------------------------------------------
# XLA command buffers (CUDA graphs): same outputs with graphs forced on and off
# --------------------------------------------------------------------------------------------
_GRAPH_SCRIPT = os.path.join(os.path.dirname(__file__), "graph_replay.py")


def _run_graph_script(flags, out_path, h_q):
    env = dict(os.environ, XLA_FLAGS=flags)
    res = subprocess.run([sys.executable, _GRAPH_SCRIPT, out_path, f"--h_q={h_q}"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return dict(np.load(out_path))


@pytest.mark.parametrize("h_q", [128, 8])  # the pipelined kernel; the narrow kernel (16 rows)
def test_command_buffers_on_and_off_agree(tmp_path, h_q):
    on = _run_graph_script("--xla_gpu_graph_min_graph_size=1", str(tmp_path / "on.npz"), h_q)
    off = _run_graph_script("--xla_gpu_enable_command_buffer=", str(tmp_path / "off.npz"), h_q)
    assert set(on) == set(off) and len(on) >= 6
    for k in on:
        np.testing.assert_array_equal(on[k], off[k], err_msg=k)
    assert not any(np.isnan(v).any() for v in on.values())
