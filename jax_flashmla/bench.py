"""Benchmark CLI for ``flash_mla_with_kvcache``: ``python -m jax_flashmla.bench``.

What it measures, per case (FlashMLA's performance setup: paged latent cache with page 64,
varlen lengths ``max(N(s_k, s_k/2), s_q)``, causal, randomly permuted pages):

- ``us``: the jitted public call with precomputed metadata, issued back to back; wall clock over
  ``K`` calls (``K`` adapted so one repetition lasts about ``--target-ms``), median of ``--reps``.
  With asynchronous dispatch this is the per-call throughput a decode loop sees: device time when
  the device is the bottleneck, host dispatch time otherwise.
- ``loop us`` / ``ovh%``: the same decode run ``M`` times inside one jitted ``fori_loop`` (one
  dispatch for all of them), i.e. close to device time; the overhead is how much slower a single
  jitted call is than that.
- TFLOPS, GB/s and % of roofline with FlashMLA's formulas (docs: flashmla-study.md 6.1), against a
  copy bandwidth and a bf16 matmul rate measured in the same run.
- ``x naive``: speedup over :func:`naive_decode`, the plain jitted JAX decode a user writes today.
- ``x FlashMLA``: FlashMLA's time on the lent H100 (``shared/anchors/h100.md``) over ours, where
  the case is one of the anchor table's.
- ``--kv fp8_with_scale|fp8_per_tensor|all``: FP8 KV-cache rows beside the bf16 row of each case
  (the same data quantized with :mod:`jax_flashmla.fp8`), their bytes counted with the FP8 token
  size (656 B with scales, 576 B per tensor; q and out stay bf16), and ``fp8/bf16``, the FP8
  row's time over the bf16 row's.

On CPU the decode runs the pure-JAX reference, so the figures only check the plumbing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import glob
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__
from ._ffi import build_info, is_built_with_cuda
from .api import flash_mla_with_kvcache, get_mla_metadata

HEAD_DIM_QK = 576
HEAD_DIM_V = 512
PAGE_SIZE = 64
#: Hopper L2 (50 MiB on the H100); a working set not much larger is partly served from L2 when
#: the same buffers are read call after call.
L2_BYTES_HINT = 50 << 20

# ---------------------------------------------------------------------------------------------
# FlashMLA's figures on the lent H100 (shared/anchors/h100.md, measured 2026-11-21).
# ---------------------------------------------------------------------------------------------
#: Ceilings measured on that machine (copy counts bytes read + written).
ANCHOR_COPY_GBPS = 3027.0
ANCHOR_MATMUL_TFLOPS = 795.0

#: Main table: b=128, h_kv=1, varlen, causal, bf16. (s_q, h_q, s_k) -> (FlashMLA us, TFLOPS, GB/s,
#: fraction of roofline, naive jitted JAX us or None where the anchor has '-').
ANCHOR_MAIN = {
    (1, 16, 4096): (238, 77, 2572, 0.85, 2912),
    (1, 16, 8192): (456, 80, 2672, 0.88, 6697),
    (1, 16, 16384): (884, 83, 2753, 0.91, 12541),
    (1, 16, 32768): (1646, 89, 2953, 0.98, None),
    (1, 32, 4096): (252, 146, 2448, 0.81, None),
    (1, 32, 8192): (461, 159, 2656, 0.88, None),
    (1, 32, 16384): (875, 168, 2785, 0.92, None),
    (1, 32, 32768): (1690, 174, 2880, 0.95, None),
    (1, 64, 4096): (267, 275, 2339, 0.77, 3118),
    (1, 64, 8192): (483, 304, 2548, 0.84, 7191),
    (1, 64, 16384): (900, 326, 2719, 0.90, 13366),
    (1, 64, 32768): (1716, 342, 2841, 0.94, None),
    (1, 128, 4096): (304, 483, 2114, 0.70, 4885),
    (1, 128, 8192): (538, 546, 2324, 0.77, 8162),
    (1, 128, 16384): (1003, 585, 2457, 0.81, 15251),
    (1, 128, 32768): (1919, 612, 2549, 0.84, None),
    (2, 64, 4096): (316, 464, 2033, 0.67, None),
    (2, 64, 8192): (547, 536, 2284, 0.75, None),
    (2, 64, 16384): (1003, 586, 2458, 0.81, None),
    (2, 64, 32768): (1955, 601, 2502, 0.83, None),
    (2, 128, 4096): (547, 536, 1239, 0.67, 5490),
    (2, 128, 8192): (898, 654, 1432, 0.82, 9854),
    (2, 128, 16384): (1704, 689, 1467, 0.87, 21887),
    (2, 128, 32768): (3672, 640, 1342, 0.80, None),
}

#: Small-batch table (same build and method, but eager PyTorch calls, so launch cost is in it).
#: (b, s_q, h_q, s_k) -> FlashMLA us.
ANCHOR_SMALL_BATCH = {
    (1, 1, 16, 1024): 37, (1, 1, 16, 4096): 41, (1, 1, 128, 1024): 36, (1, 1, 128, 4096): 47,
    (8, 1, 16, 1024): 36, (8, 1, 16, 4096): 45, (8, 1, 128, 1024): 40, (8, 1, 128, 4096): 56,
    (32, 1, 16, 1024): 41, (32, 1, 16, 4096): 79, (32, 1, 128, 1024): 56,
    (32, 1, 128, 4096): 101,
    (128, 1, 16, 1024): 86, (128, 1, 16, 4096): 243, (128, 1, 128, 1024): 123,
    (128, 1, 128, 4096): 308, (128, 2, 128, 1024): 175, (128, 2, 16, 1024): 98,
}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 128
    s_q: int = 1
    h_q: int = 128
    h_kv: int = 1
    s_k: int = 4096
    causal: bool = True
    varlen: bool = True
    seed: int = 0

    def label(self) -> str:
        flags = ("causal " if self.causal else "") + ("varlen" if self.varlen else "fixed")
        return (f"b={self.b} s_q={self.s_q} h_q={self.h_q} h_kv={self.h_kv} s_k={self.s_k} "
                f"{flags.strip()}")


def anchor_grid() -> list[Case]:
    """The 24 cases of the H100 anchor table, in its order."""
    return [Case(s_q=s_q, h_q=h_q, s_k=s_k) for (s_q, h_q, s_k) in ANCHOR_MAIN]


def cpu_grid() -> list[Case]:
    """Small cases the pure-JAX reference runs in seconds on a CPU."""
    cases = [Case(b=2, s_q=1, h_q=h_q, s_k=s_k) for h_q in (16, 128) for s_k in (256, 512)]
    return cases + [Case(b=2, s_q=2, h_q=128, s_k=512)]


_CASE_KEYS = {f.name for f in dataclasses.fields(Case)}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {text!r}")


def parse_cases(spec: str) -> list[Case]:
    """Parses ``"b=64,s_q=1,h_q=16,s_k=4096;b=8,..."``; missing keys keep :class:`Case`'s
    defaults."""
    cases = []
    for chunk in spec.split(";"):
        if not chunk.strip():
            continue
        fields = {}
        for item in chunk.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in _CASE_KEYS:
                raise ValueError(f"bad case item {item!r}: expected key=value with key in "
                                 f"{sorted(_CASE_KEYS)}")
            fields[key] = _parse_bool(value) if key in ("causal", "varlen") else int(value)
        case = Case(**fields)
        if min(case.b, case.s_q, case.h_q, case.h_kv, case.s_k) < 1:
            raise ValueError(f"case sizes must be positive: {case.label()}")
        if case.h_q % case.h_kv:
            raise ValueError(f"h_q must be a multiple of h_kv: {case.label()}")
        cases.append(case)
    if not cases:
        raise ValueError(f"no case in {spec!r}")
    return cases


# ---------------------------------------------------------------------------------------------
# Data (FlashMLA's tests/test_flash_mla_dense_decoding.py generation)
# ---------------------------------------------------------------------------------------------
def case_lengths(case: Case) -> np.ndarray:
    """Per-request KV lengths; Python's ``random`` like FlashMLA, so a seed gives its draws."""
    if not case.varlen:
        return np.full((case.b,), case.s_k, np.int32)
    rng = random.Random(case.seed)
    return np.array([max(int(rng.normalvariate(case.s_k, case.s_k / 2)), case.s_q)
                     for _ in range(case.b)], np.int32)


