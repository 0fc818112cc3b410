"""CPU smoke test of the benchmark CLI (python -m jax_flashmla.bench)."""

import json
import math

import jax
import pytest

from jax_flashmla import bench


def test_parse_cases_defaults_and_errors():
    cases = bench.parse_cases("b=4,s_q=2,h_q=32,h_kv=2,s_k=300,causal=0,varlen=false;h_q=16")
    assert cases[0] == bench.Case(b=4, s_q=2, h_q=32, h_kv=2, s_k=300, causal=False,
                                  varlen=False)
    assert cases[1] == bench.Case(h_q=16)
    with pytest.raises(ValueError, match="bad case item"):
        bench.parse_cases("b=2,heads=4")
    with pytest.raises(ValueError, match="multiple of h_kv"):
        bench.parse_cases("h_q=3,h_kv=2")


def test_default_grid_is_the_anchor_table():
    grid = bench.anchor_grid()
    assert len(grid) == 24
    assert all(c.b == 128 and c.h_kv == 1 and c.causal and c.varlen for c in grid)
    assert {(c.s_q, c.h_q) for c in grid if c.s_q == 2} == {(2, 64), (2, 128)}


def test_varlen_lengths_follow_flashmla():
    lengths = bench.case_lengths(bench.Case(b=64, s_q=2, s_k=1024, seed=3))
    assert lengths.dtype.name == "int32" and lengths.min() >= 2
    assert lengths.std() > 100                     # N(s_k, s_k/2): really variable
    assert (bench.case_lengths(bench.Case(b=64, s_q=2, s_k=1024, seed=3)) == lengths).all()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU smoke test")
def test_cli_main_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    report = bench.main(["--cases", "b=2,s_q=2,h_q=16,s_k=128;b=1,h_q=16,h_kv=2,s_k=64,varlen=0",
                         "--json", str(out), "--reps", "2", "--target-ms", "2"])
    printed = capsys.readouterr().out
    assert "pure-JAX reference" in printed
    assert "x FlashMLA" in printed.splitlines()[-3]  # the table comes last

    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report, default=float))
    meta = data["meta"]
    assert meta["backend"] == "cpu" and not meta["on_gpu"]
    for key in ("copy_GBps", "matmul_TFLOPS"):
        assert math.isfinite(meta["ceilings"][key]) and meta["ceilings"][key] > 0

    assert len(data["cases"]) == 2
    for case in data["cases"]:
        assert "skipped" not in case
        for key in ("us", "loop_us", "naive_us", "TFLOPS", "GBps", "of_roofline", "flop",
                    "bytes", "mean_len", "speedup_vs_naive"):
            assert math.isfinite(case[key]) and case[key] > 0, key
        assert math.isfinite(case["overhead_pct"])
        assert case["max_abs_diff_vs_naive"] < 1e-2  # the timed decode computes the decode
        assert case["flashmla"] is None               # not one of the anchor's cases
    assert data["cases"][1]["case"]["h_kv"] == 2


def test_anchor_lookup():
    case = bench.Case(b=128, s_q=2, h_q=128, s_k=16384)
    anchor = bench.anchor_for(case, "bf16")
    assert anchor["us"] == 1704 and anchor["naive_jax_us"] == 21887
    assert bench.anchor_for(case, "fp16") is None
    assert bench.anchor_for(bench.Case(b=8, h_q=16, s_k=1024), "bf16")["us"] == 36


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU smoke test")
def test_failing_case_is_reported_and_others_run(monkeypatch, capsys):
    real = bench.make_problem

    def flaky(case, dtype, kv="bf16", num_sms=None):
        if case.h_q == 32:
            raise RuntimeError("boom\nsecond line")
        return real(case, dtype, kv, num_sms)

    monkeypatch.setattr(bench, "make_problem", flaky)
    report = bench.main(["--cases", "b=1,h_q=32,s_k=64;b=1,h_q=16,s_k=64", "--no-naive",
                         "--reps", "1", "--target-ms", "1"])
    assert report["failures"] == 1
    assert report["cases"][0]["skipped"] == "failed: RuntimeError: boom"
    assert report["cases"][1]["us"] > 0
    assert "skipped: failed: RuntimeError: boom" in capsys.readouterr().out


def test_num_sms_sets_the_schedule(capsys):
    """--num-sms reaches get_mla_metadata (one metadata row per scheduled SM part) and the timed
    decode calls."""
    import jax.numpy as jnp
    case = bench.Case(b=3, s_q=1, h_q=16, s_k=200)
    assert bench.make_problem(case, jnp.bfloat16, num_sms=7).tile_md.shape == (7, 8)
    problem = bench.make_problem(case, jnp.bfloat16, num_sms=264)
    assert problem.tile_md.shape == (264, 8)
    # The timed calls pass the same SM count on, so the call's part-count check accepts the
    # schedule (it rejected every --num-sms other than the device's before).
    out, _ = bench._decode(*problem.decode_args(), causal=False, num_sms=problem.num_sms)
    assert out.shape == (3, 1, 16, 512)
    bench.decode_loop(jnp.int32(2), *problem.decode_args(), causal=False,
                      num_sms=problem.num_sms).block_until_ready()
    with pytest.raises(SystemExit):
        bench.parse_args(["--num-sms", "0"])
    assert "--num-sms must be >= 1" in capsys.readouterr().err
