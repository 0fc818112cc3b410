"""FlashMLA's split-KV tile scheduler, on the host (NumPy) and in pure JAX.

The schedule splits the KV blocks of all requests over ``num_sm_parts`` CTAs per (m-block, KV head)
so that every part gets about the same work, where a request also costs ``FIXED_OVERHEAD_BLOCKS``
blocks (its Q load and output store). The algorithm and row layout follow FlashMLA's
``get_decoding_sched_meta`` (see docs/design.md); the CUDA kernel in csrc/kernels/scheduler.cu
implements the same walk and is tested to be bit-identical to :func:`schedule_numpy`.

Metadata row (8 x int32) per part::

    [begin_req, end_req, begin_block, end_block, begin_split, first_req_split, last_req_split, 0]

``begin_req``/``end_req`` are inclusive, ``begin_block`` applies to the first request and the
exclusive ``end_block`` to the last; requests in between cover all their blocks. A part with
``begin_req >= b`` is empty. ``num_splits[i]`` is the exclusive prefix sum of the pieces per
request: request ``i`` owns workspace slots ``[num_splits[i], num_splits[i + 1])``.
"""

from __future__ import annotations

import numpy as np

BLOCK_SIZE_N = 64
FIXED_OVERHEAD_BLOCKS = 5
METADATA_ROW = 8
M_BLOCK = 64


def num_sm_parts(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """FlashMLA's CTA-per-(m-block, KV head) count: one wave over the SMs, at least 1."""
    m_blocks = -(-int(num_q_tokens_per_head_k) // M_BLOCK)
    return max(int(num_sms) // int(num_heads_k) // max(m_blocks, 1), 1)


def _blocks(seqlen: np.ndarray) -> np.ndarray:
    """Blocks per request; a zero-length request still counts as one block."""
    return np.maximum(seqlen - 1, 0) // BLOCK_SIZE_N + 1


def schedule_numpy(cache_seqlens, parts: int, fixed_overhead: int = FIXED_OVERHEAD_BLOCKS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Reference scheduler: returns (tile_scheduler_metadata [parts, 8], num_splits [b + 1]).

    ``fixed_overhead`` is what a request (piece) costs in blocks besides its own blocks."""
    seqlens = np.asarray(cache_seqlens, dtype=np.int64).reshape(-1)
    b = seqlens.shape[0]
    nblk = _blocks(seqlens)
    total = int(np.sum(nblk + fixed_overhead))
    payload = -(-total // parts) + fixed_overhead

    md = np.zeros((parts, METADATA_ROW), np.int32)
    num_splits = np.zeros((b + 1,), np.int32)
    req, blk, nsplit, cum = 0, 0, 0, 0
    for p in range(parts):
        begin_req, begin_blk, begin_split = req, blk, nsplit
        first_split = blk != 0
        rem = payload
        while req < b:
            left = int(nblk[req]) - blk
            if rem >= left + fixed_overhead:
                cum += nsplit + 1
                num_splits[req + 1] = cum
                rem -= left + fixed_overhead
                req, blk, nsplit = req + 1, 0, 0
            else:
                if rem - fixed_overhead > 0:
                    blk += rem - fixed_overhead
                    nsplit += 1
                break
        end_req = req if blk > 0 else req - 1
        if blk > 0:
            end_blk = blk
        else:
            end_blk = 0 if seqlens[req - 1] == 0 else int(nblk[req - 1])
        last_split = (end_blk != int(nblk[end_req])) and seqlens[end_req] != 0
        if begin_req == end_req:
            first_split = last_split = first_split or last_split
        md[p] = (begin_req, end_req, begin_blk, end_blk, begin_split,
                 int(first_split), int(last_split), 0)
    assert req == b and blk == 0, "scheduler walk did not cover every block"
    return md, num_splits


def schedule_jax(cache_seqlens, parts: int):
    """The same walk in pure JAX (used by the CPU lowering of the metadata primitive)."""
    import jax
    import jax.numpy as jnp

    seqlens = cache_seqlens.astype(jnp.int32)
    b = seqlens.shape[0]
    nblk = jnp.maximum(seqlens - 1, 0) // BLOCK_SIZE_N + 1
    total = jnp.sum(nblk + FIXED_OVERHEAD_BLOCKS)
    payload = (total + parts - 1) // parts + FIXED_OVERHEAD_BLOCKS
    nblk_pad = jnp.concatenate([nblk, jnp.zeros((1,), jnp.int32)])
    len_pad = jnp.concatenate([seqlens, jnp.zeros((1,), jnp.int32)])

    def part_body(p, carry):
        md, num_splits, req, blk, nsplit, cum = carry
        begin_req, begin_blk, begin_split = req, blk, nsplit
        first_split = blk != 0

        def cond(s):
            return s[0] & (s[1] < b)

        def body(s):
            _, req, blk, nsplit, cum, rem, num_splits = s
            left = nblk_pad[req] - blk
            fits = rem >= left + FIXED_OVERHEAD_BLOCKS
            new_cum = cum + nsplit + 1
            num_splits = jnp.where(fits, num_splits.at[req + 1].set(new_cum), num_splits)
            take = (~fits) & (rem - FIXED_OVERHEAD_BLOCKS > 0)
            return (
                fits,
                jnp.where(fits, req + 1, req),
                jnp.where(fits, 0, jnp.where(take, blk + rem - FIXED_OVERHEAD_BLOCKS, blk)),
                jnp.where(fits, 0, jnp.where(take, nsplit + 1, nsplit)),
                jnp.where(fits, new_cum, cum),
                jnp.where(fits, rem - left - FIXED_OVERHEAD_BLOCKS, rem),
                num_splits,
            )

        state = (jnp.bool_(True), req, blk, nsplit, cum, payload, num_splits)
        _, req, blk, nsplit, cum, _, num_splits = jax.lax.while_loop(cond, body, state)
        end_req = jnp.where(blk > 0, req, req - 1)
        prev = jnp.maximum(req - 1, 0)
        end_blk = jnp.where(blk > 0, blk, jnp.where(len_pad[prev] == 0, 0, nblk_pad[prev]))
        er = jnp.clip(end_req, 0, b)
        last_split = (end_blk != nblk_pad[er]) & (len_pad[er] != 0)
        same = begin_req == end_req
        either = first_split | last_split
        first_split = jnp.where(same, either, first_split)
        last_split = jnp.where(same, either, last_split)
        row = jnp.stack([begin_req, end_req, begin_blk, end_blk, begin_split,
                         first_split.astype(jnp.int32), last_split.astype(jnp.int32),
                         jnp.int32(0)]).astype(jnp.int32)
        return md.at[p].set(row), num_splits, req, blk, nsplit, cum

    zero = jnp.int32(0)
    init = (jnp.zeros((parts, METADATA_ROW), jnp.int32), jnp.zeros((b + 1,), jnp.int32),
            zero, zero, zero, zero)
    md, num_splits, *_ = jax.lax.fori_loop(0, parts, part_body, init)
    return md, num_splits
