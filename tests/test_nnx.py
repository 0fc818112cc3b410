"""MLAAttention: textbook prefill and absorbed paged decode against a float64 NumPy MLA oracle."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jax_flashmla import yarn_mscale  # noqa: E402
from jax_flashmla.kv_cache import PageAllocator, PagedMLACache, write_tokens  # noqa: E402
from jax_flashmla.nnx import (MLAAttention, MLAConfig, decode_metadata,  # noqa: E402
                              rope_frequencies)

SMALL = dict(dim=64, n_heads=4, q_lora_rank=32)
PROMPTS = (5, 70, 130)      # crosses page boundaries (64)
MAX_BLOCKS = 4


# ------------------------------------------------------------------------------------------------
# Oracle: non-absorbed MLA written from the weights, float64, complex-number RoPE.
# ------------------------------------------------------------------------------------------------
def _w(v):
    return np.asarray(v[...], np.float64)


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, pos, freqs, interleaved):
    rot = np.exp(1j * pos[..., None] * freqs)
    if interleaved:
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def textbook_mla(model: MLAAttention, x, lengths):
    """``x [b, T, dim]`` right-padded, positions 0.., causal; returns ``[b, T, dim]`` float64."""
    cfg = model.cfg
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, nope, rope, vd = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank:
        q = _rms(x @ _w(model.wq_a.kernel), _w(model.q_norm.scale), cfg.norm_eps)
        q = q @ _w(model.wq_b.kernel)
    else:
        q = x @ _w(model.wq.kernel)
    q = q.reshape(b, t, h, nope + rope)
    kv = x @ _w(model.wkv_a.kernel)
    c = _rms(kv[..., :cfg.kv_lora_rank], _w(model.kv_norm.scale), cfg.norm_eps)
    pos = np.broadcast_to(np.arange(t, dtype=np.float64), (b, t))
    freqs = rope_frequencies(cfg)
    q_pe = _rope(q[..., nope:], pos[:, :, None], freqs, cfg.rope_interleaved)
    k_pe = _rope(kv[..., cfg.kv_lora_rank:], pos, freqs, cfg.rope_interleaved)
    kvb = (c @ _w(model.wkv_b.kernel)).reshape(b, t, h, nope + vd)
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    s = (np.einsum("bqhd,bkhd->bhqk", q[..., :nope], k_nope)
         + np.einsum("bqhd,bkd->bhqk", q_pe, k_pe)) * cfg.softmax_scale
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (ki <= qi)[None] & (ki[None] < np.asarray(lengths)[:, None, None])
    s = np.where(mask[:, None], s, -np.inf)
    s = s - np.max(s, axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, h * vd)
    return o @ _w(model.wo.kernel)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
# Jitted steps as a server would run them (split graph + donated cache)
# ------------------------------------------------------------------------------------------------
def _steps(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, x, lengths):
        return nnx.merge(graphdef, state).prefill(x, lengths)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def write(state, cache, c, k, slots):
        del state
        return write_tokens(cache, c.reshape(-1, c.shape[-1]), k.reshape(-1, k.shape[-1]), slots)

    @functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("with_md",))
    def decode(state, cache, x, pos, slots, bt, sl, with_md=True):
        m = nnx.merge(graphdef, state)
        md = decode_metadata(sl, m.cfg.n_heads, x.shape[1]) if with_md else None
        return m.decode(x, pos, cache, slots, bt, sl, md)

    return state, prefill, write, decode


def _make(cfg_kwargs, dtype, seed=0):
    return MLAAttention(MLAConfig(**cfg_kwargs), rngs=nnx.Rngs(seed), dtype=dtype)


def _inputs(cfg, n_new=2, seed=1):
    rng = np.random.default_rng(seed)
    b, tmax = len(PROMPTS), max(PROMPTS)
    x_prompt = np.zeros((b, tmax, cfg.dim), np.float32)
    for i, n in enumerate(PROMPTS):
        x_prompt[i, :n] = rng.standard_normal((n, cfg.dim))
    x_new = rng.standard_normal((n_new, b, 1, cfg.dim)).astype(np.float32)
    return x_prompt, x_new


def _full_sequences(x_prompt, x_new, upto):
    """Prompts followed by the first ``upto`` decoded tokens, right-padded."""
    b, tmax, d = x_prompt.shape
    full = np.zeros((b, tmax + upto, d), np.float64)
    for i, n in enumerate(PROMPTS):
        full[i, :n] = x_prompt[i, :n]
        for j in range(upto):
            full[i, n + j] = x_new[j, i, 0]
    return full


def _serve(model, cache_dtype, x_prompt, x_new, with_md=True):
    """Prefill + len(x_new) decode steps through a paged cache; returns per-step outputs."""
    state, prefill, write, decode = _steps(model)
    ids = list(range(len(PROMPTS)))
    alloc = PageAllocator(16)
    alloc.allocate("filler", 64)     # fragment the pool so block tables are not the identity
    for i, n in zip(ids, PROMPTS):
        alloc.allocate(i, n)
    alloc.free("filler")
    cache = PagedMLACache.create(alloc.num_pages, cache_dtype)
    out_p, (c, k) = prefill(state, jnp.asarray(x_prompt, model.dtype),
                            jnp.asarray(PROMPTS, jnp.int32))
    slots = alloc.padded_slots(ids, [0] * len(ids), x_prompt.shape[1])
    cache = write(state, cache, c, k, jnp.asarray(slots))
    outs = []
    for j in range(x_new.shape[0]):
        pos = alloc.cache_seqlens(ids)[:, None]
        new_slots = np.concatenate(alloc.allocate_batch(ids, [1] * len(ids)))
        out, cache = decode(state, cache, jnp.asarray(x_new[j], model.dtype), jnp.asarray(pos),
                            jnp.asarray(new_slots), jnp.asarray(alloc.block_table(ids, MAX_BLOCKS)),
                            jnp.asarray(alloc.cache_seqlens(ids)), with_md=with_md)
        outs.append(np.asarray(out, np.float64)[:, 0])
    return np.asarray(out_p, np.float64), outs, cache


# ------------------------------------------------------------------------------------------------
def bf16_twin(cfg):
    """(float32 model, bf16 model with the same weights): bf16 compute and cache vs an oracle."""
    ref_model = _make(cfg, jnp.float32)
    model = _make(cfg, jnp.bfloat16)
    nnx.update(model, nnx.state(ref_model))
    return ref_model, model


def assert_decode_steps_match_textbook(ref_model, outs, x_prompt, x_new, tol):
    """Decode step j's outputs equal textbook MLA over prompt + the first j + 1 new tokens."""
    for j, out in enumerate(outs):
        full = _full_sequences(x_prompt, x_new, j + 1)
        ref = textbook_mla(ref_model, full, [n + j + 1 for n in PROMPTS])
        want = np.stack([ref[i, n + j] for i, n in enumerate(PROMPTS)])
        assert _rel(out, want) < tol, j