def padded_len(lengths: np.ndarray) -> int:
    """FlashMLA pads every request's page list to the longest length rounded up to 256."""
    return -(-int(lengths.max()) // 256) * 256


def pool_bytes(case: Case, pad: int, itemsize: int) -> int:
    return case.b * pad * case.h_kv * HEAD_DIM_QK * itemsize


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def randn_over_10(key, shape, dtype):
    """FlashMLA's test data: randn / 10 clamped to [-1, 1] (also used by the GPU tests).

    Never zeros: they hide indexing bugs and can run faster than real data."""
    return jnp.clip(jax.random.normal(key, shape, jnp.float32) / 10, -1, 1).astype(dtype)


@functools.partial(jax.jit, static_argnames=("num_chunks", "chunk_shape", "dtype"))
def _random_pool(key, num_chunks, chunk_shape, dtype):
    # One chunk at a time through lax.map, so the float32 draws of a multi-GiB pool never exist
    # all at once; the stacked result is reshaped (free) into the page pool.
    keys = jax.random.split(key, num_chunks)
    chunks = jax.lax.map(lambda k: randn_over_10(k, chunk_shape, dtype), keys)
    return chunks.reshape(num_chunks * chunk_shape[0], *chunk_shape[1:])


@dataclasses.dataclass
class Problem:
    q: jax.Array
    k_cache: jax.Array
    block_table: jax.Array
    cache_seqlens: jax.Array
    tile_md: jax.Array
    num_splits: jax.Array
    mean_len: float
    pad: int
    kv: str = "bf16"                      # "bf16" (q's dtype), "fp8_with_scale", "fp8_per_tensor"
    kv_scale: jax.Array | None = None     # fp8_per_tensor only
    num_sms: int | None = None            # the SM count the metadata was scheduled for

    def decode_args(self):
        return (self.q, self.k_cache, self.block_table, self.cache_seqlens, self.tile_md,
                self.num_splits, self.kv_scale)


#: KV-cache kinds of the benchmark rows, and bytes per cached token and KV head of each.
KV_KINDS = ("bf16", "fp8_with_scale", "fp8_per_tensor")
FP8_TOKEN_BYTES = {"fp8_with_scale": 656, "fp8_per_tensor": HEAD_DIM_QK}
#: Per-tensor scale of the benchmark's FP8 pools (data are randn / 10 clipped to [-1, 1]).
BENCH_KV_SCALE = 1.0 / 448


@functools.partial(jax.jit, static_argnames=("num_chunks", "layout"))
def _quantize_pool(k_cache, kv_scale, num_chunks, layout):
    """The bf16 pool in an FP8 layout, one chunk of pages at a time (bounded temporaries)."""
    from . import fp8

    chunks = k_cache.reshape(num_chunks, -1, *k_cache.shape[1:])
    if layout == "fp8_with_scale":
        out = jax.lax.map(fp8.quantize_fp8_with_scale, chunks)
    else:
        out = jax.lax.map(lambda c: fp8.quantize_fp8_per_tensor(c, kv_scale), chunks)
    return out.reshape(-1, *out.shape[2:])


def make_problem(case: Case, dtype, kv: str = "bf16", num_sms: int | None = None) -> Problem:
    lengths = case_lengths(case)
    pad = padded_len(lengths)
    blocks_per_seq = pad // PAGE_SIZE
    # Pages of all requests are one random permutation of the pool, as in FlashMLA's test.
    perm = np.random.default_rng(case.seed).permutation(case.b * blocks_per_seq)
    block_table = perm.reshape(case.b, blocks_per_seq).astype(np.int32)

    key_q, key_kv = jax.random.split(jax.random.key(case.seed))
    q = randn_over_10(key_q, (case.b, case.s_q, case.h_q, HEAD_DIM_QK), dtype)
    k_cache = _random_pool(key_kv, case.b, (blocks_per_seq, PAGE_SIZE, case.h_kv, HEAD_DIM_QK),
                           dtype)
    cache_seqlens = jnp.asarray(lengths)
    # Metadata once per step, shared by every call (as a model shares it by all layers).
    tile_md, num_splits = get_mla_metadata(cache_seqlens, case.s_q * case.h_q // case.h_kv,
                                           case.h_kv, num_sms=num_sms)
    kv_scale = None
    if kv != "bf16":
        # The same data, quantized; the bf16 pool is dropped once the FP8 one exists.
        kv_scale = jnp.float32(BENCH_KV_SCALE) if kv == "fp8_per_tensor" else None
        k_cache = _quantize_pool(k_cache, jnp.float32(BENCH_KV_SCALE), case.b, kv)
    problem = Problem(q, k_cache, jnp.asarray(block_table), cache_seqlens, tile_md, num_splits,
                      float(lengths.mean()), pad, kv, kv_scale, num_sms)
    jax.block_until_ready(problem.decode_args())
    return problem


# ---------------------------------------------------------------------------------------------
# The functions timed
# ---------------------------------------------------------------------------------------------
#: The public call exactly as a user jits it.
decode_call = jax.jit(flash_mla_with_kvcache,
                      static_argnames=("head_dim_v", "causal", "num_sms", "is_fp8_kvcache"))


def _fp8_kwargs(kv: str, kv_scale) -> dict:
    if kv == "fp8_with_scale":
        return {"is_fp8_kvcache": True}
    if kv == "fp8_per_tensor":
        return {"kv_scale": kv_scale}
    return {}


# num_sms: the SM count the metadata was scheduled for (None: the device's), so that the call's
# check of the metadata's part count agrees with a --num-sms schedule.
def _decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, kv_scale=None, *,
            causal, kv="bf16", num_sms=None):
    return decode_call(q, k_cache, block_table, cache_seqlens, head_dim_v=HEAD_DIM_V,
                       tile_scheduler_metadata=tile_md, num_splits=num_splits, causal=causal,
                       num_sms=num_sms, **_fp8_kwargs(kv, kv_scale))


