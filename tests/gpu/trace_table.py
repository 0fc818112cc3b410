"""Tabulates the timeline probe's stamps (lines "JFM_TRACE wg pair event clock" from a -DJFM_TRACE
build of decode_pipelined.cu): each event's SM cycle relative to the start of its pair (WG0's
event 0), per pair, and the mean over the steady pairs (all but the first and last)."""
import sys
from collections import defaultdict

EVENTS = {
    0: ["pair start", "M0 published", "P0 packed, O_L rescaled", "PV(P0) retired",
        "S1 seen", "V1_L landed", "PV(P1) retired", "P1Free + refill issued", "QK^T(b+2) done",
        "row max done", "exps done"],
    1: ["pair start", "S0 seen", "S1 published", "V0_R landed", "P0Ready seen", "PVs retired",
        "QK^T(b+3) issue", "QK^T(b+3) done", "PV(P1) issued", "row max done (M0 read)",
        "exps done", "P1 stored, fenced"],
}


def main(path):
    stamps = defaultdict(dict)
    for line in open(path):
        parts = line.split()
        if len(parts) == 5 and parts[0] == "JFM_TRACE":
            wg, pair, ev, clk = map(int, parts[1:])
            stamps[(wg, pair)][ev] = clk
    pairs = sorted({p for (_, p) in stamps})
    if not pairs:
        print(f"{path}: no stamps")
        return
    steady = pairs[1:-1] or pairs
    print(f"{path}: cycles from WG0's pair start; mean over pairs {steady[0]}..{steady[-1]}")
    for wg in (0, 1):
        for ev, name in enumerate(EVENTS[wg]):
            rel = []
            for p in pairs:
                base = stamps[(0, p)].get(0)
                clk = stamps[(wg, p)].get(ev)
                # %clock wraps at 2^32; an event may precede WG0's pair start (negative).
                rel.append(None if base is None or clk is None
                           else (clk - base + (1 << 31)) % (1 << 32) - (1 << 31))
            vals = [r for p, r in zip(pairs, rel) if p in steady and r is not None]
            mean = sum(vals) / len(vals) if vals else float("nan")
            cells = " ".join(f"{r:6d}" if r is not None else "     -" for r in rel)
            # (stamps of events a pair did not reach are left-over shared memory)
            print(f"WG{wg} {ev} {name:26s} mean {mean:7.0f} | {cells}")
    starts = [stamps[(0, p)].get(0) for p in pairs]
    gaps = [(b - a) % (1 << 32) for a, b in zip(starts, starts[1:]) if a is not None and b is not None]
    if gaps:
        print(f"pair length (WG0 start to start): {' '.join(str(g) for g in gaps)}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        main(arg)
