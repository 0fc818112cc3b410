"""The two JAX primitives: scheduler metadata and split-KV decode.

This is the only module that touches ``jax.extend`` and ``jax.interpreters.mlir``. Each primitive
has an abstract-eval shape rule (which also validates), a CUDA lowering to our XLA FFI target, a
CPU lowering through pure JAX, and a vmap rule.

The decode primitive returns the split-KV workspace (``o_accum``, ``lse_accum``) as extra outputs
so that XLA plans all memory; the public function drops them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir, xla

from . import _checks, _ffi, fp8
from .reference import mla_decode_reference
from .scheduler import METADATA_ROW, schedule_jax

_NOT_MAPPED = None  # batching rules mark an unmapped operand/result with None


def _whole(x):
    """``x`` replicated if it is sharded over Explicit mesh axes, else ``x`` unchanged.

    Neither primitive has a partitioning rule: the schedule needs every request, and a decode
    split over devices is what :mod:`jax_flashmla.sharding` does with ``shard_map``. Under Auto
    axes XLA gathers such operands by itself; under Explicit axes JAX leaves it to the op, and the
    CPU lowering would otherwise mix sharded and replicated arrays.
    """
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return x
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        return x
    axis_type = dict(zip(mesh.axis_names, mesh.axis_types))
    names = [n for entry in spec if entry is not None
             for n in (entry if isinstance(entry, tuple) else (entry,))]
    if not any(axis_type.get(n) == jax.sharding.AxisType.Explicit for n in names):
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
metadata_p = Primitive("jax_flashmla_metadata")
metadata_p.multiple_results = True
metadata_p.def_impl(functools.partial(xla.apply_primitive, metadata_p))


def _metadata_abstract_eval(cache_seqlens, *, num_sm_parts):
    b = _checks.check_seqlens(cache_seqlens)
    return (jax.core.ShapedArray((num_sm_parts, METADATA_ROW), jnp.int32),
            jax.core.ShapedArray((b + 1,), jnp.int32))


metadata_p.def_abstract_eval(_metadata_abstract_eval)


def _metadata_cpu(cache_seqlens, *, num_sm_parts):
    return schedule_jax(cache_seqlens, num_sm_parts)


def _metadata_cuda_lowering(ctx, cache_seqlens, *, num_sm_parts):
    _ffi.ensure_registered()
    return jax.ffi.ffi_lowering(_ffi.METADATA_TARGET)(
        ctx, cache_seqlens, num_sm_parts=np.int64(num_sm_parts))


mlir.register_lowering(metadata_p, mlir.lower_fun(_metadata_cpu, multiple_results=True),
                       platform="cpu")
mlir.register_lowering(metadata_p, _metadata_cuda_lowering, platform="cuda")


def _metadata_batch(args, dims, *, num_sm_parts):
    # Each vmapped element has its own batch of requests: compute one schedule per element.
    (seqlens,), (dim,) = args, dims
    seqlens = jnp.moveaxis(seqlens, dim, 0)
    md, ns = jax.lax.map(lambda s: metadata_p.bind(s, num_sm_parts=num_sm_parts), seqlens)
    return (md, ns), (0, 0)


batching.primitive_batchers[metadata_p] = _metadata_batch


def bind_metadata(cache_seqlens, num_sm_parts: int):
    md, ns = metadata_p.bind(_whole(cache_seqlens), num_sm_parts=int(num_sm_parts))
    return md, ns


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------
decode_p = Primitive("jax_flashmla_decode")
decode_p.multiple_results = True
decode_p.def_impl(functools.partial(xla.apply_primitive, decode_p))


def workspace_shapes(b, h_kv, q_seq_per_hk, num_sm_parts, head_dim_v):
    """Split-KV partials: one slot per piece; at most b + num_sm_parts - 1 pieces exist."""
    slots = b + num_sm_parts
    return (slots, h_kv, q_seq_per_hk, head_dim_v), (slots, h_kv, q_seq_per_hk)


def _decode_abstract_eval(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *extra,
                          softmax_scale, causal, head_dim_v, layout="dense"):
    s = _checks.check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_md,
                             num_splits, softmax_scale, layout)
    if layout == "fp8_per_tensor":
        (kv_scale,) = extra
        if tuple(kv_scale.shape) != () or np.dtype(kv_scale.dtype) != np.float32:
            raise TypeError("kv_scale must be a float32 scalar, got "
                            f"{np.dtype(kv_scale.dtype).name}{list(kv_scale.shape)}")
    o_ws, lse_ws = workspace_shapes(s["b"], s["h_kv"], s["q_seq_per_hk"], s["num_sm_parts"],
                                    int(head_dim_v))
    return (jax.core.ShapedArray((s["b"], s["s_q"], s["h_q"], int(head_dim_v)), q.dtype),
            jax.core.ShapedArray((s["b"], s["h_q"], s["s_q"]), jnp.float32),
            jax.core.ShapedArray(o_ws, jnp.float32),
            jax.core.ShapedArray(lse_ws, jnp.float32))


decode_p.def_abstract_eval(_decode_abstract_eval)


def _dequantized_cache(k_cache, extra, layout):
    """The cache in float32, as the reference (and the FP8 tests) see it."""
    if layout == "fp8_with_scale":
        return fp8.dequantize_fp8_with_scale(k_cache, jnp.float32)
    if layout == "fp8_per_tensor":
        return fp8.dequantize_fp8_per_tensor(k_cache, extra[0], jnp.float32)
    return k_cache


def _decode_cpu_lowering(ctx, *args, softmax_scale, causal, head_dim_v, layout="dense"):
    # Workspace outputs are never read on CPU; zeros keep the output signature.
    _, _, o_aval, lse_aval = ctx.avals_out

    def fn(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *extra):
        del tile_md, num_splits  # the reference needs no schedule
        kv = _dequantized_cache(k_cache, extra, layout)
        out, lse = mla_decode_reference(q, kv, block_table, cache_seqlens, int(head_dim_v),
                                        float(softmax_scale), bool(causal))
        return (out, lse, jnp.zeros(o_aval.shape, jnp.float32),
                jnp.zeros(lse_aval.shape, jnp.float32))

    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _decode_cuda_lowering(ctx, *args, softmax_scale, causal, head_dim_v):
    _ffi.ensure_registered()
    return jax.ffi.ffi_lowering(_ffi.DECODE_TARGET)(
        ctx, *args, softmax_scale=np.float32(softmax_scale), causal=bool(causal),
        head_dim_v=np.int64(head_dim_v))


mlir.register_lowering(decode_p, _decode_cpu_lowering, platform="cpu")
mlir.register_lowering(decode_p, _decode_cuda_lowering, platform="cuda")

# FP8 KV caches (issue 5): same contract, the cache in one of _checks.KV_LAYOUTS' FP8 layouts
# plus a float32 scalar kv_scale operand for "fp8_per_tensor". Runs through the reference on CPU
# and through csrc/kernels/decode_narrow.cu (up to 16 query rows per KV head) or
# csrc/kernels/decode_pipelined.cu on CUDA.
decode_fp8_p = Primitive("jax_flashmla_decode_fp8")
decode_fp8_p.multiple_results = True
decode_fp8_p.def_impl(functools.partial(xla.apply_primitive, decode_fp8_p))
decode_fp8_p.def_abstract_eval(_decode_abstract_eval)


def _decode_fp8_cuda_lowering(ctx, *args, layout, softmax_scale, causal, head_dim_v):
    """One custom call to ``jax_flashmla_decode_fp8_v1`` (csrc/ffi/handlers_fp8.cu).

    The handler always takes a float32 scalar ``kv_scale`` operand after ``num_splits``: the
    per-tensor scale, or a constant 1.0 for ``fp8_with_scale`` (whose scales live in the cache).
    """
    target = _ffi.DECODE_FP8_TARGET
    _ffi.ensure_registered()
    if layout == "fp8_with_scale":
        args = (*args, mlir.ir_constant(np.float32(1.0)))
        ctx = ctx.replace(avals_in=(*ctx.avals_in, jax.core.ShapedArray((), jnp.float32)))
    elif layout != "fp8_per_tensor":
        raise ValueError(f"decode_fp8: unknown FP8 layout {layout!r}")
    return jax.ffi.ffi_lowering(target)(
        ctx, *args, softmax_scale=np.float32(softmax_scale), causal=bool(causal),
        head_dim_v=np.int64(head_dim_v), layout=str(layout))


mlir.register_lowering(decode_fp8_p, _decode_cpu_lowering, platform="cpu")
mlir.register_lowering(decode_fp8_p, _decode_fp8_cuda_lowering, platform="cuda")


def _decode_batch_rule(prim):
    """vmap: fold the mapped axis into the request batch.

    The result of a decode does not depend on *how* work is scheduled, only on the inputs, so the
    mapped call can run as one decode over ``B * b`` requests with metadata recomputed for the
    folded batch (the passed metadata is then unused). A mapped ``k_cache`` (one page pool per
    element) folds too: pools are concatenated and block ids offset. If the folded batch is larger
    than the scheduler supports, or a per-element kv_scale is mapped, run a sequential
    ``lax.map`` instead.
    """
    def rule(args, dims, **params):
        q, k_cache, block_table, seqlens, tile_md, num_splits = args[:6]
        extra = args[6:]
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)

        def at0(x, d):
            return (jnp.broadcast_to(x, (size, *x.shape)) if d is _NOT_MAPPED
                    else jnp.moveaxis(x, d, 0))

        q_b, bt_b, sl_b = at0(q, dims[0]), at0(block_table, dims[2]), at0(seqlens, dims[3])
        B, b = q_b.shape[0], q_b.shape[1]
        num_sm_parts = tile_md.shape[-2]

        if B * b > _checks.MAX_BATCH or any(d is not _NOT_MAPPED for d in dims[6:]):
            mapped = tuple(at0(a, d) for a, d in zip(args, dims))
            outs = jax.lax.map(lambda a: tuple(prim.bind(*a, **params)), mapped)
            return outs, (0, 0, 0, 0)

        if dims[1] is _NOT_MAPPED:
            kc = k_cache
        else:
            kc_b = jnp.moveaxis(k_cache, dims[1], 0)
            nb = kc_b.shape[1]
            kc = kc_b.reshape(B * nb, *kc_b.shape[2:])
            # Offset only valid ids; invalid ones (e.g. past the end) stay invalid.
            offs = (jnp.arange(B, dtype=jnp.int32) * nb)[:, None, None]
            bt_b = jnp.where((bt_b >= 0) & (bt_b < nb), bt_b + offs, jnp.int32(-1))
        q_f = q_b.reshape(B * b, *q_b.shape[2:])
        bt_f = bt_b.reshape(B * b, bt_b.shape[2])
        sl_f = sl_b.reshape(B * b)
        md_f, ns_f = metadata_p.bind(sl_f, num_sm_parts=num_sm_parts)
        out, lse, o_acc, lse_acc = prim.bind(q_f, kc, bt_f, sl_f, md_f, ns_f, *extra, **params)
        out = out.reshape(B, b, *out.shape[1:])
        lse = lse.reshape(B, b, *lse.shape[1:])
        # Workspace outputs are internal (dropped by the public API); hand back an unmapped slice
        # of the right per-element shape.
        slots = b + num_sm_parts
        return (out, lse, o_acc[:slots], lse_acc[:slots]), (0, 0, _NOT_MAPPED, _NOT_MAPPED)

    return rule


batching.primitive_batchers[decode_p] = _decode_batch_rule(decode_p)
batching.primitive_batchers[decode_fp8_p] = _decode_batch_rule(decode_fp8_p)


def bind_decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *, softmax_scale,
                causal, head_dim_v, layout="dense", kv_scale=None):
    params = dict(softmax_scale=np.float32(softmax_scale), causal=bool(causal),
                  head_dim_v=int(head_dim_v))
    q, k_cache, block_table, cache_seqlens, tile_md, num_splits = map(
        _whole, (q, k_cache, block_table, cache_seqlens, tile_md, num_splits))
    if kv_scale is not None:
        kv_scale = _whole(kv_scale)
    if layout == "dense":
        return decode_p.bind(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, **params)
    extra = (kv_scale,) if layout == "fp8_per_tensor" else ()
    return decode_fp8_p.bind(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *extra,
                             layout=layout, **params)
