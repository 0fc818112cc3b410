"""SM clock and board power while each KV layout's decode runs back to back (run.sh power).

Compute-bound decodes can run into the H100's power limit, where the SM clock drops; a layout
that draws more power then runs slower for a reason no kernel change inside the schedule fixes.
For each layout this times the same case (POWER_CASE, default s_q=2, h_q=128, s_k=16384) inside
one jitted loop for ~POWER_SECONDS and samples nvidia-smi every 100 ms meanwhile.

POWER_SCALE_SHIFTS (e.g. "0 10") adds with-scale rows whose every scale is multiplied by 2^k
(exact): the same kernel and e4m3 codes on K values 2^k larger, so sharper softmax rows. A time
that moves with k moves with the data (power), not with the code.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from jax_flashmla import bench


def sample_while(fn):
    """Runs fn() with nvidia-smi sampling; returns (fn's result, [(clock MHz, watts)])."""
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
         "-lms", "100"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        result = fn()
    finally:
        smi.terminate()
    rows = []
    for line in smi.stdout.read().splitlines():
        try:
            clock, watts = (float(x) for x in line.split(","))
        except ValueError:
            continue
        rows.append((clock, watts))
    return result, rows


@jax.jit
def _shift_scales(k_cache, factor):
    """A with-scale pool (uint8 [..., 656]) with every float32 scale times `factor`."""
    from jax_flashmla import fp8

    lo, hi = fp8.SCALE_OFFSET, fp8.SCALE_OFFSET + 4 * 4
    scales = jax.lax.bitcast_convert_type(
        k_cache[..., lo:hi].reshape(*k_cache.shape[:-1], 4, 4), jnp.float32) * factor
    scale_bytes = jax.lax.bitcast_convert_type(scales, jnp.uint8).reshape(*k_cache.shape[:-1], 16)
    return k_cache.at[..., lo:hi].set(scale_bytes)


def main() -> None:
    case = bench.parse_cases(os.environ.get("POWER_CASE", "s_q=2,h_q=128,s_k=16384"))[0]
    seconds = float(os.environ.get("POWER_SECONDS", "4"))
    layouts = [(kv, None) for kv in ("bf16", "fp8_with_scale", "fp8_per_tensor")]
    layouts += [("fp8_with_scale", int(k)) for k in os.environ.get("POWER_SCALE_SHIFTS", "").split()]
    for kv, shift in layouts:
        problem = bench.make_problem(case, jnp.bfloat16, kv)
        if shift is not None:
            problem.k_cache = _shift_scales(problem.k_cache, jnp.float32(2.0 ** shift))
        args = problem.decode_args()
        one = jnp.int32(3)
        jax.block_until_ready(bench.decode_loop(one, *args, causal=case.causal, kv=kv))  # compile
        start = time.perf_counter()
        jax.block_until_ready(bench.decode_loop(one, *args, causal=case.causal, kv=kv))
        per_call = (time.perf_counter() - start) / 3
        iters = max(3, int(seconds / per_call))

        def run():
            t0 = time.perf_counter()
            jax.block_until_ready(bench.decode_loop(jnp.int32(iters), *args, causal=case.causal,
                                                    kv=kv))
            return (time.perf_counter() - t0) / iters

        per_call, samples = sample_while(run)
        busy = [r for r in samples if r[1] > 200.0] or samples  # samples while the loop ran
        name = kv if shift is None else f"{kv} x2^{shift}"
        print(f"POWER {name:20s} {per_call * 1e6:8.1f} us/call  SM clock median "
              f"{statistics.median(r[0] for r in busy):6.0f} MHz (min {min(r[0] for r in busy):.0f})"
              f"  power median {statistics.median(r[1] for r in busy):5.0f} W "
              f"(max {max(r[1] for r in busy):.0f})  samples {len(busy)}/{len(samples)}", flush=True)
        del problem, args


if __name__ == "__main__":
    main()