@functools.partial(jax.jit, static_argnames=("causal", "kv", "num_sms"))
def decode_loop(n, q, k_cache, block_table, cache_seqlens, tile_md, num_splits, kv_scale=None, *,
                causal, kv="bf16", num_sms=None):
    """``n`` decodes in one dispatch; returns the final q (carried through the loop)."""
    def body(_, q_carry):
        out, _ = flash_mla_with_kvcache(q_carry, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                        tile_md, num_splits, causal=causal, num_sms=num_sms,
                                        **_fp8_kwargs(kv, kv_scale))
        # Feed one output element back into q: a loop-carried dependency, so XLA can neither
        # hoist the loop-invariant decode out of the loop nor drop iterations. The in-place
        # one-element update costs nothing next to the decode.
        return q_carry.at[0, 0, 0, 0].set(out[0, 0, 0, 0])
    return jax.lax.fori_loop(0, n, body, q)


def naive_decode(q, k_cache, block_table, cache_seqlens, head_dim_v: int = HEAD_DIM_V,
                 softmax_scale: float | None = None, causal: bool = True):
    """The paged MLA decode a JAX user writes today: gather every page, fp32 einsums, softmax.

    Materializes the gathered pages ``[b, max_pages * 64, h_kv, 576]`` (and XLA adds fp32 copies
    of parts of them), so its memory grows with the padded length of the longest request.
    """
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    # Gather in the cache dtype and cast at each einsum: on an H100 (jax 0.11.2) this ran 10-20%
    # faster than casting the gathered pages to fp32 once, so the baseline is not a straw man.
    kv = k_cache[block_table].reshape(b, -1, h_kv, d)                        # [b, s_k, h_kv, d]
    s_k = kv.shape[1]
    qf = q.astype(jnp.float32).reshape(b, s_q, h_kv, h_q // h_kv, d)
    scores = jnp.einsum("bshgd,bkhd->bhgsk", qf, kv.astype(jnp.float32)) * scale
    # Key j is visible to query token i if j < seqlen (and, causal, j <= seqlen - s_q + i).
    limit = cache_seqlens[:, None] + jnp.zeros((1, s_q), jnp.int32)            # [b, s_q]
    if causal:
        limit = limit - s_q + 1 + jnp.arange(s_q, dtype=jnp.int32)[None, :]
    visible = jnp.arange(s_k, dtype=jnp.int32)[None, None, :] < limit[:, :, None]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgsk,bkhv->bshgv", probs, kv[..., :head_dim_v].astype(jnp.float32))
    return out.reshape(b, s_q, h_q, head_dim_v).astype(q.dtype)


naive_call = jax.jit(naive_decode, static_argnames=("head_dim_v", "softmax_scale", "causal"))


def naive_bytes_estimate(case: Case, pad: int, itemsize: int) -> int:
    """The naive decode's big temporaries: the gathered pages in the cache dtype, plus about as
    many elements in fp32 (XLA materializes the cast V slice; conservative for the K cast)."""
    return case.b * pad * case.h_kv * HEAD_DIM_QK * (itemsize + 4)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    calls_per_rep: int
    samples_s: list


def _run_batch(fn, args, count: int, keep_all: bool) -> float:
    start = time.perf_counter()
    outs = []
    out = None
    for _ in range(count):
        out = fn(*args)
        if keep_all:
            outs.append(out)
    # One GPU stream runs the calls in order, so the last being ready means all are. The CPU
    # client may run independent calls concurrently, so there we wait for every one.
    jax.block_until_ready(outs if keep_all else out)
    return time.perf_counter() - start


def time_per_call(fn, args, *, reps: int, target_s: float, keep_all: bool,
                  max_calls: int = 20000) -> Timing:
    """Median over ``reps`` of (wall time of ``K`` back-to-back calls) / ``K``; K adapted to
    ``target_s`` per repetition. ``fn`` must already be compiled."""
    _run_batch(fn, args, 2, keep_all)                    # warm-up: allocator, caches, clocks
    count, elapsed = 1, _run_batch(fn, args, 1, keep_all)
    # Grow K until a batch lasts at least half the target, then size it to the target.
    while elapsed < target_s / 2 and count < max_calls:
        count = min(max_calls, count * max(2, int(target_s / max(elapsed, 1e-6) / 2)))
        elapsed = _run_batch(fn, args, count, keep_all)
    count = max(1, min(max_calls, round(count * target_s / elapsed)))
    samples = [_run_batch(fn, args, count, keep_all) / count for _ in range(reps)]
    return Timing(statistics.median(samples), min(samples), max(samples), count, samples)


def time_loop(problem: Problem, causal: bool, *, reps: int, target_s: float,
              single_s: float) -> Timing:
    """Per-decode time of ``M`` decodes inside one jitted fori_loop (dispatch amortized)."""
    args = problem.decode_args()
    iters = int(min(20000, max(2, round(target_s / max(single_s, 1e-7)))))
    n = jnp.int32(iters)

    def run_once() -> float:
        start = time.perf_counter()
        jax.block_until_ready(decode_loop(n, *args, causal=causal, kv=problem.kv,
                                          num_sms=problem.num_sms))
        return (time.perf_counter() - start) / iters

    run_once()                                           # compile and warm up
    samples = [run_once() for _ in range(reps)]
    return Timing(statistics.median(samples), min(samples), max(samples), iters, samples)


# ---------------------------------------------------------------------------------------------
# Ceilings, measured in the same run
# ---------------------------------------------------------------------------------------------
_copy = jax.jit(jnp.copy)
_matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.bfloat16))


