"""The bf16 prefill (CSMD_PREFILL, native/src/kernels/gemm_bf16.h) and the native SwiGLU.

Products of more than 64 rows with quantized weights (and of more than 8 rows with bf16 weights) run the bf16
GEMM where the kernels have it (AVX-512 BF16): x and the weights are rounded to bf16 (round to nearest even),
every product of two bf16 values is exact in fp32, and the sums are fp32. Two references, both float64:

* the same operands rounded to bf16 as the kernel rounds them (x; each weight s * q + b computed in fp32, then
  rounded): only the fp32 summation differs, so ``|y - ref| <= K * 2^-24 * mag`` (mag = the sum of the terms'
  magnitudes, K additions of relative error 2^-24 each; x1.01 and +2 for the bound's second order). This pins
  down the rounding (to nearest even, not truncated) and the pairing of k with x.
* the unrounded operands: bf16 keeps 8 significant bits, so each factor is within 2^-8 relative and each
  product within 2^-7 + 2^-16: ``|y - x @ W.T| <= (2^-7 + 2^-16 + (K + 2) 2^-24) * mag``.

Fewer rows, fp32 weights, the fp32 setting and kernels without AVX-512 BF16 keep the fp32 paths, bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from csmd import kernels
from csmd.errors import UserError
from csmd.kernels import reference

if os.environ.get("CSMD_REQUIRE_NATIVE") == "1":
    import csmd_native
else:
    csmd_native = pytest.importorskip("csmd_native")

QUANT_ROWS = 65  # the first row count of quantized products that takes the bf16 GEMM (qmatmul.cpp)
DENSE_ROWS = 9  # and of bf16 weights (matmul.cpp)
U32 = 2.0**-24
VARIANTS = ("scalar", "avx2", "avx512vnni", "neon")


def runnable_variants() -> list[str]:
    f = csmd_native.cpu_features()
    return ["scalar"] + [v for v in VARIANTS[1:] if f[v] and (v != "avx2" or f["fma"])]


def has_bf16_gemm() -> bool:
    return bool(csmd_native.cpu_features().get("avx512bf16"))


@pytest.fixture(autouse=True)
def _defaults():
    csmd_native.set_variant("auto")
    csmd_native.set_prefill_mode("auto")
    yield
    csmd_native.set_variant("auto")
    csmd_native.set_prefill_mode("auto")


@pytest.fixture
def bf16_prefill():
    """The bf16 GEMM in force (skips where the CPU has none)."""
    if not has_bf16_gemm():
        pytest.skip("no AVX-512 BF16 on this CPU")
    csmd_native.set_variant("avx512vnni")
    csmd_native.set_prefill_mode("bf16")
    assert csmd_native.get_effective_prefill_mode() == "bf16"


def round_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even), as float32."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def quantized(n: int, k: int, group_size: int, bits: int, sb_dtype, seed: int):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return wq, scales.astype(sb_dtype), biases.astype(sb_dtype)


def dequantized_fp32(wq: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> np.ndarray:
    """s * q + b rounded once to fp32, as the kernel's fused multiply-add gives it."""
    words = np.array(wq).astype(np.uint64)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint64) * bits)[None, None, :]
    q = ((words[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1).astype(np.float64)
    s = np.array(scales.astype(mx.float32)).astype(np.float64).repeat(group_size, axis=1)
    b = np.array(biases.astype(mx.float32)).astype(np.float64).repeat(group_size, axis=1)
    return (s * q + b).astype(np.float32)


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def check_bf16_product(y: mx.array, x: mx.array, w32: np.ndarray) -> None:
    """y = x @ w32.T through the bf16 GEMM: both references of the module docstring."""
    k = w32.shape[1]
    got = f64(y).reshape(-1, w32.shape[0])
    x32 = np.array(x.astype(mx.float32)).reshape(-1, k)
    xb, wb = round_bf16(x32).astype(np.float64), round_bf16(w32).astype(np.float64)
    mag = np.abs(xb) @ np.abs(wb).T
    err = np.abs(got - xb @ wb.T)
    tol = 1.01 * (k + 2) * U32 * mag + 1e-30
    assert np.all(err <= tol), f"against the bf16-rounded operands: max err / tol {np.max(err / tol):.3g}"
    xf, wf = x32.astype(np.float64), w32.astype(np.float64)
    mag = np.abs(xf) @ np.abs(wf).T
    err = np.abs(got - xf @ wf.T)
    tol = (2.0**-7 + 2.0**-16 + 1.01 * (k + 2) * U32) * mag + 1e-30
    assert np.all(err <= tol), f"against the unrounded operands: max err / tol {np.max(err / tol):.3g}"


# (rows, in, out) with the GEMM's edges: rows not a multiple of the 6-row tile (65, 67, 301), in past one
# 512-wide K block and not a multiple of it (1088 = 2 x 512 + 64, 544 = 512 + 32), out below one 16-lane
# vector (1, 7), not a multiple of the 64-row panel (70, 129, 200) and over several panels per thread.
QUANT_SHAPES = [(65, 64, 1), (67, 1088, 70), (70, 544, 129), (301, 128, 200), (96, 1152, 7), (130, 2048, 1031)]


@pytest.mark.parametrize("sb_dtype", [mx.bfloat16, mx.float32, mx.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize(("rows", "k", "n"), QUANT_SHAPES)
def test_quantized_product_in_bf16(bf16_prefill, rows: int, k: int, n: int, group_size: int, bits: int, sb_dtype):
    if k % group_size:
        pytest.skip("in must be a multiple of the group size")
    wq, s, b = quantized(n, k, group_size, bits, sb_dtype, seed=rows + k)
    x = mx.random.normal((rows, k), key=mx.random.key(n))
    y = csmd_native.quantized_matmul(x, wq, s, b, group_size=group_size, bits=bits)
    check_bf16_product(y, x, dequantized_fp32(wq, s, b, group_size, bits))


@pytest.mark.parametrize(("rows", "k", "n"), [(9, 1, 1), (9, 7, 3), (10, 37, 129), (64, 1001, 70), (300, 2048, 513)])
def test_bf16_weight_product_in_bf16(bf16_prefill, rows: int, k: int, n: int) -> None:
    """bf16 weights are already what the GEMM multiplies; in (k) of any size, odd ones padded with a zero."""
    w = (mx.random.normal((n, k), key=mx.random.key(k)) * 0.05).astype(mx.bfloat16)
    x = mx.random.normal((rows, k), key=mx.random.key(n))
    check_bf16_product(csmd_native.matmul(x, w), x, np.array(w.astype(mx.float32)))


def test_bf16_activations_in_and_out(bf16_prefill) -> None:
    """bf16 x (a bf16 model's activations) is exact in bf16 already; the output comes back in x's dtype."""
    wq, s, b = quantized(96, 512, 64, 4, mx.bfloat16, seed=3)
    x = mx.random.normal((80, 512), key=mx.random.key(4)).astype(mx.bfloat16)
    y = csmd_native.quantized_matmul(x, wq, s, b, group_size=64, bits=4)
    assert y.dtype == mx.bfloat16
    y32 = csmd_native.quantized_matmul(x.astype(mx.float32), wq, s, b, group_size=64, bits=4)
    np.testing.assert_array_equal(f64(y), f64(y32.astype(mx.bfloat16)))


def test_threads_give_the_same_bits(bf16_prefill) -> None:
    """Each output's sums run in one order (K block by K block) however the weight rows are split."""
    wq, s, b = quantized(1000, 1024, 64, 4, mx.bfloat16, seed=7)
    x = mx.random.normal((100, 1024), key=mx.random.key(8))
    n0 = csmd_native.num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            csmd_native.set_num_threads(threads)
            outs.append(np.array(csmd_native.quantized_matmul(x, wq, s, b, group_size=64, bits=4)))
    finally:
        csmd_native.set_num_threads(n0)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_few_rows_keep_the_single_row_kernels(bits: int) -> None:
    """Up to 64 rows a quantized product is each row's own single-row product, bit for bit, in every prefill
    setting (the generated frames run those kernels); from 65 rows the setting decides."""
    wq, s, b = quantized(135, 1088, 64, bits, mx.bfloat16, seed=11)
    x = mx.random.normal((QUANT_ROWS, 1088), key=mx.random.key(12))
    rows = QUANT_ROWS - 1
    one_by_one = np.stack(
        [np.array(csmd_native.quantized_matmul(x[m : m + 1], wq, s, b, 64, bits))[0] for m in range(rows)]
    )
    for mode in ("auto", "fp32") + (("bf16",) if has_bf16_gemm() else ()):
        csmd_native.set_prefill_mode(mode)
        np.testing.assert_array_equal(np.array(csmd_native.quantized_matmul(x[:rows], wq, s, b, 64, bits)), one_by_one)
    if has_bf16_gemm():
        csmd_native.set_prefill_mode("bf16")
        check_bf16_product(csmd_native.quantized_matmul(x, wq, s, b, 64, bits), x, dequantized_fp32(wq, s, b, 64, bits))


def test_few_row_and_fp32_weight_products_are_untouched() -> None:
    """bf16 weights up to 8 rows (the few-row product) and fp32 weights at any row count: the same bits in
    both settings."""
    w16 = (mx.random.normal((300, 700), key=mx.random.key(1)) * 0.05).astype(mx.bfloat16)
    w32 = mx.random.normal((300, 700), key=mx.random.key(2)) * 0.05
    x = mx.random.normal((200, 700), key=mx.random.key(3))
    cases = [(w16, x[: DENSE_ROWS - 1]), (w32, x), (w32, x[:DENSE_ROWS])]
    modes = ("fp32", "auto") + (("bf16",) if has_bf16_gemm() else ())
    results = {}
    for mode in modes:
        csmd_native.set_prefill_mode(mode)
        results[mode] = [np.array(csmd_native.matmul(xi, w)) for w, xi in cases]
    for mode in modes[1:]:
        for got, want in zip(results[mode], results["fp32"], strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_without_bf16_run_the_fp32_gemm(variant: str) -> None:
    """On kernels without the bf16 GEMM (scalar, AVX2, NEON; AVX-512 without BF16), auto means fp32, asking for
    bf16 is a ValueError, and the product is the fp32 GEMM's: the same bits as the fp32 setting."""
    if variant not in runnable_variants():
        pytest.skip(f"no {variant} kernels on this CPU")
    csmd_native.set_variant(variant)
    bf16 = variant == "avx512vnni" and has_bf16_gemm()
    assert csmd_native.get_effective_prefill_mode() == ("bf16" if bf16 else "fp32")
    if not bf16:
        with pytest.raises(ValueError, match="AVX-512 BF16"):
            csmd_native.set_prefill_mode("bf16")
        assert csmd_native.get_prefill_mode() == "auto"  # a refused setting changes nothing
    wq, s, b = quantized(70, 512, 64, 4, mx.bfloat16, seed=13)
    x = mx.random.normal((QUANT_ROWS, 512), key=mx.random.key(14))
    y_auto = np.array(csmd_native.quantized_matmul(x, wq, s, b, 64, 4))
    csmd_native.set_prefill_mode("fp32")
    assert csmd_native.get_effective_prefill_mode() == "fp32"
    y_fp32 = np.array(csmd_native.quantized_matmul(x, wq, s, b, 64, 4))
    if bf16:
        check_bf16_product(mx.array(y_auto), x, dequantized_fp32(wq, s, b, 64, 4))
        assert not np.array_equal(y_auto, y_fp32)  # the setting did switch paths
    else:
        np.testing.assert_array_equal(y_auto, y_fp32)


def test_settings() -> None:
    with pytest.raises(ValueError, match="expected 'auto', 'bf16' or 'fp32'"):
        csmd_native.set_prefill_mode("fp16")
    for mode in ("fp32", "auto") + (("bf16",) if has_bf16_gemm() else ()):
        csmd_native.set_prefill_mode(mode)
        assert csmd_native.get_prefill_mode() == mode
    code = "import csmd_native; print(csmd_native.get_prefill_mode(), csmd_native.get_effective_prefill_mode())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["auto", "bf16" if has_bf16_gemm() else "fp32"]


def test_prefill_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from csmd.kernels import native

    try:
        for mode in ("fp32", "auto") + (("bf16",) if has_bf16_gemm() else ()):
            monkeypatch.setenv("CSMD_PREFILL", mode)
            assert native.apply_prefill_mode() == mode
            assert csmd_native.get_prefill_mode() == mode
        monkeypatch.setenv("CSMD_PREFILL", "fast")
        with pytest.raises(UserError, match="CSMD_PREFILL must be one of auto, bf16, fp32"):
            native.apply_prefill_mode()
        monkeypatch.setenv("CSMD_PREFILL", "bf16")
        csmd_native.set_variant("scalar")
        with pytest.raises(UserError, match="CSMD_PREFILL=bf16 needs a CPU with AVX-512 BF16"):
            native.apply_prefill_mode()
        monkeypatch.delenv("CSMD_PREFILL")
        csmd_native.set_variant("auto")
        assert native.apply_prefill_mode() == "auto"
        assert "prefill auto (" in native.describe()["native_extension"]
    finally:
        csmd_native.set_prefill_mode("auto")


# --------------------------------------------------------------------------------------------------------------
# A whole prefill: the logits after it with the bf16 GEMM against the fp32 GEMM.


def test_prefill_logits_stay_close_to_the_fp32_prefill(bf16_prefill) -> None:
    """A 4-bit model's 120-row prefill (every projection a many-row product) with the bf16 GEMM: its last row's
    logits and the cached keys against the fp32 GEMM's. Each product is within ~2.3e-3 relative RMS of fp32
    (both operands rounded to bf16); over 4 layers of random weights that grows to a relative RMS of 7e-3 for
    the keys and 1.1-1.3e-2 for the logits (measured, 3 seeds; for scale, the int8 activations of every
    generated frame put a 4-bit model's logits 1.5-1.9e-2 off, test_native_model.py). Asserted: below 4e-2."""
    from csmd.model.config import TINY
    from csmd.model.generator import audio_rows, text_rows
    from csmd.model.weights import build_model, quantize, random_params

    cfg = dataclasses.replace(
        TINY,
        backbone=dataclasses.replace(TINY.backbone, hidden_size=256, intermediate_size=512, num_layers=4),
        decoder=dataclasses.replace(TINY.decoder, hidden_size=64, num_heads=4),  # 64-wide groups fit
    )
    model = build_model(cfg, random_params(cfg, mx.float32, seed=21), mx.float32, "random")
    quantize(model, 4)
    rng = np.random.default_rng(0)
    text = text_rows(rng.integers(0, cfg.text_vocab_size, size=60), cfg.num_codebooks)
    audio = audio_rows(rng.integers(1, cfg.audio_codebook_size, size=(60, cfg.num_codebooks)))
    tokens = mx.array(np.concatenate([text[0], audio[0]])[None])
    mask = mx.array(np.concatenate([text[1], audio[1]])[None])

    def prefill(mode: str) -> tuple[np.ndarray, np.ndarray]:
        csmd_native.set_prefill_mode(mode)
        cache = model.make_backbone_cache()
        hidden = model.backbone_step(tokens, mask, cache)
        logits = model.codebook0_logits(hidden)
        mx.eval(logits, *cache.state())
        return f64(logits), f64(cache.keys[:, :, :, : cache.offset])

    logits_bf16, keys_bf16 = prefill("bf16")
    logits_fp32, keys_fp32 = prefill("fp32")

    def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))

    assert 0 < rel_rms(logits_bf16, logits_fp32) < 4e-2
    assert 0 < rel_rms(keys_bf16, keys_fp32) < 4e-2


# --------------------------------------------------------------------------------------------------------------
# The native SwiGLU: silu(g) * u, its sigmoid from the polynomial exp of kernels/elu.h.


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [1, 7, 8, 9, 300 * 129, 300 * 8192])
def test_swiglu_matches_float64(variant: str, size: int) -> None:
    if variant not in runnable_variants():
        pytest.skip(f"no {variant} kernels on this CPU")
    csmd_native.set_variant(variant)
    g = mx.random.normal((size,), key=mx.random.key(size)) * 6  # both signs, saturating at both ends
    u = mx.random.normal((size,), key=mx.random.key(size + 1))
    y = f64(csmd_native.swiglu(g, u))
    gf, uf = f64(g), f64(u)
    want = gf / (1 + np.exp(-gf)) * uf
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-37)


def test_swiglu_extremes_and_shapes() -> None:
    g = mx.array([-1e4, -100.0, -88.0, -20.0, -0.0, 0.0, 1e-30, 20.0, 88.0, 1e4, 3.4e38])
    u = mx.ones(g.shape)
    y = f64(csmd_native.swiglu(g, u))
    gf = f64(g)
    want = gf * np.exp(-np.logaddexp(0.0, -gf))  # g * sigmoid(g), without overflow
    # The exp is clamped at e^-87 (kernels/elu.h), so silu(g) below g = -87 is g e^-87, not ~0: off by < 1e-33.
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-33)
    a = mx.random.normal((2, 3, 5))
    b = mx.random.normal((2, 3, 5))
    assert csmd_native.swiglu(a, b).shape == (2, 3, 5)
    np.testing.assert_allclose(f64(csmd_native.swiglu(a.T, b.T)), f64(reference.swiglu(a.T, b.T)), rtol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        csmd_native.swiglu(a, b[0])
    with pytest.raises(ValueError, match="float32"):
        csmd_native.swiglu(a.astype(mx.bfloat16), b)


def test_kernels_swiglu_takes_the_native_op_for_fp32_and_bf16() -> None:
    g = mx.random.normal((1, 70, 128), key=mx.random.key(1)) * 4
    u = mx.random.normal((1, 70, 128), key=mx.random.key(2))
    for dtype, rtol in ((mx.float32, 1e-6), (mx.bfloat16, 2.0**-8)):  # bf16: the output's rounding
        gd, ud = g.astype(dtype), u.astype(dtype)
        y = kernels.swiglu(gd, ud)
        assert y.dtype == dtype
        want = f64(reference.swiglu(gd.astype(mx.float32), ud.astype(mx.float32)))
        np.testing.assert_allclose(f64(y), want, rtol=rtol, atol=1e-30)