@pytest.mark.parametrize("interleaved,q_lora_rank", [(True, 32), (False, 0)])
def test_prefill_and_decode_float32_match_textbook(interleaved, q_lora_rank):
    model = _make(dict(SMALL, q_lora_rank=q_lora_rank, rope_interleaved=interleaved), jnp.float32)
    x_prompt, x_new = _inputs(model.cfg)
    out_p, outs, _ = _serve(model, jnp.float32, x_prompt, x_new)

    ref = textbook_mla(model, x_prompt, PROMPTS)
    for i, n in enumerate(PROMPTS):
        assert _rel(out_p[i, :n], ref[i, :n]) < 1e-5
    assert_decode_steps_match_textbook(model, outs, x_prompt, x_new, 1e-5)


def test_absorbed_decode_bf16_kernel_path_matches_textbook():
    ref_model, model = bf16_twin(SMALL)
    x_prompt, x_new = _inputs(model.cfg)
    out_p, outs, cache = _serve(model, jnp.bfloat16, x_prompt, x_new)
    assert cache.dtype == jnp.bfloat16

    ref = textbook_mla(ref_model, x_prompt, PROMPTS)
    for i, n in enumerate(PROMPTS):
        assert _rel(out_p[i, :n], ref[i, :n]) < 2e-2
    assert_decode_steps_match_textbook(ref_model, outs, x_prompt, x_new, 2e-2)


