"""Two-GPU check of the shard_map decode wrappers with the real CUDA kernels (nvidia-h200-x2).

    python3 tests/gpu/multi_gpu_check.py            # from the repo root; about a minute

It prints each GPU (device kind, SM count, compute capability), then one line per check:

- every GPU runs the kernels on its own: the first decode on GPU 1 comes after one on GPU 0
  (per-device kernel attributes), and GPU 1 gives the same bits as GPU 0 for the same problem;
- the unsharded single-GPU call agrees with the float32 reference;
- data-parallel (requests + pages split) and head-parallel (query heads split) decode through
  :mod:`jax_flashmla.sharding` on a 2-device mesh: each shard is bit-identical to a single-GPU call
  on that shard's own problem, and the assembled result is compared with the unsharded call
  (reported as bitwise, or within FlashMLA's bf16 tolerance: the split-KV schedule depends on the
  local batch and head count, so the summation order may differ);
- the compiled sharded steps contain our kernels and no collective;
- the metadata computed inside the shard_map body uses the GPU's SM count and equals the host
  scheduler on every GPU.

The last line is ``MULTI_GPU_OK`` or ``MULTI_GPU_FAIL: <reasons>`` (exit status 0 / 1).

On CPU (``XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu``) the same
plumbing runs through the pure-JAX reference and the CUDA-only checks print a SKIP note.
"""

from __future__ import annotations

import os

# We use no collective, but never let NCCL try NVLink multicast on the shared host.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import functools  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
# Source tree first (as `python -m pytest` from the root sees it; the compiled extension is a
# separate top-level module), tests/ for the shared test data and tolerances.
sys.path[:0] = [os.path.dirname(os.path.dirname(_HERE)), os.path.dirname(_HERE)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_flashmla as fm  # noqa: E402
from jax_flashmla._device import resolve_num_sms  # noqa: E402
from jax_flashmla.kv_cache import PageAllocator  # noqa: E402
from jax_flashmla.sharding import data_parallel_decode, head_parallel_decode  # noqa: E402
from mla_testdata import LSE_TOL, OUT_TOL, check_close  # noqa: E402

N = 2
B_LOCAL, H_Q, S_Q, CAUSAL = 8, 128, 2, True        # MTP-style: 2 query tokens, causal
SCALE = fm.deepseek_softmax_scale(mscale=fm.yarn_mscale(40.0))
MAX_BLOCKS = 64                                     # up to 4096 tokens per request
DECODE_TARGET = "jax_flashmla_decode_v1"
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute|"
                        r"collective-broadcast)(-start)?\(")

failures: list[str] = []


def report(status: str, name: str, detail: str = "") -> None:
    print(f"{status:4} {name}{': ' + detail if detail else ''}", flush=True)
    if status == "FAIL":
        failures.append(f"{name}: {detail}" if detail else name)


