"""What each decode CTA spends, from the per-CTA clock probe (tests/gpu/run.sh part-times): not a test.

Needs the package built with -DJFM_PART_TIMES and XLA's command buffers off. For each case and
per-piece charge of the schedule (``schedule_numpy(..., fixed_overhead=c)``), one launch is
stamped after a few warm ones: each CTA's start and end (%globaltimer). With the schedule's
pages, pieces and split pieces per part, a least-squares fit of the CTAs' durations gives what a
page, a piece and a split piece cost; the CTA that ends last shows whether the launch waits on
the most loaded part or on a late start. Prints ``PARTS`` lines (one per case and charge),
``LAST`` lines (the latest CTAs) and ``SMS`` lines (does an SM keep its speed across launches).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla import bench, scheduler

DEFAULT_CASES = ("s_q=1,h_q=16,s_k=4096;s_q=1,h_q=16,s_k=32768;s_q=1,h_q=128,s_k=4096;"
                 "s_q=2,h_q=128,s_k=4096;s_q=2,h_q=128,s_k=16384")


def part_load(md: np.ndarray, num_splits: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[parts, 3]: pages, pieces and split pieces (of requests cut over parts) of each part."""
    nblk = scheduler._blocks(np.asarray(lengths))
    pieces_of = np.diff(np.asarray(num_splits))
    b = len(lengths)
    load = np.zeros((md.shape[0], 3))
    for i, row in enumerate(md):
        begin_req, end_req, begin_blk, end_blk = (int(v) for v in row[:4])
        if begin_req >= b or begin_req < 0:
            continue
        for req in range(begin_req, end_req + 1):
            start = begin_blk if req == begin_req else 0
            end = end_blk if req == end_req else nblk[req]
            load[i] += (end - start, 1, pieces_of[req] > 1)
    return load


def stamped_launch(fn, args) -> list[str]:
    """Runs fn(*args) once with the probe's printing on; returns the JFM_PART lines it printed."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 1)
        os.environ["JFM_PART_TIMES_PRINT"] = "1"
        try:
            jax.block_until_ready(fn(*args))
        finally:
            os.environ.pop("JFM_PART_TIMES_PRINT", None)
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        return capture.read().decode().splitlines()


def parse_launch(lines: list[str]):
    """(grid, stamps [ctas, 3]: smid, begin ns, end ns) of the decode kernel's stamped launch."""
    grid, rows = None, []
    for line in lines:
        f = line.split()
        if f and f[0] == "JFM_PART_LAUNCH":
            grid, rows = tuple(int(x) for x in f[2:5]), []
        elif f and f[0] == "JFM_PART":
            rows.append([int(f[2]), int(f[3]), int(f[4])])
    if grid is None:
        raise SystemExit("no JFM_PART_LAUNCH line: build with -DJFM_PART_TIMES and turn XLA's "
                         "command buffers off (--xla_gpu_enable_command_buffer=)")
    return grid, np.asarray(rows, dtype=np.int64)


def fit_durations(stamps: np.ndarray, load: np.ndarray):
    """Least-squares fit of the busy CTAs' durations (us) to their part's load.

    Returns (part of each CTA, duration, busy mask, coefficients: page, piece, split piece,
    constant, residuals of the busy CTAs)."""
    part = np.arange(stamps.shape[0]) // (stamps.shape[0] // load.shape[0])
    dur = (stamps[:, 2] - stamps[:, 1]) / 1e3
    x = load[part]
    busy = x[:, 1] > 0
    a = np.column_stack([x[busy], np.ones(busy.sum())])
    coef, *_ = np.linalg.lstsq(a, dur[busy], rcond=None)
    return part, dur, busy, coef, dur[busy] - a @ coef


def report(label: str, c: int, stamps: np.ndarray, load: np.ndarray, us_call: float):
    part, dur, busy, coef, resid = fit_durations(stamps, load)
    x = load[part]
    t0 = stamps[:, 1].min()
    begin = (stamps[:, 1] - t0) / 1e3
    end = (stamps[:, 2] - t0) / 1e3
    r2 = 1 - resid.var() / max(dur[busy].var(), 1e-12)
    print(f"PARTS {label:40s} charge {c} ctas {stamps.shape[0]} call {us_call:8.1f} us | "
          f"span {end.max():7.1f} us, starts within {begin.max():5.1f} | duration mean "
          f"{dur[busy].mean():7.1f} max {dur.max():7.1f} | pages/part mean {load[:, 0].mean():6.1f} "
          f"max {load[:, 0].max():4.0f} | fit us: page {coef[0]:5.2f} piece {coef[1]:5.2f} "
          f"split {coef[2]:5.2f} const {coef[3]:6.2f} (R2 {r2:.3f}, resid sd {resid.std():.2f})",
          flush=True)
    for i in np.argsort(-end)[:3]:
        print(f"LAST  {label:40s} charge {c} cta {i} part {part[i]} sm {stamps[i, 0]} start "
              f"{begin[i]:6.1f} end {end[i]:7.1f} pages {x[i, 0]:4.0f} pieces {x[i, 1]:2.0f} "
              f"split {x[i, 2]:1.0f}", flush=True)


