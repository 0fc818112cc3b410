"""SM clock and board power while each KV layout's decode runs back to back (run.sh power).

Compute-bound decodes can run into the H100's power limit, where the SM clock drops; a layout
that draws more power then runs slower for a reason no kernel change inside the schedule fixes.
For each layout this times the same case (POWER_CASE, default s_q=2, h_q=128, s_k=16384) inside
one jitted loop for ~POWER_SECONDS and samples nvidia-smi every 100 ms meanwhile.
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


def main() -> None:
    case = bench.parse_cases(os.environ.get("POWER_CASE", "s_q=2,h_q=128,s_k=16384"))[0]
    seconds = float(os.environ.get("POWER_SECONDS", "4"))
    for kv in ("bf16", "fp8_with_scale", "fp8_per_tensor"):
        problem = bench.make_problem(case, jnp.bfloat16, kv)
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

        per_call, rows = sample_while(run)
        busy = [r for r in rows if r[1] > 200.0] or rows  # samples while the loop ran
        print(f"POWER {kv:15s} {per_call * 1e6:8.1f} us/call  SM clock median "
              f"{statistics.median(r[0] for r in busy):6.0f} MHz (min {min(r[0] for r in busy):.0f})"
              f"  power median {statistics.median(r[1] for r in busy):5.0f} W "
              f"(max {max(r[1] for r in busy):.0f})  samples {len(busy)}/{len(rows)}", flush=True)
        del problem, args


if __name__ == "__main__":
    main()