def check(name):
    """Runs a check function, turning an exception into a FAIL line (the others still run)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                detail = fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - report and go on
                traceback.print_exc()
                report("FAIL", name, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                return None
            report("PASS", name, f"{detail} ({time.perf_counter() - t0:.1f}s)")
            return True
        return run
    return wrap


# ------------------------------------------------------------------------------------------------
# Problem: per-shard allocators over local pools (as a DP server has), plus its global view
# ------------------------------------------------------------------------------------------------
def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    tables, seqlens, pools = [], [], []
    for _ in range(N):
        lens = rng.integers(1, MAX_BLOCKS * 64 + 1, size=B_LOCAL)
        lens[:3] = (1, 64, 65)                           # page edges and a one-token request
        pages = int(sum(-(-int(n) // 64) for n in lens)) + 4
        alloc = PageAllocator(pages)
        alloc.allocate("filler", 3 * 64)                 # non-identity local page ids
        for r, n in enumerate(lens):
            alloc.allocate(r, int(n))
        alloc.free("filler")
        tables.append(alloc.block_table(range(B_LOCAL), MAX_BLOCKS))
        seqlens.append(alloc.cache_seqlens(range(B_LOCAL)))
        pools.append(pages)
    # Equal local pools (the page axis is split evenly): pad to the largest.
    pages_local = max(pools)
    local = np.concatenate(tables)
    owner = np.repeat(np.arange(N), B_LOCAL)[:, None]
    global_ids = np.where(local >= 0, local + owner * pages_local, -1).astype(np.int32)
    cache = (rng.standard_normal((N * pages_local, 64, 1, 576), np.float32) / 4)
    q = rng.standard_normal((N * B_LOCAL, S_Q, H_Q, 576), np.float32) / 4
    return dict(q=jnp.asarray(q, jnp.bfloat16), cache=jnp.asarray(cache, jnp.bfloat16),
                bt_local=jnp.asarray(local), bt_global=jnp.asarray(global_ids),
                sl=jnp.asarray(np.concatenate(seqlens).astype(np.int32)), pages_local=pages_local)


@functools.partial(jax.jit, static_argnames=("num_sms",))
def decode(q, cache, bt, sl, num_sms=None):
    h_q = q.shape[2]
    md, ns = fm.get_mla_metadata(sl, S_Q * h_q, 1, num_sms=num_sms)
    return fm.flash_mla_with_kvcache(q, cache, bt, sl, 512, md, ns, softmax_scale=SCALE,
                                     causal=CAUSAL, num_sms=num_sms)


def on(device, *xs):
    return [jax.device_put(x, device) for x in xs]


def bits(x) -> bytes:
    return np.asarray(x).tobytes()


def max_diff(a, b) -> float:
    """Largest |a - b|, counting equal entries (matching +inf lse of empty rows) as 0."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.where(a == b, 0.0, np.abs(a - b))))


def collectives(text: str) -> list[str]:
    return sorted({m.group(1) for m in COLLECTIVE.finditer(text)})


def local_problem(pr, shard):
    """Shard ``shard``'s requests, its pool and its shard-local block table."""
    rows = slice(shard * B_LOCAL, (shard + 1) * B_LOCAL)
    pages = slice(shard * pr["pages_local"], (shard + 1) * pr["pages_local"])
    return pr["q"][rows], pr["cache"][pages], pr["bt_local"][rows], pr["sl"][rows]


