"""DeepSeek-V2/V3 multi-head latent attention (MLA) as a Flax NNX module.

Two paths over the same weights:

- :meth:`MLAAttention.prefill`: plain JAX, *non-absorbed* (textbook) causal attention. K and V are
  decompressed per head from the latent; it also returns the per-token cache entries
  ``(latent [b, s, 512], rope [b, s, 64])`` for :func:`jax_flashmla.kv_cache.write_tokens`.
- :meth:`MLAAttention.decode`: *absorbed* attention over the paged latent cache with
  ``h_kv = 1``. ``q_nope @ W_UK`` turns each head's 128-d nope query into a 512-d latent query,
  which is concatenated with the roped 64-d ``q_pe`` into the 576-d query of
  :func:`jax_flashmla.flash_mla_with_kvcache`; the kernel's 512-d output (a mix of cached latents)
  goes through ``W_UV`` to each head's 128-d value and then ``wo``. The new tokens' entries are
  written into the cache first, so ``cache_seqlens`` counts them.

Conventions (shared by both paths, so they agree):

- RoPE covers the last 64 channels of q and the 64-d ``k_pe``. ``MLAConfig.rope_interleaved=True``
  (default) rotates adjacent pairs ``(x[2i], x[2i+1])`` like DeepSeek's reference inference code
  (complex multiplication); ``False`` rotates halves ``(x[i], x[i + 32])`` like the Hugging Face
  port, which permutes the checkpoint's rope weights to compensate. Pick the one that matches how
  the checkpoint's weights were laid out.
- YaRN (``rope_factor > 1``): the frequencies are blended between interpolated and original with
  DeepSeek's ``beta_fast``/``beta_slow`` ramp, and the softmax scale is
  ``(nope + rope) ** -0.5 * yarn_mscale(rope_factor, mscale_all_dim) ** 2``. cos/sin are not
  rescaled (DeepSeek's configs set ``mscale == mscale_all_dim``, which makes that factor 1).
- ``kv_lora_rank`` must be 512 and ``qk_rope_head_dim`` 64 for the kernel (576 / 512 layout);
  other sizes (heads, model dim, q rank, nope and v dims) are free.
- Caches in bf16/fp16 use the kernel (on CPU its pure-JAX lowering); a float32 cache runs the
  float32 reference :func:`jax_flashmla.mla_decode_reference` instead (tests, debugging).

For per-token loops use ``graphdef, state = nnx.split(model)`` + ``jax.jit`` with the caches
donated (see examples/decode_loop.py), and compute the metadata once per step
(:func:`decode_metadata`) for all layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .api import deepseek_softmax_scale, flash_mla_with_kvcache, get_mla_metadata, yarn_mscale
from .kv_cache import KV_LORA_RANK, QK_ROPE_HEAD_DIM, PagedMLACache, write_tokens
from .reference import mla_decode_reference


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    dim: int = 1024
    n_heads: int = 16
    q_lora_rank: int = 384          # 0: a single wq projection (DeepSeek-V2-Lite style)
    kv_lora_rank: int = KV_LORA_RANK
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = QK_ROPE_HEAD_DIM
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleaved: bool = True
    rope_factor: float = 1.0        # YaRN scaling factor; 1 disables YaRN
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale_all_dim: float = 1.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        mscale = yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return deepseek_softmax_scale(self.qk_nope_head_dim, self.qk_rope_head_dim, mscale)

    def check_kernel_dims(self) -> None:
        if self.kv_lora_rank != KV_LORA_RANK or self.qk_rope_head_dim != QK_ROPE_HEAD_DIM:
            raise ValueError(
                f"the absorbed decode kernel needs kv_lora_rank={KV_LORA_RANK} and "
                f"qk_rope_head_dim={QK_ROPE_HEAD_DIM} (576-d keys, 512-d values), got "
                f"{self.kv_lora_rank} and {self.qk_rope_head_dim}")


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------
def rope_frequencies(cfg: MLAConfig) -> np.ndarray:
    """Per-pair angular frequencies ``[qk_rope_head_dim // 2]`` (float64, host), YaRN-corrected."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.rope_factor <= 1.0:
        return freqs

    def pair_index(rotations: float) -> float:
        # Pair whose wavelength fits ``rotations`` full turns into the original context.
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(pair_index(cfg.beta_fast)), 0)
    high = min(math.ceil(pair_index(cfg.beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    keep = 1.0 - ramp   # 1: high-frequency pairs keep their frequency; 0: fully interpolated
    return freqs / cfg.rope_factor * (1.0 - keep) + freqs * keep


def apply_rope(x, positions, freqs, interleaved: bool):
    """Rotates ``x [..., d]`` by ``positions`` (broadcast against ``x.shape[:-1]``), in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    if interleaved:
        pairs = xf.reshape(*xf.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(xf.shape)
    else:
        half = xf.shape[-1] // 2
        a, b = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------
def decode_metadata(cache_seqlens, n_heads: int, s_q: int = 1, *, num_sms: int | None = None):
    """FlashMLA schedule for one decode step of an MLA layer with ``n_heads`` query heads
    (``h_kv = 1``). Compute it once per step and pass it to every layer."""
    return get_mla_metadata(cache_seqlens, s_q * n_heads, 1, num_sms=num_sms)


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------
class MLAAttention(nnx.Module):
    """DeepSeek MLA attention; see the module docstring for the two paths and conventions.

    Args:
      cfg: sizes and RoPE/YaRN settings.
      dtype: compute dtype of the projections (bf16 for serving, float32 for tests).
      param_dtype: storage dtype of the weights.
    """

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16,
                 param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype
        h = cfg.n_heads

        def linear(i, o):
            return nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

        def norm(n):
            # Normalize in float32 (as DeepSeek does); the next projection casts back.
            return nnx.RMSNorm(n, epsilon=cfg.norm_eps, dtype=jnp.float32,
                               param_dtype=param_dtype, rngs=rngs)

        if cfg.q_lora_rank:
            self.wq_a = linear(cfg.dim, cfg.q_lora_rank)
            self.q_norm = norm(cfg.q_lora_rank)
            self.wq_b = linear(cfg.q_lora_rank, h * cfg.qk_head_dim)
        else:
            self.wq = linear(cfg.dim, h * cfg.qk_head_dim)
        self.wkv_a = linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = norm(cfg.kv_lora_rank)
        self.wkv_b = linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.wo = linear(h * cfg.v_head_dim, cfg.dim)

    # -- shared pieces -------------------------------------------------------------------------
    def queries(self, x, positions):
        """``x [b, s, dim]`` -> ``(q_nope [b, s, h, nope], q_pe [b, s, h, 64] roped)``."""
        cfg = self.cfg
        if cfg.q_lora_rank:
            q = self.wq_b(self.q_norm(self.wq_a(x)))
        else:
            q = self.wq(x)
        q = q.reshape(*x.shape[:-1], cfg.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        q_pe = apply_rope(q_pe, positions[..., None], rope_frequencies(cfg), cfg.rope_interleaved)
        return q_nope, q_pe

    def latents(self, x, positions):
        """``x [b, s, dim]`` -> cache entries ``(kv_norm(c_kv) [b, s, 512], k_pe [b, s, 64])``."""
        cfg = self.cfg
        kv = self.wkv_a(x)
        c_kv, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        c_kv = self.kv_norm(c_kv).astype(self.dtype)
        k_pe = apply_rope(k_pe, positions, rope_frequencies(cfg), cfg.rope_interleaved)
        return c_kv, k_pe

    def up_projections(self):
        """``(W_UK [512, h, nope], W_UV [512, h, v])`` in the compute dtype, from ``wkv_b``."""
        cfg = self.cfg
        w = self.wkv_b.kernel[...].astype(self.dtype)
        w = w.reshape(cfg.kv_lora_rank, cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]

    # -- prefill: textbook attention ------------------------------------------------------------
    def prefill(self, x, lengths=None, positions=None):
        """Causal self-attention over fresh prompts (nothing cached before them).

        Args:
          x: ``[b, s, dim]`` right-padded prompts.
          lengths: int ``[b]`` valid tokens per prompt (default: all ``s``). Keys past a
            prompt's length are masked; outputs at padded positions are meaningless.
          positions: int ``[b, s]`` RoPE positions (default ``0 .. s - 1``).

        Returns:
          ``(out [b, s, dim], (latent [b, s, 512], rope [b, s, 64]))``; write the entries of the
          valid positions with ``write_tokens`` (padded slots = -1 are skipped).
        """
        cfg = self.cfg
        b, s, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if lengths is None:
            lengths = jnp.full((b,), s, jnp.int32)
        q_nope, q_pe = self.queries(x, positions)
        c_kv, k_pe = self.latents(x, positions)

        kv = self.wkv_b(c_kv).reshape(b, s, cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        k_pe_h = jnp.broadcast_to(k_pe[:, :, None, :], (b, s, cfg.n_heads, cfg.qk_rope_head_dim))
        q = jnp.concatenate([q_nope, q_pe], axis=-1).astype(jnp.float32)
        k = jnp.concatenate([k_nope, k_pe_h.astype(k_nope.dtype)], axis=-1).astype(jnp.float32)

        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.float32(cfg.softmax_scale)
        qi = jnp.arange(s)[:, None]
        ki = jnp.arange(s)[None, :]
        mask = (ki <= qi)[None] & (ki[None] < lengths[:, None, None])     # [b, q, k]
        logits = jnp.where(mask[:, None], logits, -jnp.inf)
        # A row with no valid key (a zero-length prompt) gets zeros instead of NaN.
        probs = jax.nn.softmax(jnp.where(mask.any(-1)[:, None, :, None], logits, 0.0), axis=-1)
        probs = jnp.where(mask[:, None], probs, 0.0)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(self.dtype)
        out = self.wo(o.reshape(b, s, cfg.n_heads * cfg.v_head_dim))
        return out, (c_kv, k_pe)

    # -- decode: absorbed attention over the paged cache ----------------------------------------
    def decode(self, x, positions, cache: PagedMLACache, slot_mapping, block_table,
               cache_seqlens, metadata=None, *, num_sms: int | None = None):
        """One decode step (``s_q`` new tokens per request, usually 1).

        Args:
          x: ``[b, s_q, dim]`` hidden states of the new tokens.
          positions: int ``[b, s_q]`` their positions (RoPE).
          cache: this layer's :class:`PagedMLACache` (donate it in the enclosing jit).
          slot_mapping: int32 ``[b * s_q]`` where to write the new tokens (-1 skips).
          block_table: int32 ``[b, max_blocks]``.
          cache_seqlens: int32 ``[b]`` lengths *including* the new tokens.
          metadata: ``(tile_scheduler_metadata, num_splits)`` from :func:`decode_metadata` for
            these ``cache_seqlens``; ``None`` computes it here (once per layer: avoid).

        Returns:
          ``(out [b, s_q, dim], updated cache)``. With ``s_q > 1`` the new tokens attend
          causally to each other (bottom-right aligned, as in FlashMLA).
        """
        cfg = self.cfg
        cfg.check_kernel_dims()
        b, s_q, _ = x.shape
        c_kv, k_pe = self.latents(x, positions)
        cache = write_tokens(cache, c_kv.reshape(b * s_q, -1), k_pe.reshape(b * s_q, -1),
                             slot_mapping)

        q_nope, q_pe = self.queries(x, positions)
        w_uk, w_uv = self.up_projections()
        # Absorb W_UK into the query: q_nope . (W_UK c) == (q_nope W_UK^T) . c
        q_lat = jnp.einsum("bshd,chd->bshc", q_nope.astype(self.dtype), w_uk,
                           preferred_element_type=jnp.float32)
        q = jnp.concatenate([q_lat, q_pe.astype(jnp.float32)], axis=-1).astype(cache.dtype)

        pages = cache.pages
        if pages.dtype == jnp.float32:
            o_lat, _ = mla_decode_reference(q, pages, block_table, cache_seqlens, KV_LORA_RANK,
                                            cfg.softmax_scale, causal=s_q > 1)
        else:
            md, ns = (None, None) if metadata is None else metadata
            o_lat, _ = flash_mla_with_kvcache(q, pages, block_table, cache_seqlens, KV_LORA_RANK,
                                              md, ns, softmax_scale=cfg.softmax_scale,
                                              causal=s_q > 1, num_sms=num_sms)
        # Absorb W_UV on the way out: per head, v = W_UV^T (sum_t p_t c_t).
        o = jnp.einsum("bshc,chd->bshd", o_lat.astype(self.dtype), w_uv,
                       preferred_element_type=jnp.float32).astype(self.dtype)
        out = self.wo(o.reshape(b, s_q, cfg.n_heads * cfg.v_head_dim))
        return out, cache