def measure_ceilings(on_gpu: bool, reps: int, target_s: float) -> dict:
    keep_all = not on_gpu
    key_a, key_b = jax.random.split(jax.random.key(1234))
    # Copy bandwidth, counting bytes read + written (as the anchor's 3027 GB/s does).
    copy_elems = (1 << 30) if on_gpu else (1 << 25)      # bf16: 2 GiB on GPU, 64 MiB on CPU
    x = randn_over_10(key_a, (copy_elems,), jnp.bfloat16)
    jax.block_until_ready(_copy(x))
    t_copy = time_per_call(_copy, (x,), reps=reps, target_s=target_s, keep_all=keep_all)
    copy_bytes = 2 * copy_elems * 2
    del x
    # bf16 matmul on random data (zeros run faster and would flatter the ceiling). Timed like the
    # decode (back to back for ~target_s), which on the H100 gave ~700 TFLOPS against ~810 from
    # the kernel's own profiled time and 795 for the anchor's short bursts: the sustained rate
    # is lower (clocks), and it is the one our decode timing sees.
    n = 8192 if on_gpu else 512
    a = randn_over_10(key_a, (n, n), jnp.bfloat16)
    b = randn_over_10(key_b, (n, n), jnp.bfloat16)
    jax.block_until_ready(_matmul(a, b))
    t_mm = time_per_call(_matmul, (a, b), reps=reps, target_s=target_s, keep_all=keep_all)
    del a, b
    gc.collect()
    return {
        "copy_GBps": copy_bytes / t_copy.median_s / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_TFLOPS": 2 * n ** 3 / t_mm.median_s / 1e12,
        "matmul_n": n,
    }