# ------------------------------------------------------------------------------------------------
def main() -> int:
    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    devs = jax.devices()
    print(f"jax {jax.__version__}, backend {backend}, {len(devs)} device(s), "
          f"jax_flashmla build: {fm.build_info()}")
    for d in devs:
        print(f"  device {d.id}: kind={d.device_kind!r} core_count={getattr(d, 'core_count', None)}"
              f" compute_capability={getattr(d, 'compute_capability', None)}")
    if len(devs) < N:
        report("FAIL", "devices", f"need {N} devices, found {len(devs)} (on CPU set XLA_FLAGS="
                                  f"--xla_force_host_platform_device_count={N})")
        return finish()
    devs = devs[:N]
    if on_gpu:
        ccs = [getattr(d, "compute_capability", None) for d in devs]
        if any(cc != "9.0" for cc in ccs) or not fm.is_built_with_cuda():
            report("FAIL", "hopper", f"needs sm_90 GPUs and the CUDA extension: cc={ccs}, "
                                     f"build={fm.build_info()}")
            return finish()
    else:
        print("NOTE: not on GPUs: the decode runs through the pure-JAX reference; CUDA-only "
              "checks (kernels in the HLO, SM counts, compute capability) are skipped.")

    pr = make_problem()
    print(f"problem: b={N * B_LOCAL} ({B_LOCAL} per shard), s_q={S_Q}, h_q={H_Q}, causal={CAUSAL}, "
          f"seqlens {np.asarray(pr['sl']).tolist()}, pool {N} x {pr['pages_local']} pages")
    res: dict = {}

    @check("unsharded call on device 0 vs float32 reference")
    def unsharded():
        args = on(devs[0], pr["q"], pr["cache"], pr["bt_global"], pr["sl"])
        res["ref"] = jax.block_until_ready(decode(*args))
        want_out, want_lse = jax.jit(functools.partial(
            fm.mla_decode_reference, head_dim_v=512, softmax_scale=SCALE, causal=CAUSAL))(*args)
        check_close(res["ref"][0], want_out, name="out", **OUT_TOL)
        check_close(res["ref"][1], want_lse, name="lse", **LSE_TOL)
        hlo = decode.lower(*args).compile().as_text()
        if on_gpu and DECODE_TARGET not in hlo:
            raise AssertionError("the compiled single-GPU step does not call our kernel")
        return "within FlashMLA's tolerances"

    @check("each device runs the kernels on its own (device 1 after device 0, same bits)")
    def per_device():
        # Shard 1's problem: first on device 1 (its first kernel launch), then on device 0.
        res["local"] = {}
        for shard in (0, 1):
            res["local"][shard, 1] = jax.block_until_ready(
                decode(*on(devs[1], *local_problem(pr, shard))))
            res["local"][shard, 0] = jax.block_until_ready(
                decode(*on(devs[0], *local_problem(pr, shard))))
            for k, name in enumerate(("out", "lse")):
                a, b = res["local"][shard, 1][k], res["local"][shard, 0][k]
                if bits(a) != bits(b):
                    raise AssertionError(f"shard {shard} problem: {name} on device 1 differs from "
                                         f"device 0 (max diff {max_diff(a, b)})")
        return "bitwise equal on both devices"

    def compare_to_unsharded(name, out, lse):
        ref_out, ref_lse = res["ref"]
        if bits(out) == bits(ref_out) and bits(lse) == bits(ref_lse):
            return f"{name} == unsharded: bitwise"
        check_close(out, ref_out, name=f"{name} out", **OUT_TOL)
        check_close(lse, ref_lse, name=f"{name} lse", **LSE_TOL)
        return (f"{name} == unsharded within bf16 tolerance, not bitwise (max |diff| out "
                f"{max_diff(out, ref_out):.2e}, lse {max_diff(lse, ref_lse):.2e})")

    def hlo_checks(name, text):
        found = collectives(text)
        if found:
            raise AssertionError(f"{name}: collectives in the compiled HLO: {found}")
        if on_gpu and DECODE_TARGET not in text:
            raise AssertionError(f"{name}: the compiled step does not call our kernel")
        return "no collectives" + (", calls our kernel" if on_gpu else "")

    @check("data parallel (requests + pages over 2 devices)")
    def data_parallel():
        mesh = jax.make_mesh((N,), ("data",), devices=devs)
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
        args = [put(x) for x in (pr["q"], pr["cache"], pr["bt_local"], pr["sl"])]
        step = jax.jit(functools.partial(data_parallel_decode, mesh=mesh, axis_name="data",
                                         softmax_scale=SCALE, causal=CAUSAL))
        out, lse = jax.block_until_ready(step(*args))
        again = step(*args)
        if bits(again[0]) != bits(out):
            raise AssertionError("two runs of the same sharded step differ")
        # Each shard computed exactly its own single-GPU problem (same local batch, same SMs).
        by_device = {s.device: s for s in out.addressable_shards}
        for shard in range(N):
            got = by_device[devs[shard]]
            rows = slice(shard * B_LOCAL, (shard + 1) * B_LOCAL)
            if got.index[0] != rows or bits(got.data) != bits(res["local"][shard, shard][0]):
                raise AssertionError(f"shard {shard} differs from the single-GPU call on its "
                                     f"own requests")
            if bits(np.asarray(lse)[rows]) != bits(res["local"][shard, shard][1]):
                raise AssertionError(f"shard {shard} lse differs from its single-GPU call")
        detail = compare_to_unsharded("DP", out, lse)
        return f"shards bitwise == per-GPU calls; {detail}; " + hlo_checks(
            "DP", step.lower(*args).compile().as_text())

    @check("head parallel (query heads over 2 devices, cache replicated)")
    def head_parallel():
        mesh = jax.make_mesh((N,), ("model",), devices=devs)
        put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
        args = [put(pr["q"], P(None, None, "model", None)), put(pr["cache"], P()),
                put(pr["bt_global"], P()), put(pr["sl"], P())]
        step = jax.jit(functools.partial(head_parallel_decode, mesh=mesh, axis_name="model",
                                         softmax_scale=SCALE, causal=CAUSAL))
        out, lse = jax.block_until_ready(step(*args))
        h = H_Q // N
        for shard in range(N):
            heads = slice(shard * h, (shard + 1) * h)
            want = decode(*on(devs[shard], pr["q"][:, :, heads], pr["cache"], pr["bt_global"],
                              pr["sl"]))
            if bits(np.asarray(out)[:, :, heads]) != bits(want[0]) or \
                    bits(np.asarray(lse)[:, heads]) != bits(want[1]):
                raise AssertionError(f"head shard {shard} differs from the single-GPU call on "
                                     f"its heads")
        detail = compare_to_unsharded("TP", out, lse)
        return f"shards bitwise == per-GPU calls; {detail}; " + hlo_checks(
            "TP", step.lower(*args).compile().as_text())

    @check("metadata inside shard_map uses the GPU's SM count and matches the host scheduler")
    def metadata_in_body():
        mesh = jax.make_mesh((N,), ("data",), devices=devs)
        seen = []

        def body(sl):
            am = jax.sharding.get_abstract_mesh()
            seen.append((resolve_num_sms(None), getattr(am.abstract_device, "num_cores", None)))
            md, ns = fm.get_mla_metadata(sl, S_Q * H_Q, 1)
            return md[None], ns[None]

        probe = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"),
                                      out_specs=(P("data"), P("data")), check_vma=False))
        md, ns = probe(jax.device_put(pr["sl"], NamedSharding(mesh, P("data"))))
        resolved, mesh_cores = seen[0]
        cores = [getattr(d, "core_count", None) for d in devs]
        source = "the mesh's device" if mesh_cores else "fallback (no core count on the mesh)"
        if on_gpu:
            if any(c != resolved for c in cores):
                raise AssertionError(f"resolved {resolved} SMs, devices have {cores}")
        else:
            print(f"SKIP SM count == GPU core_count (CPU devices have none): resolved {resolved}")
        parts = fm.num_sm_parts(resolved, S_Q * H_Q, 1)
        for shard in range(N):
            sl_local = np.asarray(pr["sl"])[shard * B_LOCAL:(shard + 1) * B_LOCAL]
            want_md, want_ns = fm.schedule_numpy(sl_local, parts)
            np.testing.assert_array_equal(np.asarray(md)[shard], want_md)
            np.testing.assert_array_equal(np.asarray(ns)[shard], want_ns)
        return (f"{resolved} SMs (from {source}), device core counts {cores}; {parts} parts; "
                f"metadata == host scheduler on both devices")

    unsharded()
    if "ref" in res:               # the others compare against it
        per_device()
        data_parallel()
        head_parallel()
    metadata_in_body()
    return finish()


def finish() -> int:
    if failures:
        print("MULTI_GPU_FAIL: " + "; ".join(failures), flush=True)
        return 1
    note = "" if jax.default_backend() == "gpu" else " (CPU dry run: CUDA checks skipped)"
    print("MULTI_GPU_OK" + note, flush=True)
    return 0


if __name__ == "__main__":
    t_start = time.perf_counter()
    rc = main()
    print(f"total {time.perf_counter() - t_start:.1f}s", file=sys.stderr)
    sys.exit(rc)