def test_decode_without_passed_metadata_is_identical():
    model = _make(SMALL, jnp.bfloat16)
    x_prompt, x_new = _inputs(model.cfg, n_new=1)
    _, with_md, _ = _serve(model, jnp.bfloat16, x_prompt, x_new, with_md=True)
    _, without, _ = _serve(model, jnp.bfloat16, x_prompt, x_new, with_md=False)
    np.testing.assert_array_equal(with_md[0], without[0])


def test_multi_token_decode_is_causal():
    """s_q = 2 (MTP-style): both new tokens at once equal two single-token steps."""
    model = _make(SMALL, jnp.float32)
    x_prompt, x_new = _inputs(model.cfg, n_new=2)
    _, outs, _ = _serve(model, jnp.float32, x_prompt, x_new)

    state, prefill, write, decode = _steps(model)
    ids = list(range(len(PROMPTS)))
    alloc = PageAllocator(16)
    for i, n in zip(ids, PROMPTS):
        alloc.allocate(i, n)
    cache = PagedMLACache.create(alloc.num_pages, jnp.float32)
    _, (c, k) = prefill(state, jnp.asarray(x_prompt), jnp.asarray(PROMPTS, jnp.int32))
    cache = write(state, cache, c, k,
                  jnp.asarray(alloc.padded_slots(ids, [0] * 3, x_prompt.shape[1])))
    pos = alloc.cache_seqlens(ids)[:, None] + np.arange(2)[None]
    slots = np.concatenate(alloc.allocate_batch(ids, [2] * 3))
    x2 = np.concatenate([x_new[0], x_new[1]], axis=1)           # [b, 2, dim]
    out, _ = decode(state, cache, jnp.asarray(x2), jnp.asarray(pos), jnp.asarray(slots),
                    jnp.asarray(alloc.block_table(ids, MAX_BLOCKS)),
                    jnp.asarray(alloc.cache_seqlens(ids)))
    out = np.asarray(out, np.float64)
    assert _rel(out[:, 0], outs[0]) < 1e-5
    assert _rel(out[:, 1], outs[1]) < 1e-5


def test_softmax_scale_and_yarn():
    cfg = MLAConfig(**SMALL)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5)
    np.testing.assert_allclose(rope_frequencies(cfg), 10000.0 ** (-np.arange(0, 64, 2) / 64))

    yarn = MLAConfig(**SMALL, rope_factor=40.0, mscale_all_dim=1.0)
    assert yarn.softmax_scale == pytest.approx(192 ** -0.5 * yarn_mscale(40.0, 1.0) ** 2)
    assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40.0) + 1.0)
    f0, f1 = rope_frequencies(cfg), rope_frequencies(yarn)
    assert f1[0] == pytest.approx(f0[0])                 # fast pairs keep their frequency
    assert f1[-1] == pytest.approx(f0[-1] / 40.0)        # slow pairs are interpolated
    assert np.all(f1 <= f0 + 1e-15)


def test_kernel_dims_are_enforced():
    model = _make(dict(SMALL, kv_lora_rank=256), jnp.float32)
    cache = PagedMLACache.create(2, jnp.float32)
    with pytest.raises(ValueError, match="kv_lora_rank=512"):
        model.decode(jnp.zeros((1, 1, 64)), jnp.zeros((1, 1), jnp.int32), cache,
                     jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                     jnp.ones((1,), jnp.int32))
