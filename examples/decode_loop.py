"""A small DeepSeek-style decoder serving a batch with the absorbed-MLA paged decode.

Random weights; greedy decoding. What it shows:

- Prefill: right-padded prompts of different lengths in one jitted call (textbook attention);
  every layer's latent entries are written into its paged cache inside the same call.
- Decode: ONE jitted step per token for the whole model. The FlashMLA schedule (metadata) is
  computed once per step and shared by all layers; the tuple of per-layer caches is donated, so
  each step writes the new token's entries in place.
- The host (a PageAllocator) hands out pages and builds slot_mapping / block_table / seqlens
  between steps; block_table keeps a fixed width so the step compiles once.

Defaults run on CPU (pure-JAX reference) in well under a minute. On a Hopper GPU the same script
uses the CUDA kernel (it prints which); try e.g.
    python examples/decode_loop.py --layers 8 --dim 2048 --heads 16 --batch 64 \\
        --max-prompt 1024 --new-tokens 256
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_flashmla.kv_cache import PageAllocator, init_layer_caches, write_tokens  # noqa: E402
from jax_flashmla.nnx import MLAAttention, MLAConfig, decode_metadata  # noqa: E402

#: Custom-call target of the CUDA decode kernel (what a step calls on a Hopper GPU).
DECODE_TARGET = "jax_flashmla_decode_v1"


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, dim, hidden, *, rngs, dtype):
        lin = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, rngs=rngs)
        self.w1, self.w3, self.w2 = lin(dim, hidden), lin(dim, hidden), lin(hidden, dim)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
    def __init__(self, cfg: MLAConfig, hidden, *, rngs, dtype):
        self.attn_norm = nnx.RMSNorm(cfg.dim, dtype=dtype, rngs=rngs)
        self.attn = MLAAttention(cfg, rngs=rngs, dtype=dtype)
        self.mlp_norm = nnx.RMSNorm(cfg.dim, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.dim, hidden, rngs=rngs, dtype=dtype)

    def prefill(self, x, lengths):
        h, entries = self.attn.prefill(self.attn_norm(x), lengths)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), entries

    def decode(self, x, positions, cache, slots, block_table, seqlens, metadata):
        h, cache = self.attn.decode(self.attn_norm(x), positions, cache, slots, block_table,
                                    seqlens, metadata)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Decoder(nnx.Module):
    def __init__(self, cfg: MLAConfig, n_layers, vocab, hidden, *, rngs, dtype):
        self.cfg = cfg
        self.embed = nnx.Embed(vocab, cfg.dim, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, hidden, rngs=rngs, dtype=dtype)
                                for _ in range(n_layers)])
        self.norm = nnx.RMSNorm(cfg.dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(cfg.dim, vocab, use_bias=False, dtype=dtype, rngs=rngs)

    def prefill(self, tokens, lengths):
        """``tokens [b, s]`` -> (logits [b, s, vocab], per-layer (latent, rope) entries)."""
        x = self.embed(tokens)
        entries = []
        for layer in self.layers:
            x, e = layer.prefill(x, lengths)
            entries.append(e)
        return self.head(self.norm(x)).astype(jnp.float32), entries

    def decode(self, tokens, positions, caches, slots, block_table, seqlens, metadata):
        """``tokens [b]`` -> (logits [b, vocab], updated caches)."""
        x = self.embed(tokens[:, None])
        new = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.decode(x, positions[:, None], cache, slots, block_table, seqlens,
                                    metadata)
            new.append(cache)
        return self.head(self.norm(x[:, 0])).astype(jnp.float32), tuple(new)


def make_steps(model: Decoder):
    graphdef, _ = nnx.split(model)
    n_heads = model.cfg.n_heads

    @functools.partial(jax.jit, donate_argnums=(1,))
    def prefill_step(state, caches, tokens, lengths, slots):
        m = nnx.merge(graphdef, state)
        logits, entries = m.prefill(tokens, lengths)
        caches = tuple(write_tokens(c, lat.reshape(-1, lat.shape[-1]),
                                    rope.reshape(-1, rope.shape[-1]), slots)
                       for c, (lat, rope) in zip(caches, entries))
        last = logits[jnp.arange(tokens.shape[0]), lengths - 1]
        return caches, jnp.argmax(last, axis=-1).astype(jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def decode_step(state, caches, tokens, positions, slots, block_table, seqlens):
        metadata = decode_metadata(seqlens, n_heads)     # once per step, for every layer
        m = nnx.merge(graphdef, state)
        logits, caches = m.decode(tokens, positions, caches, slots, block_table, seqlens,
                                  metadata)
        return caches, jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

    @jax.jit
    def full_logits(state, tokens, lengths):
        logits, _ = nnx.merge(graphdef, state).prefill(tokens, lengths)
        return logits[jnp.arange(tokens.shape[0]), lengths - 1]

    return prefill_step, decode_step, full_logits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--q-lora-rank", type=int, default=128, help="0: no query LoRA")
    p.add_argument("--mlp-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true",
                   help="skip comparing the last step's logits with a full textbook recompute")
    p.add_argument("--check-batch", type=int, default=16,
                   help="sequences per chunk of that recompute (bounds its memory)")
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    cfg = MLAConfig(dim=args.dim, n_heads=args.heads, q_lora_rank=args.q_lora_rank)
    model = Decoder(cfg, args.layers, args.vocab, args.mlp_hidden, rngs=nnx.Rngs(args.seed),
                    dtype=dtype)
    _, state = nnx.split(model)
    prefill_step, decode_step, full_logits = make_steps(model)

    rng = np.random.default_rng(args.seed)
    b, n_new = args.batch, args.new_tokens
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, size=b).astype(np.int32)
    width = int(lengths.max())
    prompts = np.zeros((b, width), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = rng.integers(0, args.vocab, size=n)

    # One pool per layer, sized for every request's final length; fixed block-table width.
    max_blocks = -(-(width + n_new) // 64)
    num_pages = int(sum(-(-(int(n) + n_new) // 64) for n in lengths))
    alloc = PageAllocator(num_pages)
    caches = init_layer_caches(args.layers, num_pages, dtype)
    ids = list(range(b))
    print(f"device={jax.devices()[0].device_kind} layers={args.layers} dim={args.dim} "
          f"heads={args.heads} batch={b} prompts={lengths.tolist() if b <= 16 else '...'} "
          f"pages/layer={num_pages} cache/layer={caches[0].pages.nbytes / 2**20:.1f} MiB")

    for i, n in zip(ids, lengths):
        alloc.allocate(i, int(n))
    slots = alloc.padded_slots(ids, [0] * b, width)
    t0 = time.perf_counter()
    caches, tok = prefill_step(state, caches, jnp.asarray(prompts), jnp.asarray(lengths),
                               jnp.asarray(slots))
    tok.block_until_ready()
    print(f"prefill (incl. compile): {time.perf_counter() - t0:.2f}s")

    generated = [tok]
    logits = None
    t_first, t_rest_start = 0.0, None
    for step in range(n_new - 1):
        t0 = time.perf_counter()
        positions = alloc.cache_seqlens(ids)                    # position of the new token
        new_slots = np.concatenate(alloc.allocate_batch(ids, [1] * b))
        step_args = (state, caches, tok, jnp.asarray(positions), jnp.asarray(new_slots),
                     jnp.asarray(alloc.block_table(ids, max_blocks)),
                     jnp.asarray(alloc.cache_seqlens(ids)))
        if step == 0:
            # Which attention the step lowers to on this backend (lowering only, no compile).
            text = decode_step.lower(*step_args).as_text()
            print("attention: " + ("FlashMLA CUDA kernel" if DECODE_TARGET in text
                                   else "pure-JAX reference (no Hopper GPU)"))
        caches, tok, logits = decode_step(*step_args)
        del step_args                                           # its caches were donated
        generated.append(tok)
        if step == 0:
            tok.block_until_ready()                             # first step includes compile
            t_first = time.perf_counter() - t0
            t_rest_start = time.perf_counter()
    # Steps are dispatched asynchronously (the host never waits for tokens); time them as a whole.
    jax.block_until_ready(generated)
    t_rest = time.perf_counter() - t_rest_start if t_rest_start is not None else 0.0

    out = np.stack([np.asarray(t) for t in generated], axis=1)   # [b, n_new]
    print(f"first decode step (incl. compile): {t_first:.2f}s")
    if n_new > 2:
        steps = n_new - 2
        print(f"decode: {steps} steps x {b} sequences in {t_rest:.3f}s -> "
              f"{steps * b / t_rest:.1f} tokens/s ({1e3 * t_rest / steps:.2f} ms/step)")
    print(f"sequence 0 continuation: {out[0, :16].tolist()}{' ...' if n_new > 16 else ''}")

    if not args.no_check and logits is not None:
        # The last step saw prompt + all but the last generated token; recompute that with the
        # textbook prefill over the whole sequence and compare the logits.
        full = np.zeros((b, width + n_new - 1), np.int32)
        for i, n in enumerate(lengths):
            full[i, :n] = prompts[i, :n]
            full[i, n:n + n_new - 1] = out[i, :n_new - 1]
        # In chunks of sequences: textbook attention holds [chunk, heads, T, T] float32 scores.
        chunk = min(b, args.check_batch)
        pad = -b % chunk                 # repeat row 0 so every chunk has one shape (one compile)
        full = np.concatenate([full, np.repeat(full[:1], pad, 0)])
        lens = np.concatenate([lengths, np.repeat(lengths[:1], pad)]) + n_new - 1
        ref = np.concatenate([np.asarray(full_logits(state, jnp.asarray(full[i:i + chunk]),
                                                     jnp.asarray(lens[i:i + chunk])))
                              for i in range(0, b + pad, chunk)])[:b]
        got = np.asarray(logits)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        print(f"check: last-step logits vs full recompute, relative error {err:.2e}")


if __name__ == "__main__":
    main()
