"""Sharded decode on 4 fake CPU devices; run as a script by tests/test_sharding_cpu.py.

XLA reads the device-count flag when the backend starts, i.e. on the first ``import jax`` of a
process, so this has to run in a fresh interpreter. Prints one JSON object with the checks.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax_flashmla as fm  # noqa: E402
from jax_flashmla.kv_cache import PageAllocator, read_tokens  # noqa: E402
from jax_flashmla.sharding import (data_parallel_decode, data_parallel_write_tokens,  # noqa: E402
                                   head_parallel_decode, sharded_decode)

SCALE = 192 ** -0.5
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute|"
                        r"collective-broadcast)(-start)?\(")

N_SHARDS, B_LOCAL, PAGES_LOCAL, MAX_BLOCKS, H_Q = 4, 2, 6, 5, 16


def collectives(compiled_text):
    return sorted({m.group(1) for m in COLLECTIVE.finditer(compiled_text)})


def problem(seed=0):
    """Per-shard allocators over local pools; returns local and equivalent global tables."""
    rng = np.random.default_rng(seed)
    tables, seqlens = [], []
    for shard in range(N_SHARDS):
        alloc = PageAllocator(PAGES_LOCAL)
        alloc.allocate("filler", int(rng.integers(1, 64)))   # non-identity local ids
        lens = rng.integers(1, 2 * 64 + 1, size=B_LOCAL)
        for r, n in enumerate(lens):
            alloc.allocate(r, int(n))
        alloc.free("filler")
        tables.append(alloc.block_table(range(B_LOCAL), MAX_BLOCKS))
        seqlens.append(alloc.cache_seqlens(range(B_LOCAL)))
    local = np.concatenate(tables)
    owner = np.repeat(np.arange(N_SHARDS), B_LOCAL)[:, None]
    global_ids = np.where(local >= 0, local + owner * PAGES_LOCAL, -1).astype(np.int32)
    cache = rng.standard_normal((N_SHARDS * PAGES_LOCAL, 64, 1, 576)).astype(np.float32)
    q = rng.standard_normal((N_SHARDS * B_LOCAL, 1, H_Q, 576)).astype(np.float32)
    return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(cache, jnp.bfloat16),
            jnp.asarray(local), jnp.asarray(global_ids),
            jnp.asarray(np.concatenate(seqlens).astype(np.int32)))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def main():
    res = {"devices": jax.device_count()}
    q, cache, bt_local, bt_global, sl = problem()
    ref_out, ref_lse = jax.jit(functools.partial(
        fm.flash_mla_with_kvcache, head_dim_v=512, softmax_scale=SCALE))(
            q, cache, block_table=bt_global, cache_seqlens=sl)

    # -- data parallel ---------------------------------------------------------------------------
    mesh = jax.make_mesh((N_SHARDS,), ("data",))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(q, P("data")), put(cache, P("data")), put(bt_local, P("data")),
            put(sl, P("data")))
    dp = jax.jit(functools.partial(data_parallel_decode, mesh=mesh, axis_name="data",
                                   softmax_scale=SCALE))
    out, lse = dp(*args)
    res["dp_out_diff"] = max_diff(out, ref_out)
    res["dp_lse_diff"] = max_diff(lse, ref_lse)
    res["dp_out_sharding"] = str(out.sharding.spec)
    res["dp_collectives"] = collectives(dp.lower(*args).compile().as_text())
    # The same under an Auto mesh (jax.make_mesh defaults to Explicit axes).
    mesh_a = jax.make_mesh((N_SHARDS,), ("data",), axis_types=(AxisType.Auto,))
    put_a = lambda x, spec: jax.device_put(x, NamedSharding(mesh_a, spec))  # noqa: E731
    args_a = (put_a(q, P("data")), put_a(cache, P("data")), put_a(bt_local, P("data")),
              put_a(sl, P("data")))
    dp_a = jax.jit(functools.partial(data_parallel_decode, mesh=mesh_a, axis_name="data",
                                     softmax_scale=SCALE))
    res["dp_auto_out_diff"] = max_diff(dp_a(*args_a)[0], ref_out)
    res["dp_auto_collectives"] = collectives(dp_a.lower(*args_a).compile().as_text())
    # For contrast: the bare op on the same sharded operands (global ids), Auto mesh: XLA has no
    # rule to split it, so it gathers operands.
    bare = jax.jit(functools.partial(fm.flash_mla_with_kvcache, head_dim_v=512,
                                     softmax_scale=SCALE))
    bare_args = (args_a[0], args_a[1], put_a(bt_global, P("data")), args_a[3])
    res["bare_collectives"] = collectives(bare.lower(*bare_args).compile().as_text())
    # The bare op (metadata computed inside) on operands sharded over an Explicit mesh axis: the
    # primitives take them whole, with or without a mesh context.
    bare_args_x = (args[0], args[1], put(bt_global, P("data")), args[3])
    out, lse = bare(*bare_args_x)
    res["bare_explicit_out_diff"] = max_diff(out, ref_out)
    res["bare_explicit_lse_diff"] = max_diff(lse, ref_lse)
    with jax.set_mesh(mesh):
        out, lse = bare(*bare_args_x)
    res["bare_explicit_ctx_out_diff"] = max_diff(out, ref_out)
    res["bare_explicit_ctx_lse_diff"] = max_diff(lse, ref_lse)

    # -- head parallel ---------------------------------------------------------------------------
    mesh_h = jax.make_mesh((N_SHARDS,), ("model",))
    put_h = lambda x, spec: jax.device_put(x, NamedSharding(mesh_h, spec))  # noqa: E731
    args_h = (put_h(q, P(None, None, "model", None)), put_h(cache, P()), put_h(bt_global, P()),
              put_h(sl, P()))
    tp = jax.jit(functools.partial(head_parallel_decode, mesh=mesh_h, axis_name="model",
                                   softmax_scale=SCALE))
    out, lse = tp(*args_h)
    res["tp_out_diff"] = max_diff(out, ref_out)
    res["tp_lse_diff"] = max_diff(lse, ref_lse)
    res["tp_out_sharding"] = str(out.sharding.spec)
    res["tp_collectives"] = collectives(tp.lower(*args_h).compile().as_text())

    # -- both: 2 x 2 -----------------------------------------------------------------------------
    # Shard-local ids for 2 data shards: each holds 2 of the 4 pools above.
    mesh2 = jax.make_mesh((2, 2), ("data", "model"))
    per = (N_SHARDS // 2) * PAGES_LOCAL
    owner2 = np.repeat(np.arange(2), 2 * B_LOCAL)[:, None]
    bt2 = np.where(np.asarray(bt_global) >= 0, np.asarray(bt_global) - owner2 * per, -1)
    put2 = lambda x, spec: jax.device_put(x, NamedSharding(mesh2, spec))  # noqa: E731
    args2 = (put2(q, P("data", None, "model", None)), put2(cache, P("data")),
             put2(jnp.asarray(bt2, jnp.int32), P("data")), put2(sl, P("data")))
    both = jax.jit(functools.partial(sharded_decode, mesh=mesh2, batch_axis="data",
                                     head_axis="model", softmax_scale=SCALE))
    out, lse = both(*args2)
    res["2d_out_diff"] = max_diff(out, ref_out)
    res["2d_lse_diff"] = max_diff(lse, ref_lse)
    res["2d_collectives"] = collectives(both.lower(*args2).compile().as_text())

    # -- data-parallel cache write, donated --------------------------------------------------------
    rng = np.random.default_rng(1)
    n = N_SHARDS * B_LOCAL
    lat = jnp.asarray(rng.standard_normal((n, 512)), jnp.float32)
    rope = jnp.asarray(rng.standard_normal((n, 64)), jnp.float32)
    local_slots = np.tile(np.array([5, 64 * (PAGES_LOCAL - 1) + 63], np.int32), N_SHARDS)
    write = jax.jit(functools.partial(data_parallel_write_tokens, mesh=mesh, axis_name="data"),
                    donate_argnums=(0,))
    wargs = (put(cache, P("data")), put(lat, P("data")), put(rope, P("data")),
             put(jnp.asarray(local_slots), P("data")))
    res["write_collectives"] = collectives(write.lower(*wargs).compile().as_text())
    before = [s.data.unsafe_buffer_pointer() for s in wargs[0].addressable_shards]
    new = write(*wargs)
    res["write_in_place"] = before == [s.data.unsafe_buffer_pointer()
                                       for s in new.addressable_shards]
    owner_t = np.repeat(np.arange(N_SHARDS), B_LOCAL)
    global_slots = local_slots + owner_t * PAGES_LOCAL * 64
    got = np.asarray(read_tokens(jax.device_get(new), global_slots), np.float32)
    want = np.asarray(jnp.concatenate([lat, rope], -1).astype(jnp.bfloat16), np.float32)
    res["write_diff"] = float(np.max(np.abs(got - want)))

    print(json.dumps(res))


if __name__ == "__main__":
    main()
