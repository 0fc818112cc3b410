"""Runs a small jitted decode step several times with changing seqlens and saves the outputs.

Used by test_decode_gpu.py::test_command_buffers_on_and_off_agree, once with XLA command buffers
forced on (--xla_gpu_graph_min_graph_size=1) and once with them off; the outputs must be equal.
With --time it also prints the step time (used by run.sh to report graphs on vs off).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_flashmla as fm  # noqa: E402
from gpu_cases import make_merged  # noqa: E402


def main(out_path: str, batch: int = 8, s_k: int = 2000, time_it: bool = False, h_q: int = 128):
    # h_q = 128: the pipelined kernel; h_q = 8 (16 query rows): the narrow kernel.
    q, kc, bt, sl = make_merged(21, [(batch, s_k, True, 0.0)], 2, h_q, 1, jnp.bfloat16)

    @jax.jit
    def step(q, kc, bt, sl):
        md, ns = fm.get_mla_metadata(sl, 2 * h_q, 1)  # shared by the two "layers"
        o1, l1 = fm.flash_mla_with_kvcache(q, kc, bt, sl, 512, md, ns, causal=True)
        o2, l2 = fm.flash_mla_with_kvcache(o1[..., :1].astype(q.dtype) + q, kc, bt, sl, 512, md,
                                           ns, causal=True)
        return o2, l1 + l2

    results = {}
    # Lengths only shrink, so every key read stays inside the valid (non-NaN) tokens.
    for i, cut in enumerate((0, 100, 1000)):
        out, lse = step(q, kc, bt, jnp.maximum(sl - cut, 0))
        results[f"out{i}"] = np.asarray(out.astype(jnp.float32))
        results[f"lse{i}"] = np.asarray(lse)
    np.savez(out_path, **results)
    if time_it:
        args = (q, kc, bt, sl)
        jax.block_until_ready(step(*args))
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            r = step(*args)
        jax.block_until_ready(r)
        print(f"STEP_TIME_US b={batch} {1e6 * (time.perf_counter() - t0) / n:.1f}")


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[2:] if a.isdigit()]  # optional: batch, s_k
    heads = [int(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("--h_q=")]
    main(sys.argv[1], *sizes, time_it="--time" in sys.argv, h_q=heads[-1] if heads else 128)