# ---------------------------------------------------------------------------------------------
# Optional profiler trace (GPU): device kernel times per call
# ---------------------------------------------------------------------------------------------
_NON_KERNEL_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "TensorFlow", "Source",
                     "Launch Stats", "XLA TraceMe")


def profile_kernels(fn, args, calls: int) -> dict | None:
    """Traces ``calls`` calls with jax.profiler and sums the device events per kernel name.

    Returns ``{"device_us_per_call": ..., "kernels_us_per_call": {name: us}}`` or None when the
    trace has no device plane (or cannot be read)."""
    from jax.profiler import ProfileData
    with tempfile.TemporaryDirectory() as logdir:
        jax.block_until_ready(fn(*args))
        jax.profiler.start_trace(logdir)
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return None
        data = ProfileData.from_file(files[0])
        per_kernel: dict[str, float] = {}
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if line.name.startswith(_NON_KERNEL_LINES):
                    continue
                for event in line.events:
                    per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.duration_ns
    if not per_kernel:
        return None
    kernels = {name: ns / calls / 1e3 for name, ns in
               sorted(per_kernel.items(), key=lambda kv: -kv[1])}
    return {"device_us_per_call": sum(kernels.values()), "kernels_us_per_call": kernels}


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------
def case_work(case: Case, mean_len: float, itemsize: int,
              kv: str = "bf16") -> tuple[float, float]:
    """FlashMLA's FLOP and byte counts (causal masking not discounted). FP8 caches: the KV term
    counts the layout's bytes per token (656 with scales, 576 per tensor); q/out keep itemsize."""
    rows = case.b * case.h_q * case.s_q
    flop = rows * (2 * HEAD_DIM_QK * mean_len + 2 * HEAD_DIM_V * mean_len)
    kv_token_bytes = FP8_TOKEN_BYTES.get(kv, HEAD_DIM_QK * itemsize)
    nbytes = case.b * (itemsize * (case.s_q * case.h_q * HEAD_DIM_QK
                                   + case.s_q * case.h_q * HEAD_DIM_V)
                       + mean_len * case.h_kv * kv_token_bytes)
    return flop, nbytes


def anchor_for(case: Case, dtype_name: str) -> dict | None:
    """FlashMLA's figure for this case from the H100 anchor tables, if it is one of theirs."""
    if dtype_name != "bf16" or case.h_kv != 1 or not (case.causal and case.varlen):
        return None
    main = ANCHOR_MAIN.get((case.s_q, case.h_q, case.s_k)) if case.b == 128 else None
    if main is not None:
        us, tflops, gbps, roof, naive_us = main
        return {"source": "h100.md main table", "us": us, "TFLOPS": tflops, "GBps": gbps,
                "of_roofline": roof, "naive_jax_us": naive_us}
    small = ANCHOR_SMALL_BATCH.get((case.b, case.s_q, case.h_q, case.s_k))
    if small is not None:
        return {"source": "h100.md small-batch table (eager PyTorch calls)", "us": small}
    return None


