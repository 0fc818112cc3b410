"""Scheduler experiments on the GPU (tests/gpu/run.sh sched-sweep): not a test.

1. The per-request cost the split-KV schedule assumes (FlashMLA's 5 blocks): each case's decode is
   timed with metadata from ``schedule_numpy(..., fixed_overhead=c)`` for several ``c``, the
   first ``c`` again at the end (drift), and every output is compared with the first.
2. What a request really costs: uniform lengths, the same total pages in more, shorter requests;
   the time per extra piece over the time per page.

``JAX_FLASHMLA_TUNING`` applies as for the benchmark. Prints ``SCHED`` lines (one per case and overhead) and ``PIECE`` lines.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla import bench, scheduler

DEFAULT_CASES = ("s_q=1,h_q=16,s_k=4096;s_q=1,h_q=32,s_k=4096;s_q=1,h_q=64,s_k=4096;"
                 "s_q=1,h_q=128,s_k=4096;s_q=2,h_q=64,s_k=4096;s_q=2,h_q=128,s_k=4096;"
                 "s_q=1,h_q=16,s_k=8192;s_q=1,h_q=128,s_k=8192;s_q=2,h_q=128,s_k=8192;"
                 "s_q=2,h_q=128,s_k=16384;s_q=1,h_q=16,s_k=32768")
PIECE_CASES = ("b=128,s_q=2,h_q=128,s_k=16384,varlen=0;b=512,s_q=2,h_q=128,s_k=4096,varlen=0;"
               "b=2048,s_q=2,h_q=128,s_k=1024,varlen=0;"
               "b=128,s_q=1,h_q=128,s_k=16384,varlen=0;b=2048,s_q=1,h_q=128,s_k=1024,varlen=0;"
               "b=128,s_q=1,h_q=16,s_k=16384,varlen=0;b=2048,s_q=1,h_q=16,s_k=1024,varlen=0")


def timed(problem, case, md, ns, reps):
    args = (problem.q, problem.k_cache, problem.block_table, problem.cache_seqlens,
            jnp.asarray(md), jnp.asarray(ns), problem.kv_scale)
    decode = lambda *a: bench._decode(*a, causal=case.causal)  # noqa: E731
    out, _ = decode(*args)
    t = bench.time_per_call(decode, args, reps=reps, target_s=0.1, keep_all=False)
    return t.median_s * 1e6, np.asarray(out.astype(jnp.float32))


def sweep(cases, overheads, reps):
    for case in bench.parse_cases(cases):
        problem = bench.make_problem(case, jnp.bfloat16)
        lengths = bench.case_lengths(case)
        parts = problem.tile_md.shape[0]
        ref = None
        for c in list(overheads) + [overheads[0]]:
            md, ns = scheduler.schedule_numpy(lengths, parts, fixed_overhead=c)
            us, out = timed(problem, case, md, ns, reps)
            if ref is None:
                ref = out
            diff = float(np.max(np.abs(out - ref)))
            ok = bool(np.isfinite(out).all()) and diff < 2e-2
            print(f"SCHED {case.label():40s} overhead {c} parts {parts} pieces {int(ns[-1])} "
                  f"us {us:9.1f} max|out - out(c={overheads[0]})| {diff:.2e} {'ok' if ok else 'BAD'}",
                  flush=True)
        del problem


def pieces(cases, reps):
    for case in bench.parse_cases(cases):
        problem = bench.make_problem(case, jnp.bfloat16)
        lengths = bench.case_lengths(case)
        parts = problem.tile_md.shape[0]
        md, ns = np.asarray(problem.tile_md), np.asarray(problem.num_splits)
        us, _ = timed(problem, case, md, ns, reps)
        pages = int(np.sum(scheduler._blocks(lengths)))
        print(f"PIECE {case.label():40s} parts {parts} pages/part {pages / parts:.1f} "
              f"pieces/part {int(ns[-1]) / parts:.2f} us {us:9.1f}", flush=True)
        del problem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=os.environ.get("SCHED_CASES", DEFAULT_CASES))
    p.add_argument("--overheads", default=os.environ.get("SCHED_OVERHEADS", "5,3,2,1,0"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-pieces", action="store_true")
    p.add_argument("--pieces-only", action="store_true",
                   default=bool(os.environ.get("SCHED_PIECES_ONLY")))
    a = p.parse_args()
    print(jax.devices(), flush=True)
    if not a.pieces_only:
        sweep(a.cases, [int(x) for x in a.overheads.split(",")], a.reps)
    if not a.no_pieces:
        pieces(PIECE_CASES, a.reps)


if __name__ == "__main__":
    main()