def sm_persistence(raw: dict) -> None:
    """Prints SMS lines: per case, whether an SM keeps its speed across the stamped launches.

    Each busy CTA's duration less the launch's fit (fit_durations), over the mean duration, is
    keyed by the CTA's SM; the line gives the mean correlation of those residuals between
    launches (charges and repeats) and the SMs fastest and slowest on average."""
    cases: dict[str, list[np.ndarray]] = {}
    for key in sorted(k[: -len("_stamps")] for k in raw if k.endswith("_stamps")):
        stamps = raw[key + "_stamps"]
        _, dur, busy, _, resid = fit_durations(stamps, raw[key + "_load"])
        by_sm = np.full(int(stamps[:, 0].max()) + 1, np.nan)
        by_sm[stamps[busy, 0]] = resid / dur[busy].mean()
        cases.setdefault(key.rsplit("_c", 1)[0], []).append(by_sm)
    for case, rows in cases.items():
        width = max(len(r) for r in rows)
        m = np.array([np.pad(r, (0, width - len(r)), constant_values=np.nan) for r in rows])
        ok = ~np.isnan(m).any(axis=0)
        corr = np.corrcoef(m[:, ok]) if len(rows) > 1 else np.ones((1, 1))
        off = corr[~np.eye(len(rows), dtype=bool)] if len(rows) > 1 else np.array([np.nan])
        mean = np.nanmean(m[:, ok], axis=0)
        sms = np.flatnonzero(ok)
        order = np.argsort(mean)
        fmt = lambda idx: " ".join(f"{sms[i]}:{100 * mean[i]:+.1f}%" for i in idx)  # noqa: E731
        print(f"SMS   {case:50s} launches {len(rows)} resid sd {100 * np.nanstd(m):.2f}% | "
              f"corr between launches mean {np.nanmean(off):.2f} min {np.nanmin(off):.2f} | "
              f"fastest {fmt(order[:5])} | slowest {fmt(order[::-1][:5])}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=os.environ.get("PART_CASES", DEFAULT_CASES))
    p.add_argument("--overheads", default=os.environ.get("PART_OVERHEADS", "5,2,0"))
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--launches", type=int, default=int(os.environ.get("PART_LAUNCHES", "1")),
                   help="stamped launches per case and charge (does a CTA's SM keep its speed?)")
    p.add_argument("--raw", default=os.environ.get("PART_RAW"),
                   help="write every stamped launch's [ctas, 3] stamps and part loads to this .npz")
    p.add_argument("--analyze", metavar="NPZ", help="only print the SMS lines of a saved --raw file")
    a = p.parse_args()
    if a.analyze:
        with np.load(a.analyze) as saved:
            sm_persistence(dict(saved))
        return
    raw = {}
    print(jax.devices(), flush=True)
    for case in bench.parse_cases(a.cases):
        problem = bench.make_problem(case, jnp.bfloat16)
        lengths = bench.case_lengths(case)
        parts = problem.tile_md.shape[0]
        decode = lambda *args: bench._decode(*args, causal=case.causal)  # noqa: E731
        for c in [int(v) for v in a.overheads.split(",")]:
            md, ns = scheduler.schedule_numpy(lengths, parts, fixed_overhead=c)
            args = (problem.q, problem.k_cache, problem.block_table, problem.cache_seqlens,
                    jnp.asarray(md), jnp.asarray(ns), problem.kv_scale)
            for _ in range(a.warm):
                jax.block_until_ready(decode(*args))
            t = bench.time_per_call(decode, args, reps=3, target_s=0.05, keep_all=False)
            load = part_load(md, ns, lengths)
            for k in range(a.launches):
                _, stamps = parse_launch(stamped_launch(decode, args))
                report(case.label(), c, stamps, load, t.median_s * 1e6)
                tag = f"{case.label().replace(' ', '_')}_c{c}_l{k}"
                raw[tag + "_stamps"], raw[tag + "_load"] = stamps, load
        del problem
    if a.raw:
        np.savez(a.raw, **raw)
    sm_persistence(raw)


if __name__ == "__main__":
    main()