def device_memory_bytes() -> int:
    """What JAX's allocator may use on the device (GPU: ``bytes_limit``, 75% of the card by
    default); physical memory on CPU."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_case(case: Case, opts: argparse.Namespace, env: dict, kv: str = "bf16") -> dict:
    dtype = jnp.bfloat16 if opts.dtype == "bf16" else jnp.float16
    itemsize = 2
    target_s = opts.target_ms / 1e3
    keep_all = not env["on_gpu"]
    mem = env["device_memory_bytes"]
    result = {"case": dataclasses.asdict(case), "label": case.label(), "kv": kv}

    lengths = case_lengths(case)
    pad = padded_len(lengths)
    need = pool_bytes(case, pad, itemsize)
    if kv != "bf16":  # the bf16 pool and its quantized copy exist together for a moment
        need += case.b * pad * case.h_kv * FP8_TOKEN_BYTES[kv]
        if kv == "fp8_with_scale" and case.h_kv != 1:
            result["skipped"] = "fp8_with_scale caches have one KV head (h_kv = 1)"
            return result
    if need > 0.8 * mem:
        result["skipped"] = (f"page pool {need / 2**30:.1f} GiB > 80% of the device memory JAX "
                             f"may use")
        return result

    problem = make_problem(case, dtype, kv, opts.num_sms)
    args = problem.decode_args()
    decode = functools.partial(_decode, causal=case.causal, kv=kv, num_sms=problem.num_sms)
    out, _ = decode(*args)
    jax.block_until_ready(out)

    single = time_per_call(decode, args, reps=opts.reps, target_s=target_s, keep_all=keep_all)
    loop = time_loop(problem, case.causal, reps=opts.reps, target_s=target_s,
                     single_s=single.median_s)
    flop, nbytes = case_work(case, problem.mean_len, itemsize, kv)
    t = single.median_s
    ceil = env["ceilings"]
    mem_s = nbytes / (ceil["copy_GBps"] * 1e9)
    roof_s = max(mem_s, flop / (ceil["matmul_TFLOPS"] * 1e12))
    result.update({
        "mean_len": problem.mean_len,
        "max_len": int(lengths.max()),
        "pool_bytes": need,
        "flop": flop,
        "bytes": nbytes,
        "us": t * 1e6,
        "us_min": single.min_s * 1e6,
        "us_max": single.max_s * 1e6,
        "calls_per_rep": single.calls_per_rep,
        "TFLOPS": flop / t / 1e12,
        "GBps": nbytes / t / 1e9,
        "of_roofline": roof_s / t,
        # Against the anchor machine's ceilings, to compare with FlashMLA's 'of roofline'.
        "of_roofline_anchor_ceilings": max(nbytes / (ANCHOR_COPY_GBPS * 1e9),
                                           flop / (ANCHOR_MATMUL_TFLOPS * 1e12)) / t,
        "bound": "memory" if roof_s == mem_s else "compute",
        "loop_us": loop.median_s * 1e6,
        "loop_iters": loop.calls_per_rep,
        "loop_of_roofline": roof_s / loop.median_s,
        "overhead_pct": (t - loop.median_s) / loop.median_s * 100,
    })
    if env["on_gpu"] and nbytes < 4 * L2_BYTES_HINT:
        result["warning"] = "working set near L2 size: repeated calls may read from L2"

    if opts.profile and env["on_gpu"]:
        try:
            result["profile"] = profile_kernels(decode, args, calls=20)
        except Exception as e:  # noqa: BLE001 - profiling is best effort
            result["profile"] = None
            result["profile_error"] = f"{type(e).__name__}: {e}"

    result["naive_us"] = None
    if kv != "bf16":
        result["naive_skipped"] = "the naive baseline runs on bf16 caches only"
    elif not opts.no_naive:
        est = naive_bytes_estimate(case, pad, itemsize)
        result["naive_bytes_estimate"] = est
        if est > 0.4 * mem:
            result["naive_skipped"] = (f"gathered pages ~{est / 2**30:.1f} GiB > 40% of the "
                                       f"device memory JAX may use")
        else:
            naive = functools.partial(naive_call, causal=case.causal)
            nargs = (problem.q, problem.k_cache, problem.block_table, problem.cache_seqlens)
            try:
                ref = naive(*nargs)
                # Sanity check that the timed decode computes the same thing.
                result["max_abs_diff_vs_naive"] = float(jnp.max(jnp.abs(
                    out.astype(jnp.float32) - ref.astype(jnp.float32))))
                del ref
                tn = time_per_call(naive, nargs, reps=opts.reps, target_s=target_s,
                                   keep_all=keep_all)
                result["naive_us"] = tn.median_s * 1e6
                result["speedup_vs_naive"] = tn.median_s / t
            except Exception as e:  # noqa: BLE001 - an OOM skips the baseline, not the case
                if not _is_oom(e):
                    raise
                result["naive_skipped"] = "out of memory"

    anchor = anchor_for(case, opts.dtype) if kv == "bf16" else None  # FlashMLA anchors are bf16
    result["flashmla"] = anchor
    if anchor is not None:
        result["speedup_vs_flashmla"] = anchor["us"] / result["us"]
    del out, problem, args
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _num(value) -> str:
    """Three significant digits, so CPU-sized figures do not print as 0.0."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_table(results: list[dict]) -> str:
    cols = [("b", 4), ("s_q", 3), ("h_q", 4), ("h_kv", 4), ("s_k", 6), ("us", 9), ("TFLOPS", 7),
            ("GB/s", 7), ("%roof", 6), ("loop us", 9), ("ovh%", 6), ("naive us", 9),
            ("x naive", 7), ("FlashMLA", 8), ("x FlashMLA", 10)]
    with_kv = any(r.get("kv", "bf16") != "bf16" for r in results)
    if with_kv:  # FP8 rows: which cache, and the FP8 row's time over the bf16 row's
        cols += [("kv", 14), ("fp8/bf16", 8)]
    lines = ["  ".join(name.rjust(w) for name, w in cols)]
    for r in results:
        c = r["case"]
        if "skipped" in r:
            row = [str(c["b"]), str(c["s_q"]), str(c["h_q"]), str(c["h_kv"]), str(c["s_k"])]
            kv = f" ({r.get('kv', 'bf16')})" if with_kv else ""
            lines.append("  ".join(v.rjust(w) for v, (_, w) in zip(row, cols))
                         + f"  skipped{kv}: " + r["skipped"])
            continue
        anchor = r.get("flashmla")
        row = [str(c["b"]), str(c["s_q"]), str(c["h_q"]), str(c["h_kv"]), str(c["s_k"]),
               _fmt(r["us"], ".1f"), _num(r["TFLOPS"]), _num(r["GBps"]),
               _fmt(r["of_roofline"] * 100, ".0f"), _fmt(r["loop_us"], ".1f"),
               _fmt(r["overhead_pct"], "+.1f"), _fmt(r.get("naive_us"), ".0f"),
               _fmt(r.get("speedup_vs_naive"), ".2f"),
               _fmt(anchor["us"] if anchor else None, "d"),
               _fmt(r.get("speedup_vs_flashmla"), ".2f")]
        if with_kv:
            row += [r.get("kv", "bf16"), _fmt(r.get("ratio_vs_bf16"), ".2f")]
        lines.append("  ".join(v.rjust(w) for v, (_, w) in zip(row, cols)))
    return "\n".join(lines)


