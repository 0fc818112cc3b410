"""Lowering: CUDA custom calls and their attribute contract; CPU lowering has none of them.

Lowering for ``cuda`` registers our FFI targets first, which needs the compiled extension; those
tests skip when it is absent. ``test_cuda_lowering_contract_with_registration_stubbed`` checks the
same attribute contract on any machine by stubbing out only the registration step (the emitted
StableHLO does not depend on it).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla import _ffi

S = jax.ShapeDtypeStruct
METADATA_TARGET = "jax_flashmla_metadata_v1"
DECODE_TARGET = "jax_flashmla_decode_v1"

needs_extension = pytest.mark.skipif(
    not jax_flashmla.is_built_with_cuda(),
    reason="jax_flashmla was built without its CUDA extension, so its FFI targets cannot be "
           "registered for a cuda lowering")


def _args(b=3, s_q=2, h_q=128, h_kv=1, dtype=jnp.bfloat16):
    return (S((b, s_q, h_q, 576), dtype), S((4 * b, 64, h_kv, 576), dtype),
            S((b, 4), jnp.int32), S((b,), jnp.int32))


def _lower(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _custom_calls(text: str) -> dict[str, list[str]]:
    """target name -> list of full custom_call lines."""
    calls: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.search(r"stablehlo\.custom_call @([\w.]+)\(", line)
        if m:
            calls.setdefault(m.group(1), []).append(line)
    return calls


def _attr(line: str, name: str) -> str:
    m = re.search(rf"\b{name} = ([^,}}]+)", line)
    assert m, f"attribute {name} missing in: {line}"
    return m.group(1).strip()


def _results(line: str) -> list[str]:
    """Result tensor types of a custom_call line: '... -> (tensor<..>, tensor<..>)'."""
    tail = line.rsplit("->", 1)[1]
    return re.findall(r"tensor<[^>]*>", tail)


def _check_cuda_contract(text: str, *, b, s_q, h_q, h_kv, parts, scale, causal, dtype="bf16"):
    calls = _custom_calls(text)
    assert set(calls) == {METADATA_TARGET, DECODE_TARGET}, sorted(calls)
    (md_line,) = calls[METADATA_TARGET]
    (dec_line,) = calls[DECODE_TARGET]

    assert _attr(md_line, "num_sm_parts") == f"{parts} : i64"
    assert _results(md_line) == [f"tensor<{parts}x8xi32>", f"tensor<{b + 1}xi32>"]

    assert _attr(dec_line, "head_dim_v") == "512 : i64"
    assert _attr(dec_line, "causal") == ("true" if causal else "false")  # i1 BoolAttr
    scale_attr = _attr(dec_line, "softmax_scale")
    assert scale_attr.endswith(": f32"), scale_attr
    assert float(scale_attr.split(":")[0]) == pytest.approx(np.float32(scale), rel=1e-7)
    rows = s_q * h_q // h_kv
    slots = b + parts
    assert _results(dec_line) == [
        f"tensor<{b}x{s_q}x{h_q}x512x{dtype}>",
        f"tensor<{b}x{h_q}x{s_q}xf32>",
        f"tensor<{slots}x{h_kv}x{rows}x512xf32>",
        f"tensor<{slots}x{h_kv}x{rows}xf32>",
    ]
    # The decode consumes the metadata call's two results.
    md_value = re.match(r"\s*(%[\w#]+)(?::\d+)? =", md_line).group(1)
    assert f"{md_value}#0" in dec_line and f"{md_value}#1" in dec_line


CONTRACT_CASES = [
    # b, s_q, h_q, h_kv, causal, scale, num_sms, parts
    (3, 2, 128, 1, True, None, None, 33),
    (2, 1, 128, 1, False, 192 ** -0.5 * 1.3689 ** 2, None, 66),
    (1, 4, 64, 2, True, 0.125, 114, 28),
    (4, 1, 16, 1, True, None, 78, 78),    # causal with s_q == 1 lowers as causal=false
]


def _decode_fn(causal, scale, num_sms):
    def f(q, k, bt, sl):
        return jax_flashmla.flash_mla_with_kvcache(q, k, bt, sl, 512, softmax_scale=scale,
                                                   causal=causal, num_sms=num_sms)
    return f


def _run_contract(b, s_q, h_q, h_kv, causal, scale, num_sms, parts, dtype=jnp.bfloat16):
    text = _lower(_decode_fn(causal, scale, num_sms), _args(b, s_q, h_q, h_kv, dtype), "cuda")
    _check_cuda_contract(text, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, parts=parts,
                         scale=576 ** -0.5 if scale is None else scale,
                         causal=causal and s_q > 1,
                         dtype={jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype])


@needs_extension
@pytest.mark.parametrize("b,s_q,h_q,h_kv,causal,scale,num_sms,parts", CONTRACT_CASES)
def test_cuda_lowering_contract(b, s_q, h_q, h_kv, causal, scale, num_sms, parts):
    _run_contract(b, s_q, h_q, h_kv, causal, scale, num_sms, parts)


@needs_extension
def test_cuda_lowering_fp16():
    _run_contract(2, 2, 16, 1, True, None, 132, 132, dtype=jnp.float16)


@needs_extension
def test_cuda_lowering_metadata_only():
    f = jax.jit(lambda sl: jax_flashmla.get_mla_metadata(sl, 256, 1, num_sms=132))
    text = f.trace(S((7,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    calls = _custom_calls(text)
    assert list(calls) == [METADATA_TARGET]
    (line,) = calls[METADATA_TARGET]
    assert _attr(line, "num_sm_parts") == "33 : i64"
    assert _results(line) == ["tensor<33x8xi32>", "tensor<8xi32>"]


@pytest.mark.parametrize("b,s_q,h_q,h_kv,causal,scale,num_sms,parts", CONTRACT_CASES[:2])
def test_cuda_lowering_contract_with_registration_stubbed(monkeypatch, b, s_q, h_q, h_kv, causal,
                                                          scale, num_sms, parts):
    monkeypatch.setattr(_ffi, "ensure_registered", lambda: None)
    _run_contract(b, s_q, h_q, h_kv, causal, scale, num_sms, parts)


def test_cuda_lowering_without_extension_raises_clearly():
    if jax_flashmla.is_built_with_cuda():
        pytest.skip("extension is built; this checks the CPU-only-build error")
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        _lower(_decode_fn(True, None, None), _args(), "cuda")


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_lowering_has_no_custom_calls_to_our_targets(causal):
    text = _lower(_decode_fn(causal, None, None), _args(b=2, s_q=2, h_q=16), "cpu")
    assert "jax_flashmla" not in text.replace("jit_f", "")  # no target, no leftover name
    assert METADATA_TARGET not in text and DECODE_TARGET not in text
    targets = set(_custom_calls(text))
    assert not any(t.startswith("jax_flashmla") for t in targets), targets
    # It is a real lowering of the computation (the output tensor appears).
    assert "tensor<2x2x16x512xbf16>" in text


def test_cpu_lowering_metadata_has_no_custom_call():
    f = jax.jit(lambda sl: jax_flashmla.get_mla_metadata(sl, 128, 1))
    text = f.trace(S((5,), jnp.int32)).lower(lowering_platforms=("cpu",)).as_text()
    assert METADATA_TARGET not in text
    assert "tensor<66x8xi32>" in text


# --------------------------------------------------------------------------------------------
# FP8 KV caches: one custom call to jax_flashmla_decode_fp8_v1 with a kv_scale operand
# --------------------------------------------------------------------------------------------
DECODE_FP8_TARGET = "jax_flashmla_decode_fp8_v1"


def _operand_types(line: str) -> list[str]:
    """Operand tensor types of a custom_call line: '... : (tensor<..>, ...) -> (...)'."""
    head = line.rsplit("->", 1)[0]
    return re.findall(r"tensor<[^>]*>", head.rsplit(" : (", 1)[1])


def _fp8_fn(layout, causal, scale, num_sms):
    if layout == "fp8_with_scale":
        def f(q, k, bt, sl):
            return jax_flashmla.flash_mla_with_kvcache(q, k, bt, sl, 512, softmax_scale=scale,
                                                       causal=causal, num_sms=num_sms,
                                                       is_fp8_kvcache=True)
    else:
        def f(q, k, bt, sl, kv_scale):
            return jax_flashmla.flash_mla_with_kvcache(q, k, bt, sl, 512, softmax_scale=scale,
                                                       causal=causal, num_sms=num_sms,
                                                       kv_scale=kv_scale)
    return f


def _fp8_args(layout, b, s_q, h_q, h_kv, cache_dtype):
    q = S((b, s_q, h_q, 576), jnp.bfloat16)
    width = 656 if layout == "fp8_with_scale" else 576
    args = (q, S((4 * b, 64, h_kv, width), cache_dtype), S((b, 4), jnp.int32),
            S((b,), jnp.int32))
    return args if layout == "fp8_with_scale" else args + (S((), jnp.float32),)


FP8_CONTRACT_CASES = [
    # layout, cache dtype, b, s_q, h_q, h_kv, causal, scale, num_sms, parts
    ("fp8_with_scale", jnp.uint8, 3, 2, 128, 1, True, None, None, 33),
    ("fp8_with_scale", jnp.float8_e4m3fn, 2, 1, 16, 1, True, 0.07, 78, 78),
    ("fp8_per_tensor", jnp.float8_e4m3fn, 1, 4, 64, 2, True, 0.125, 114, 28),
    ("fp8_per_tensor", jnp.float8_e4m3fn, 2, 1, 128, 1, False, None, None, 66),
]


def _run_fp8_contract(layout, cache_dtype, b, s_q, h_q, h_kv, causal, scale, num_sms, parts):
    text = _lower(_fp8_fn(layout, causal, scale, num_sms),
                  _fp8_args(layout, b, s_q, h_q, h_kv, cache_dtype), "cuda")
    calls = _custom_calls(text)
    assert set(calls) == {METADATA_TARGET, DECODE_FP8_TARGET}, sorted(calls)
    (md_line,) = calls[METADATA_TARGET]
    (line,) = calls[DECODE_FP8_TARGET]
    assert _attr(md_line, "num_sm_parts") == f"{parts} : i64"
    assert _attr(line, "layout") == f'"{layout}"'
    assert _attr(line, "head_dim_v") == "512 : i64"
    assert _attr(line, "causal") == ("true" if causal and s_q > 1 else "false")
    scale_attr = _attr(line, "softmax_scale")
    assert scale_attr.endswith(": f32"), scale_attr
    want = 576 ** -0.5 if scale is None else scale
    assert float(scale_attr.split(":")[0]) == pytest.approx(np.float32(want), rel=1e-7)
    width = 656 if layout == "fp8_with_scale" else 576
    cache_t = {jnp.uint8: "ui8", jnp.float8_e4m3fn: "f8E4M3FN"}[cache_dtype]
    rows, slots = s_q * h_q // h_kv, b + parts
    assert _operand_types(line) == [
        f"tensor<{b}x{s_q}x{h_q}x576xbf16>", f"tensor<{4 * b}x64x{h_kv}x{width}x{cache_t}>",
        f"tensor<{b}x4xi32>", f"tensor<{b}xi32>", f"tensor<{parts}x8xi32>", f"tensor<{b + 1}xi32>",
        "tensor<f32>"]
    assert _results(line) == [
        f"tensor<{b}x{s_q}x{h_q}x512xbf16>", f"tensor<{b}x{h_q}x{s_q}xf32>",
        f"tensor<{slots}x{h_kv}x{rows}x512xf32>", f"tensor<{slots}x{h_kv}x{rows}xf32>"]
    md_value = re.match(r"\s*(%[\w#]+)(?::\d+)? =", md_line).group(1)
    assert f"{md_value}#0" in line and f"{md_value}#1" in line
    # kv_scale: the caller's scalar (the last argument) per tensor, a constant 1.0 with scales.
    operands = re.search(rf"@{DECODE_FP8_TARGET}\(([^)]*)\)", line).group(1).split(", ")
    assert len(operands) == 7
    if layout == "fp8_with_scale":
        const = re.search(rf"{re.escape(operands[6])} = stablehlo\.constant dense<([^>]*)>", text)
        assert const and float(const.group(1)) == 1.0, operands[6]
    else:  # the caller's scalar (reshaped to rank 0 by the API), not a constant
        assert not re.search(rf"{re.escape(operands[6])} = stablehlo\.constant", text), operands
        assert "%arg4" in text


@pytest.mark.parametrize("case", FP8_CONTRACT_CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}x{c[4]}")
def test_fp8_cuda_lowering_contract_with_registration_stubbed(monkeypatch, case):
    monkeypatch.setattr(_ffi, "ensure_registered", lambda: None)
    _run_fp8_contract(*case)


@needs_extension
@pytest.mark.parametrize("case", FP8_CONTRACT_CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}x{c[4]}")
def test_fp8_cuda_lowering_contract(case):
    _run_fp8_contract(*case)


@needs_extension
def test_fp8_target_is_registered_by_the_extension():
    assert DECODE_FP8_TARGET in _ffi.extension().registrations()


@pytest.mark.parametrize("layout", ["fp8_with_scale", "fp8_per_tensor"])
def test_fp8_cpu_lowering_has_no_custom_calls_to_our_targets(layout):
    cache_dtype = jnp.uint8 if layout == "fp8_with_scale" else jnp.float8_e4m3fn
    text = _lower(_fp8_fn(layout, True, None, None), _fp8_args(layout, 2, 2, 16, 1, cache_dtype),
                  "cpu")
    assert not any(t.startswith("jax_flashmla") for t in _custom_calls(text))
    assert "tensor<2x2x16x512xbf16>" in text
