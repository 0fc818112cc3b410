"""Split-KV tile scheduler: worked examples, invariants, NumPy/JAX/get_mla_metadata agreement.

Row layout (see jax_flashmla/scheduler.py)::

    [begin_req, end_req, begin_block, end_block, begin_split, first_req_split, last_req_split, 0]

``begin_req``/``end_req`` inclusive; ``begin_block`` applies to the first request of the part, the
exclusive ``end_block`` to the last; requests in between cover ``[0, ceil(len / 64))``. A part with
``begin_req >= b`` is empty. Request ``r`` owns workspace slots ``[num_splits[r], num_splits[r+1])``
and the piece of the part's first request uses slot ``num_splits[r] + begin_split`` (other requests
of the part use their first slot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.scheduler import schedule_jax, schedule_numpy

PAGE = 64


# ------------------------------------------------------------------------------------------------
# Invariant checker (independent of the scheduler's code)
# ------------------------------------------------------------------------------------------------
def check_schedule(seqlens, parts: int, md, num_splits) -> None:
    """Asserts that (md, num_splits) is a valid split-KV schedule for ``seqlens`` over ``parts``."""
    lens = np.asarray(seqlens, np.int64)
    b = lens.shape[0]
    md = np.asarray(md)
    ns = np.asarray(num_splits)
    assert md.shape == (parts, 8) and md.dtype == np.int32, (md.shape, md.dtype)
    assert ns.shape == (b + 1,) and ns.dtype == np.int32, (ns.shape, ns.dtype)
    assert (md[:, 7] == 0).all()
    assert ns[0] == 0
    npieces = np.diff(ns.astype(np.int64))
    assert (npieces >= 1).all(), "every request must have at least one piece"
    assert ns[-1] < b + parts, f"{ns[-1]} pieces for b={b}, parts={parts}"
    assert ns[-1] == b + (npieces - 1).sum()

    nonempty = md[:, 0] < b
    # Empty parts (nothing left to do) only at the end.
    assert not (np.diff(nonempty.astype(np.int8)) > 0).any(), "an empty part precedes a busy one"
    assert nonempty[0], "part 0 must have work"

    ceil_blocks = -(-lens // PAGE)
    pieces = [[] for _ in range(b)]  # per request: (part, start, end, split_idx)
    for p in np.nonzero(nonempty)[0]:
        br, er, bb, eb, bs, fs, ls, _ = (int(v) for v in md[p])
        assert 0 <= br <= er < b, (p, md[p])
        assert fs in (0, 1) and ls in (0, 1)
        for r in range(br, er + 1):
            start = bb if r == br else 0
            end = eb if r == er else int(ceil_blocks[r])
            split_idx = bs if r == br else 0
            pieces[r].append((int(p), start, end, split_idx))
        # Split flags: the first (last) request is split iff it has more than one piece.
        if br == er:
            assert fs == ls == int(npieces[br] > 1), (p, md[p], npieces[br])
        else:
            assert fs == int(npieces[br] > 1), (p, md[p], npieces[br])
            assert ls == int(npieces[er] > 1), (p, md[p], npieces[er])

    slots = set()
    for r in range(b):
        pr = pieces[r]
        assert len(pr) == npieces[r], f"request {r}: {len(pr)} pieces, num_splits says {npieces[r]}"
        # Blocks covered exactly once, in order, by contiguous non-empty ranges.
        pos = 0
        for k, (p, start, end, split_idx) in enumerate(pr):
            assert start == pos, f"request {r} piece {k} (part {p}) starts at {start}, not {pos}"
            if lens[r] > 0:
                assert end > start, f"request {r} piece {k} (part {p}) is empty: [{start}, {end})"
            else:
                assert start == end == 0, f"zero-length request {r} got blocks [{start}, {end})"
            assert split_idx == k, f"request {r} piece {k} (part {p}) has split index {split_idx}"
            slot = int(ns[r]) + split_idx
            assert slot < ns[r + 1] and slot < b + parts
            assert slot not in slots
            slots.add(slot)
            pos = end
        assert pos == ceil_blocks[r], f"request {r}: covered {pos} of {ceil_blocks[r]} blocks"
    assert len(slots) == ns[-1]


# ------------------------------------------------------------------------------------------------
# Worked examples (study doc section 2.5)
# ------------------------------------------------------------------------------------------------
def test_example_uniform_4096_66_parts():
    md, ns = schedule_numpy(np.full(128, 4096, np.int32), 66)
    for p in range(64):  # payload 139: exactly two whole requests per part, nothing split
        np.testing.assert_array_equal(md[p], [2 * p, 2 * p + 1, 0, 64, 0, 0, 0, 0], err_msg=str(p))
    assert (md[64:, 0] == 128).all(), md[64:]
    np.testing.assert_array_equal(ns, np.arange(129))
    check_schedule(np.full(128, 4096), 66, md, ns)


def test_example_uniform_8192_66_parts():
    md, ns = schedule_numpy(np.full(128, 8192, np.int32), 66)
    np.testing.assert_array_equal(md[0], [0, 1, 0, 125, 0, 0, 1, 0])
    assert tuple(md[1, [0, 2, 4, 5]]) == (1, 125, 1, 1)  # req 1 from block 125, its 2nd piece
    assert ns[-1] == 190
    check_schedule(np.full(128, 8192), 66, md, ns)


def test_example_single_long_request_132_parts():
    md, ns = schedule_numpy(np.array([32768], np.int32), 132)
    for p in range(128):  # payload 9: 4 blocks per part
        np.testing.assert_array_equal(md[p], [0, 0, 4 * p, 4 * p + 4, p, 1, 1, 0], err_msg=str(p))
    assert (md[128:, 0] >= 1).all()
    np.testing.assert_array_equal(ns, [0, 128])
    check_schedule([32768], 132, md, ns)


def test_example_mixed_8_requests_4_parts():
    lens = np.array([0, 20, 140, 4096, 5000, 1, 64, 65], np.int32)
    md, ns = schedule_numpy(lens, 4)
    # columns: begin_req, end_req, begin_blk, end_blk, begin_split, first_split, last_split, pad
    expected = np.array([[0, 3, 0, 28, 0, 0, 1, 0],
                         [3, 4, 28, 7, 1, 1, 1, 0],
                         [4, 4, 7, 55, 1, 1, 1, 0],
                         [4, 7, 55, 2, 2, 1, 0, 0]], np.int32)
    np.testing.assert_array_equal(md, expected)
    np.testing.assert_array_equal(ns, [0, 1, 2, 3, 5, 8, 9, 10, 11])
    check_schedule(lens, 4, md, ns)


def test_checker_rejects_corrupted_schedules():
    """The invariant checker must catch broken schedules (so the invariant tests can fail)."""
    lens = np.array([0, 20, 140, 4096, 5000, 1, 64, 65], np.int32)
    md, ns = schedule_numpy(lens, 4)
    corruptions = [
        lambda m, n: m.__setitem__((1, 2), 27),     # block 27 of req 3 covered twice
        lambda m, n: m.__setitem__((2, 3), 54),     # block 54 of req 4 never covered
        lambda m, n: m.__setitem__((3, 5), 0),      # wrong first_split flag
        lambda m, n: m.__setitem__((0, 6), 0),      # wrong last_split flag
        lambda m, n: m.__setitem__((2, 4), 2),      # wrong begin_split
        lambda m, n: n.__setitem__(4, 4),           # num_splits inconsistent with pieces
        lambda m, n: m.__setitem__((3, 1), 6),      # request 7 dropped
    ]
    for i, corrupt in enumerate(corruptions):
        m, n = md.copy(), ns.copy()
        corrupt(m, n)
        with pytest.raises(AssertionError):
            check_schedule(lens, 4, m, n)
            pytest.fail(f"corruption {i} not detected")


# ------------------------------------------------------------------------------------------------
# Invariants on random and adversarial lengths
# ------------------------------------------------------------------------------------------------
def _lengths(kind: str, b: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.integers(0, 3000, size=b)
    elif kind == "edges":        # around page boundaries
        x = rng.choice([0, 1, 63, 64, 65, 127, 128, 129], size=b)
    elif kind == "zeros":
        x = np.zeros(b)
    elif kind == "ones":
        x = np.ones(b)
    elif kind == "mostly_zero":
        x = np.where(rng.random(b) < 0.8, 0, rng.integers(1, 5000, size=b))
    elif kind == "one_huge":     # one very long request among tiny ones
        x = rng.integers(0, 70, size=b)
        x[rng.integers(b)] = 1 << 20
    elif kind == "lognormal":    # heavy tail
        x = np.minimum(rng.lognormal(6, 2, size=b), 1 << 20)
    elif kind == "flashmla":     # FlashMLA's varlen recipe with zero-length requests
        x = np.maximum(np.rint(rng.normal(4096, 2048, size=b)), 2)
        x[rng.standard_normal(b) > 0] = 0
    else:
        raise ValueError(kind)
    return np.asarray(x, np.int32)


KINDS = ["uniform", "edges", "zeros", "ones", "mostly_zero", "one_huge", "lognormal", "flashmla"]
SIZES = [1, 2, 3, 7, 64, 129, 1000, 4096]
PARTS = [1, 2, 3, 5, 33, 66, 128, 132, 160]


@pytest.mark.parametrize("kind", KINDS)
def test_invariants_numpy(kind):
    seed = 0
    for b in SIZES:
        for parts in PARTS:
            seed += 1
            if b >= 1000 and parts not in (1, 66, 160):
                continue  # keep the Python walk cheap
            lens = _lengths(kind, b, seed + 1000 * KINDS.index(kind))
            md, ns = schedule_numpy(lens, parts)
            try:
                check_schedule(lens, parts, md, ns)
            except AssertionError as e:
                raise AssertionError(f"kind={kind} b={b} parts={parts} lens={lens[:16]}: {e}")


def test_invariants_all_parts_small_batch():
    rng = np.random.default_rng(7)
    for parts in range(1, 161):
        lens = rng.choice([0, 1, 63, 64, 65, 200, 1000, 9000], size=int(rng.integers(1, 12)))
        lens = lens.astype(np.int32)
        md, ns = schedule_numpy(lens, parts)
        check_schedule(lens, parts, md, ns)


@functools.lru_cache(maxsize=None)
def _jitted_schedule(parts: int):
    return jax.jit(lambda s: schedule_jax(s, parts))


JAX_CASES = [
    ("edges", 1, 1), ("edges", 1, 160), ("zeros", 3, 2), ("ones", 7, 132), ("uniform", 64, 66),
    ("mostly_zero", 129, 33), ("one_huge", 129, 160), ("lognormal", 1000, 66),
    ("flashmla", 128, 66), ("flashmla", 4096, 132), ("uniform", 4096, 1), ("edges", 4096, 160),
    ("one_huge", 2, 5), ("zeros", 4096, 66),
]


@pytest.mark.parametrize("kind,b,parts", JAX_CASES)
def test_schedule_jax_bit_identical(kind, b, parts):
    lens = _lengths(kind, b, seed=b * 1000 + parts)
    md_np, ns_np = schedule_numpy(lens, parts)
    md_j, ns_j = _jitted_schedule(parts)(jnp.asarray(lens))
    assert md_j.dtype == jnp.int32 and ns_j.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(md_j), md_np)
    np.testing.assert_array_equal(np.asarray(ns_j), ns_np)
    check_schedule(lens, parts, md_j, ns_j)


def test_schedule_jax_examples_bit_identical():
    for lens, parts in [(np.full(128, 4096), 66), (np.full(128, 8192), 66), ([32768], 132),
                        ([0, 20, 140, 4096, 5000, 1, 64, 65], 4)]:
        lens = np.asarray(lens, np.int32)
        md_np, ns_np = schedule_numpy(lens, parts)
        md_j, ns_j = _jitted_schedule(parts)(jnp.asarray(lens))
        np.testing.assert_array_equal(np.asarray(md_j), md_np)
        np.testing.assert_array_equal(np.asarray(ns_j), ns_np)


# ------------------------------------------------------------------------------------------------
# num_sm_parts and get_mla_metadata
# ------------------------------------------------------------------------------------------------
# (num_sms, q rows per KV head = s_q * h_q // h_kv, h_kv) -> parts;
# formula (study doc 2.1): max((num_sms // h_kv) // ceil(rows / 64), 1).
NUM_SM_PARTS_TABLE = [
    (132, 128, 1, 66),    # h_q 128, s_q 1 (study doc example)
    (132, 256, 1, 33),    # h_q 128, s_q 2 (study doc example)
    (132, 16, 1, 132),    # h_q 16 (study doc example)
    (132, 64, 1, 132),    # h_q 64 (study doc example)
    (132, 65, 1, 66),     # 65 rows need 2 m-blocks
    (132, 1, 1, 132),
    (132, 512, 1, 16),    # h_q 128, s_q 4
    (132, 64, 2, 66),     # h_q 128, h_kv 2
    (132, 192, 3, 14),    # (132 // 3) // 3
    (132, 16, 8, 16),
    (78, 128, 1, 39),
    (114, 128, 1, 57),
    (114, 256, 1, 28),
    (1, 128, 2, 1),       # clamped to >= 1
    (8, 1024, 1, 1),      # clamped to >= 1
]


@pytest.mark.parametrize("num_sms,rows,h_kv,expected", NUM_SM_PARTS_TABLE)
def test_num_sm_parts_formula(num_sms, rows, h_kv, expected):
    assert jax_flashmla.num_sm_parts(num_sms, rows, h_kv) == expected


# (s_q, h_q, h_kv)
HEAD_CONFIGS = [(1, 128, 1), (2, 128, 1), (1, 16, 1), (4, 64, 2), (3, 3, 1)]


@pytest.mark.parametrize("num_sms", [None, 78, 114, 132])
@pytest.mark.parametrize("s_q,h_q,h_kv", HEAD_CONFIGS)
def test_get_mla_metadata_matches_numpy(num_sms, s_q, h_q, h_kv):
    b = 37
    lens = _lengths("flashmla", b, seed=s_q * 100 + h_q + (num_sms or 0))
    rows = s_q * h_q // h_kv
    parts = jax_flashmla.num_sm_parts(132 if num_sms is None else num_sms, rows, h_kv)
    md, ns = jax_flashmla.get_mla_metadata(jnp.asarray(lens), rows, h_kv, num_sms=num_sms)
    assert md.shape == (parts, 8) and md.dtype == jnp.int32
    assert ns.shape == (b + 1,) and ns.dtype == jnp.int32
    md_np, ns_np = schedule_numpy(lens, parts)
    np.testing.assert_array_equal(np.asarray(md), md_np)
    np.testing.assert_array_equal(np.asarray(ns), ns_np)


def test_get_mla_metadata_default_is_132_sms_on_cpu():
    lens = jnp.asarray(_lengths("uniform", 5, seed=3))
    md, _ = jax_flashmla.get_mla_metadata(lens, 128, 1)
    assert md.shape == (66, 8)
    md, _ = jax_flashmla.get_mla_metadata(lens, 256, 1)
    assert md.shape == (33, 8)


def test_get_mla_metadata_under_jit_large_batch():
    lens = _lengths("flashmla", 4096, seed=11)
    f = jax.jit(jax_flashmla.get_mla_metadata, static_argnums=(1, 2))
    md, ns = f(jnp.asarray(lens), 128, 1)
    md_np, ns_np = schedule_numpy(lens, 66)
    np.testing.assert_array_equal(np.asarray(md), md_np)
    np.testing.assert_array_equal(np.asarray(ns), ns_np)
    check_schedule(lens, 66, md, ns)