def write_plot(results: list[dict], path: str) -> str:
    """Time and % of roofline against s_k, one line per (b, s_q, h_q, h_kv); FlashMLA dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not installed, no plot written (pip install matplotlib)"
    series: dict[tuple, list[dict]] = {}
    for r in results:
        if "skipped" not in r:
            c = r["case"]
            series.setdefault((c["b"], c["s_q"], c["h_q"], c["h_kv"], r.get("kv", "bf16")),
                              []).append(r)
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (b, s_q, h_q, h_kv, kv), rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["case"]["s_k"])
        s_k = [r["case"]["s_k"] for r in rows]
        name = (f"b={b} s_q={s_q} h_q={h_q}" + (f" h_kv={h_kv}" if h_kv != 1 else "")
                + (f" {kv}" if kv != "bf16" else ""))
        line, = ax_t.plot(s_k, [r["us"] for r in rows], marker="o", label=name)
        ax_r.plot(s_k, [r["of_roofline"] * 100 for r in rows], marker="o", label=name,
                  color=line.get_color())
        anchored = [(k, r["flashmla"]["us"]) for k, r in zip(s_k, rows) if r.get("flashmla")]
        if anchored:
            ax_t.plot(*zip(*anchored), linestyle="--", marker="x", color=line.get_color())
    for ax, ylabel in ((ax_t, "time per call (us); dashed: FlashMLA H100"),
                       (ax_r, "% of measured roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("s_k (mean KV length)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_r.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def describe_environment(on_gpu: bool) -> dict:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "num_sms": getattr(dev, "core_count", None),
        "jax": jax.__version__,
        "jax_flashmla": __version__,
        "build": build_info(),
        "python": platform.python_version(),
        "on_gpu": on_gpu,
        "path": ("CUDA kernels (FFI custom calls)" if on_gpu
                 else "pure-JAX reference (mla_decode_reference); not kernel figures"),
        "device_memory_bytes": device_memory_bytes(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jax_flashmla.bench",
        description="Benchmark flash_mla_with_kvcache against the measured roofline, a naive "
                    "jitted JAX decode and FlashMLA's H100 figures.")
    p.add_argument("--cases", help='custom cases, e.g. "b=64,s_q=1,h_q=16,s_k=4096;b=8,h_q=128"'
                                   " (keys: b, s_q, h_q, h_kv, s_k, causal, varlen, seed; "
                                   "defaults b=128 s_q=1 h_q=128 h_kv=1 s_k=4096 causal=1 "
                                   "varlen=1 seed=0)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--kv", choices=("bf16", "fp8_with_scale", "fp8_per_tensor", "all"),
                   default="bf16",
                   help="KV cache: bf16 only (default), or add FP8 rows (656-byte tokens with "
                        "scales, per-tensor e4m3, or both: all) beside the bf16 row of each case")
    p.add_argument("--no-naive", action="store_true", help="skip the naive JAX baseline")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="length of one timed repetition (default 100 on GPU, 20 on CPU)")
    p.add_argument("--quick", action="store_true", help="only the first 3 cases, at most 3 reps")
    p.add_argument("--profile", action="store_true",
                   help="GPU: also trace 20 calls with jax.profiler and report kernel times")
    p.add_argument("--num-sms", type=int, default=None, metavar="N",
                   help="SM count the metadata schedules for (get_mla_metadata's num_sms; default: "
                        "the device's). More than the device has gives the decode several waves "
                        "of CTAs, which a fast SM takes more of (a schedule experiment)")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.num_sms is not None and args.num_sms < 1:
        p.error("--num-sms must be >= 1")
    args.kv_kinds = (list(KV_KINDS) if args.kv == "all" else
                     ["bf16"] + ([args.kv] if args.kv != "bf16" else []))
    if len(args.kv_kinds) > 1 and args.dtype != "bf16":
        p.error("--kv with FP8 caches needs --dtype bf16 (FP8 decode takes bf16 queries)")
    if args.cases:
        try:
            args.case_list = parse_cases(args.cases)
        except ValueError as e:
            p.error(f"--cases: {e}")
    else:
        args.case_list = None
    return args


def main(argv=None) -> dict:
    """Runs the benchmark; returns the report (also written with --json)."""
    opts = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not is_built_with_cuda():
        sys.exit("jax_flashmla.bench: a GPU is visible but jax_flashmla was built without its "
                 "CUDA kernels; reinstall with nvcc on PATH (" + build_info().get("reason", "")
                 + ")")
    if opts.target_ms is None:
        opts.target_ms = 100.0 if on_gpu else 20.0
    if opts.quick:
        opts.reps = min(opts.reps, 3)
    cases = opts.case_list or (anchor_grid() if on_gpu else cpu_grid())
    if opts.quick:
        cases = cases[:3]

    env = describe_environment(on_gpu)
    print(f"jax_flashmla {__version__} bench | jax {env['jax']} | backend {env['backend']} | "
          f"{env['device']}" + (f" ({env['num_sms']} SMs)" if env["num_sms"] else ""))
    if on_gpu:
        print("decode path: CUDA kernels")
    else:
        print("decode path: CPU, through the pure-JAX reference (no GPU visible): figures check "
              "the plumbing only" + ("" if opts.case_list else "; small CPU grid instead of "
                                     "FlashMLA's b=128 grid"))
    print(f"timing: back-to-back jitted calls, ~{opts.target_ms:g} ms per repetition, median of "
          f"{opts.reps}; metadata computed once per case")

    env["ceilings"] = measure_ceilings(on_gpu, opts.reps, opts.target_ms / 1e3)
    ceil = env["ceilings"]
    print(f"ceilings (this run): copy {_num(ceil['copy_GBps'])} GB/s (read+write), bf16 matmul "
          f"{_num(ceil['matmul_TFLOPS'])} TFLOPS (n={ceil['matmul_n']}); anchor H100: "
          f"{ANCHOR_COPY_GBPS:.0f} GB/s, {ANCHOR_MATMUL_TFLOPS:.0f} TFLOPS")
    if opts.profile and not on_gpu:
        print("--profile: ignored on CPU (device kernel times exist only on GPU)")

    results = []
    failures = 0
    runs = [(case, kv) for case in cases for kv in opts.kv_kinds]
    bf16_us: dict[Case, float] = {}
    for i, (case, kv) in enumerate(runs, 1):
        label = case.label() + (f" kv={kv}" if len(opts.kv_kinds) > 1 else "")
        try:
            r = run_case(case, opts, env, kv)
        except Exception as e:  # noqa: BLE001 - report the case and go on with the others
            failures += 1
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            r = {"case": dataclasses.asdict(case), "label": case.label(), "kv": kv,
                 "skipped": f"failed: {type(e).__name__}: {first_line}"}
            gc.collect()
        results.append(r)
        if "skipped" in r:
            print(f"[{i}/{len(runs)}] {label}: skipped ({r['skipped']})")
            continue
        if kv == "bf16":
            bf16_us[case] = r["us"]
        elif case in bf16_us:
            r["ratio_vs_bf16"] = r["us"] / bf16_us[case]
        line = (f"[{i}/{len(runs)}] {label}: {r['us']:.1f} us, {_num(r['TFLOPS'])} TFLOPS, "
                f"{_num(r['GBps'])} GB/s, {r['of_roofline']:.0%} of roofline ({r['bound']}-bound"
                + (f"; {r['of_roofline_anchor_ceilings']:.0%} with the anchor's ceilings)"
                   if on_gpu else ")"))
        if r.get("ratio_vs_bf16"):
            line += f", {r['ratio_vs_bf16']:.2f}x the bf16 time"
        if r.get("naive_us"):
            line += (f", naive {r['naive_us']:.0f} us, max|diff| "
                     f"{r['max_abs_diff_vs_naive']:.2e}")
        elif r.get("naive_skipped"):
            line += f", naive skipped ({r['naive_skipped']})"
        print(line)
        if r.get("warning"):
            print("    warning: " + r["warning"])
        prof = r.get("profile")
        if prof:
            top = ", ".join(f"{name[:60]} {us:.1f}"
                            for name, us in list(prof["kernels_us_per_call"].items())[:4])
            print(f"    profile: {prof['device_us_per_call']:.1f} us of device kernels per call "
                  f"({top})")
        elif opts.profile and on_gpu:
            print("    profile: no device events found" + (
                f" ({r['profile_error']})" if r.get("profile_error") else ""))

    report = {"meta": {**env, "reps": opts.reps, "target_ms": opts.target_ms,
                       "schedule_num_sms": opts.num_sms,
                       "dtype": opts.dtype, "kv": opts.kv_kinds,
                       "argv": list(sys.argv if argv is None else argv),
                       "formulas": {
                           "flop": "b*h_q*s_q*(2*576*L + 2*512*L), L = mean length",
                           "bytes": "b*(s_q*h_q*576*2 + L*h_kv*576*2 + s_q*h_q*512*2); FP8 "
                                    "caches: L*h_kv*656 (with scales) or L*h_kv*576 (per "
                                    "tensor) for the KV term",
                           "of_roofline": "max(bytes/copy_GBps, flop/matmul_TFLOPS) / time",
                           "overhead_pct": "(single-call us - loop us) / loop us * 100"}},
              "cases": results, "failures": failures}
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
        print(f"JSON written to {opts.json}")
    if opts.plot:
        print(write_plot(results, opts.plot))

    print()
    print("us: jitted call, back to back; loop us: the same inside one jitted fori_loop; "
          "ovh%: single call over loop; x naive / x FlashMLA: their time over ours"
          + ("; fp8/bf16: the FP8 row's time over the bf16 row's" if len(opts.kv_kinds) > 1
             else "")
          + ("" if on_gpu else "  [CPU: pure-JAX reference]"))
    print(format_table(results))
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
