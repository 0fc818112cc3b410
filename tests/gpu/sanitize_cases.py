"""A representative subset of decode cases for `compute-sanitizer --tool memcheck`.

Zero lengths, invalid block ids past the end, NaN-poisoned pages, h_q = 1 and 128, s_q = 4 causal,
heavy splitting (b = 1) and h_kv > 1, in bf16 and fp16. Prints SANITIZE_OK if every output is free
of NaN; memcheck itself reports any out-of-bounds or misaligned access.
Run with XLA_PYTHON_CLIENT_ALLOCATOR=platform so that each XLA buffer is its own allocation
(otherwise an overrun into a neighbouring buffer of XLA's pool is invisible to memcheck).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_flashmla as fm  # noqa: E402
from gpu_cases import make_merged  # noqa: E402

CASES = [
    # (subcases, s_q, h_q, h_kv, causal, dtype)
    ([(1, 4096, False, 0.0)], 1, 128, 1, False, jnp.bfloat16),
    ([(8, 300, True, 0.5)], 4, 128, 1, True, jnp.bfloat16),
    ([(8, 300, True, 0.5)], 4, 1, 1, True, jnp.float16),
    ([(6, 140, True, 0.3), (2, 20, False, 0.0)], 2, 64, 8, True, jnp.float16),
    ([(16, 1000, True, 0.5)], 2, 63, 3, False, jnp.bfloat16),
    # ~8 short requests per part (some empty): the pipelined kernel's per-request epilogue.
    ([(256, 150, True, 0.3)], 2, 128, 1, True, jnp.bfloat16),
]


def main():
    only = {int(a) for a in sys.argv[1:]}  # optional case numbers
    for i, (sub, s_q, h_q, h_kv, causal, dtype) in enumerate(CASES):
        if only and i not in only:
            continue
        q, kc, bt, sl = make_merged(100 + i, sub, s_q, h_q, h_kv, dtype)
        md, ns = fm.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
        out, lse = fm.flash_mla_with_kvcache(q, kc, bt, sl, 512, md, ns, causal=causal)
        jax.block_until_ready((out, lse))
        assert not bool(jnp.any(jnp.isnan(out))), f"case {i}: NaN in out"
        assert not bool(jnp.any(jnp.isnan(lse))), f"case {i}: NaN in lse"
        print(f"case {i} ok: b={q.shape[0]} s_q={s_q} h_q={h_q} h_kv={h_kv} causal={causal}")
    print("SANITIZE_OK")


if __name__ == "__main__":
    main()
