"""A few FP8 KV-cache decode cases for `compute-sanitizer --tool memcheck` (issue 5).

Both layouts; zero lengths and lengths 1 / 63 / 64 / 65, invalid block ids past the end, NaN-free
garbage in every unreadable slot, h_q = 1 / 64 / 128, s_q = 4 causal, heavy splitting (b = 1),
per-tensor with h_kv = 2 (a token's 576 bytes are then not contiguous with the next token's).
Prints SANITIZE_OK if every output is free of NaN; memcheck itself reports any out-of-bounds or
misaligned access. Run with XLA_PYTHON_CLIENT_ALLOCATOR=platform (see sanitize_cases.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from test_fp8_gpu import KV_SCALE, decode_fp8, make_fp8_merged, make_q  # noqa: E402

EDGES = tuple((1, n, False, 0.0) for n in (0, 1, 63, 64, 65))
CASES = [
    # (layout, subcases, s_q, h_q, h_kv, causal)
    ("fp8_with_scale", ((1, 4096, False, 0.0),), 1, 128, 1, False),
    ("fp8_with_scale", ((8, 300, True, 0.5),) + EDGES, 4, 64, 1, True),
    ("fp8_with_scale", EDGES, 2, 1, 1, True),
    ("fp8_per_tensor", ((6, 140, True, 0.3), (2, 20, False, 0.0)) + EDGES, 2, 32, 2, True),
    ("fp8_per_tensor", ((16, 1000, True, 0.5),), 1, 128, 1, False),
    # 16 rows: the narrow kernel's two consumer warpgroups (odd and even page counts, splits)
    ("fp8_with_scale", ((2, 5000, True, 0.5),) + EDGES, 1, 16, 1, True),
    ("fp8_per_tensor", ((4, 700, True, 0.5),) + EDGES, 2, 8, 1, True),
]


def main():
    only = {int(a) for a in sys.argv[1:]}  # optional case numbers
    for i, (layout, sub, s_q, h_q, h_kv, causal) in enumerate(CASES):
        if only and i not in only:
            continue
        cache, _, bt, sl = make_fp8_merged(200 + i, sub, s_q, h_kv, layout)
        q = make_q(300 + i, sl.shape[0], s_q, h_q)
        out, lse = decode_fp8(q, cache, bt, sl, jnp.float32(KV_SCALE), causal, layout)
        jax.block_until_ready((out, lse))
        assert not bool(jnp.any(jnp.isnan(out))), f"case {i}: NaN in out"
        assert not bool(jnp.any(jnp.isnan(lse))), f"case {i}: NaN in lse"
        print(f"case {i} ok: {layout} b={q.shape[0]} s_q={s_q} h_q={h_q} h_kv={h_kv} "
              f"causal={causal}")
    print("SANITIZE_OK")


if __name__ == "__main__":
    main()
