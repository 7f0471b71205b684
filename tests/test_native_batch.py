"""The native steps over B rows (several sessions advanced at once) against the same steps one row at a time.

`transformer_step_batch` and `depth_frame_batch` read each weight once for all rows, but every row goes
through the one-row kernels, so row b of a batched call must be bit for bit the one-row call on row b alone:
in every weight format (fp32, bf16, 4 and 8 bits with fp32 or bf16 group scales), every matvec mode, every
kernel variant this CPU runs, and whatever the number of threads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from csmd import kernels
from csmd.kernels import native
from csmd.model.config import TINY, CsmConfig
from csmd.model.csm import CSM
from csmd.model.weights import build_model, quantize, random_params

if native.module is None:
    if os.environ.get("CSMD_REQUIRE_NATIVE") == "1":
        raise ImportError(f"CSMD_REQUIRE_NATIVE=1 but the native kernels did not load: {native.load_error}")
    pytest.skip(f"native kernels not built: {native.load_error}", allow_module_level=True)

cn: Any = native.module

# Weight formats: (bits, matvec mode, group scales' dtype). The mode only matters for quantized weights.
FORMATS = {
    "fp32": (0, "exact", None),
    "bf16": (16, "exact", None),
    **{
        f"q{bits}-{mode}-{scales}": (bits, mode, scales)
        for bits in (4, 8)
        for mode in ("exact", "int8", "int16")
        for scales in ("fp32", "bf16")
    },
}


@contextmanager
def settings(mode: str = "exact", variant: str = "auto", threads: int | None = None) -> Iterator[None]:
    """The kernels' process-wide settings for a block, put back after it."""
    before = cn.num_threads()
    try:
        cn.set_variant(variant)
        cn.set_matvec_mode(mode)
        if threads is not None:
            cn.set_num_threads(threads)
        yield
    finally:
        cn.set_num_threads(before)
        native.apply_variant()
        native.apply_matvec_mode()


def variants() -> list[str]:
    """The kernel variants this CPU runs."""
    runnable = []
    for name in ("scalar", "avx2", "avx512vnni", "neon"):
        try:
            cn.set_variant(name)
            runnable.append(name)
        except ValueError:
            pass
    native.apply_variant()
    return runnable


# -- the stack step ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stack:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int


# Inputs of 512 (8 groups of 64: the bf16-scale kernels' main loop), 128 (a tail of 2 groups) and 1024.
SMALL = Stack(layers=2, hidden=512, heads=4, kv_heads=2, head_dim=32, inter=1024)
# Attention over long caches runs on threads too.
THREADED = Stack(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, inter=1024)


def stack_weights(stack: Stack, bits: int, scales: str | None, seed: int = 0) -> list[mx.array]:
    """The flat weight list transformer_step takes, random, in one format (groups of 64)."""
    keys = iter(mx.random.split(mx.random.key(seed), stack.layers * 9))
    qd, kvd = stack.heads * stack.head_dim, stack.kv_heads * stack.head_dim
    flat: list[mx.array] = []

    def projection(out: int, inp: int) -> list[mx.array]:
        w = mx.random.normal((out, inp), key=next(keys)) * inp**-0.5
        if bits == 0:
            return [w]
        if bits == 16:
            return [w.astype(mx.bfloat16)]
        wq, s, b = mx.quantize(w, group_size=64, bits=bits)
        dtype = mx.bfloat16 if scales == "bf16" else mx.float32
        return [wq, s.astype(dtype), b.astype(dtype)]

    for _ in range(stack.layers):
        flat.append(1 + 0.1 * mx.random.normal((stack.hidden,), key=next(keys)))
        for out, inp in ((qd, stack.hidden), (kvd, stack.hidden), (kvd, stack.hidden), (stack.hidden, qd)):
            flat += projection(out, inp)
        flat.append(1 + 0.1 * mx.random.normal((stack.hidden,), key=next(keys)))
        for out, inp in ((stack.inter, stack.hidden), (stack.inter, stack.hidden), (stack.hidden, stack.inter)):
            flat += projection(out, inp)
    mx.eval(flat)
    return flat


def inv_freqs(head_dim: int) -> mx.array:
    return 1.0 / (500000.0 ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))


@dataclasses.dataclass
class Rows:
    """B rows of a batched step: inputs, caches of their own lengths, positions."""

    x: mx.array
    caches_k: list[mx.array]
    caches_v: list[mx.array]
    positions: list[int]


def make_rows(stack: Stack, lengths: list[int], seed: int, kv: mx.Dtype = mx.float32) -> Rows:
    rng = np.random.default_rng(seed)
    caches_k, caches_v, positions = [], [], []
    for length in lengths:
        shape = (stack.layers, stack.kv_heads, length, stack.head_dim)
        caches_k.append(mx.array(rng.standard_normal(shape, dtype=np.float32)).astype(kv))
        caches_v.append(mx.array(rng.standard_normal(shape, dtype=np.float32)).astype(kv))
        positions.append(int(rng.integers(0, length)))
    x = mx.array(rng.standard_normal((len(lengths), stack.hidden), dtype=np.float32))
    return Rows(x, caches_k, caches_v, positions)


def batched_step(stack: Stack, flat: list[mx.array], rows: Rows, bits: int) -> list[np.ndarray]:
    outs = kernels.transformer_step_batch(
        rows.x, flat, rows.caches_k, rows.caches_v, rows.positions, inv_freqs(stack.head_dim), stack.heads,
        stack.kv_heads, 1e-5, 64, bits,
    )  # fmt: skip
    mx.eval(*outs)
    return [np.array(a.astype(mx.float32)) for a in outs]  # bf16 rows widened: exact


def one_row_steps(stack: Stack, flat: list[mx.array], rows: Rows, bits: int) -> list[np.ndarray]:
    """Each row alone through the one-row step, stacked: what the batched step must give."""
    per_row = []
    for b, position in enumerate(rows.positions):
        outs = kernels.transformer_step(
            rows.x[b : b + 1], flat, rows.caches_k[b], rows.caches_v[b], position, inv_freqs(stack.head_dim),
            stack.heads, stack.kv_heads, 1e-5, 64, bits,
        )  # fmt: skip
        mx.eval(*outs)
        per_row.append([np.array(a.astype(mx.float32)) for a in outs])
    return [
        np.concatenate([r[0] for r in per_row]),
        np.stack([r[1] for r in per_row]),
        np.stack([r[2] for r in per_row]),
    ]


def assert_same_bits(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for name, g, w in zip(("h", "new_k", "new_v"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert np.array_equal(g, w), f"{name}: max difference {np.abs(g - w).max()}"


def lengths_for(batch: int) -> list[int]:
    """Caches of different lengths (contexts with different windows)."""
    return [5 + (37 * b) % 61 for b in range(batch)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_batched_step_rows_are_the_one_row_steps(fmt: str) -> None:
    bits, mode, scales = FORMATS[fmt]
    flat = stack_weights(SMALL, bits, scales)
    with settings(mode):
        assert kernels.fused_step_batch_available()
        for batch in range(1, 9):
            rows = make_rows(SMALL, lengths_for(batch), seed=batch)
            got = batched_step(SMALL, flat, rows, bits)
            assert got[0].shape == (batch, SMALL.hidden)
            assert got[1].shape == (batch, SMALL.layers, SMALL.kv_heads, SMALL.head_dim)
            assert_same_bits(got, one_row_steps(SMALL, flat, rows, bits))


@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("fmt", ["bf16", "q4-int8-bf16", "q4-int16-fp32", "q8-int8-bf16", "q4-exact-bf16"])
def test_batched_step_in_every_variant(variant: str, fmt: str) -> None:
    bits, mode, scales = FORMATS[fmt]
    flat = stack_weights(SMALL, bits, scales, seed=1)
    rows = make_rows(SMALL, lengths_for(5), seed=11)
    with settings(mode, variant):
        assert_same_bits(batched_step(SMALL, flat, rows, bits), one_row_steps(SMALL, flat, rows, bits))


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "q4-int8-bf16", "q4-exact-fp32", "q8-int16-bf16"])
def test_threads_change_no_bit_of_the_batched_step(fmt: str) -> None:
    """Products over >= 64 KB of weights and attention over hundreds of positions run on the pool; the
    number of threads (and so how rows and heads are split) must not show in the result."""
    bits, mode, scales = FORMATS[fmt]
    flat = stack_weights(THREADED, bits, scales, seed=2)
    rows = make_rows(THREADED, [300, 40, 513, 129, 260, 7], seed=3)
    results = {}
    for threads in (1, 2, 3):
        with settings(mode, threads=threads):
            results[threads] = batched_step(THREADED, flat, rows, bits)
            if threads == 2:
                assert_same_bits(results[2], one_row_steps(THREADED, flat, rows, bits))
    assert_same_bits(results[2], results[1])
    assert_same_bits(results[3], results[1])


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "q4-int8-bf16", "q8-exact-fp32"])
def test_batched_step_over_bf16_caches_rows_are_the_one_row_steps(fmt: str) -> None:
    """bf16 caches (read widened to fp32, the new rows returned rounded to bf16): the batched rows are still
    the one-row steps, bit for bit, and differ from the same step over fp32 caches."""
    bits, mode, scales = FORMATS[fmt]
    flat = stack_weights(SMALL, bits, scales, seed=4)
    with settings(mode):
        for batch in (1, 3, 8):
            rows = make_rows(SMALL, lengths_for(batch), seed=20 + batch, kv=mx.bfloat16)
            outs = kernels.transformer_step_batch(
                rows.x, flat, rows.caches_k, rows.caches_v, rows.positions, inv_freqs(SMALL.head_dim), SMALL.heads,
                SMALL.kv_heads, 1e-5, 64, bits,
            )  # fmt: skip
            assert outs[0].dtype == mx.float32 and outs[1].dtype == outs[2].dtype == mx.bfloat16
            got = batched_step(SMALL, flat, rows, bits)
            assert_same_bits(got, one_row_steps(SMALL, flat, rows, bits))
            widened = dataclasses.replace(
                rows,
                caches_k=[c.astype(mx.float32) for c in rows.caches_k],
                caches_v=[c.astype(mx.float32) for c in rows.caches_v],
            )
            fp32 = batched_step(SMALL, flat, widened, bits)
            # The same cached values, but the fp32 step keeps this position's own keys and values unrounded.
            assert not np.array_equal(got[0], fp32[0])
            np.testing.assert_allclose(got[0], fp32[0], rtol=0.05, atol=0.05 * np.abs(fp32[0]).max())


@pytest.mark.parametrize("fmt", ["fp32", "q4-int8-bf16"])
def test_threads_change_no_bit_of_the_batched_step_over_bf16_caches(fmt: str) -> None:
    bits, mode, scales = FORMATS[fmt]
    flat = stack_weights(THREADED, bits, scales, seed=5)
    rows = make_rows(THREADED, [300, 40, 513, 129], seed=6, kv=mx.bfloat16)
    results = {}
    for threads in (1, 2, 3):
        with settings(mode, threads=threads):
            results[threads] = batched_step(THREADED, flat, rows, bits)
    assert_same_bits(results[2], results[1])
    assert_same_bits(results[3], results[1])


def step_args(rows: Rows, flat: list[mx.array]) -> dict[str, Any]:
    return dict(
        x=rows.x, weights=flat, caches_k=rows.caches_k, caches_v=rows.caches_v, positions=rows.positions,
        inv_freqs=inv_freqs(SMALL.head_dim), num_heads=SMALL.heads, num_kv_heads=SMALL.kv_heads, eps=1e-5,
        group_size=64, bits=4,
    )  # fmt: skip


def bad_step_inputs() -> dict[str, tuple[Any, str]]:
    """Changes to good arguments (3 rows), each with the error it must raise."""
    cache = mx.zeros((SMALL.layers, SMALL.kv_heads, 8, SMALL.head_dim))
    half = cache.astype(mx.bfloat16)
    many = [cache] * 65
    return {
        "fewer caches_v": ({"caches_v": [cache] * 2}, "lists of one length"),
        "more positions": ({"positions": [0, 1, 2, 3]}, "lists of one length"),
        "no rows": ({"x": mx.zeros((0, SMALL.hidden)), "caches_k": [], "caches_v": [], "positions": []}, "1 to 64"),
        "65 rows": (
            {"x": mx.zeros((65, SMALL.hidden)), "caches_k": many, "caches_v": many, "positions": [0] * 65},
            "1 to 64",
        ),
        "x of other rows": ({"x": mx.zeros((2, SMALL.hidden))}, "one row per cache"),
        "position past the cache": ({"positions": [0, 8, 1]}, "row 1: position must be in"),
        "negative position": ({"positions": [0, 1, -1]}, "row 2: position must be in"),
        "kv heads": ({"caches_k": [cache, mx.zeros((2, 3, 8, 32)), cache]}, "row 1: cache_k and cache_v"),
        "other layers": (
            {"caches_k": [cache, cache, mx.zeros((3, 2, 8, 32))], "caches_v": [cache, cache, mx.zeros((3, 2, 8, 32))]},
            "row 2: cache .* differs from row 0",
        ),
        "wrong num_kv_heads": (
            {"caches_k": [mx.zeros((2, 1, 8, 32))] * 3, "caches_v": [mx.zeros((2, 1, 8, 32))] * 3},
            "cache dim 1 must equal num_kv_heads",
        ),
        "fp16 cache": ({"caches_v": [cache, cache, cache.astype(mx.float16)]}, "row 2: cache_k and cache_v"),
        "bf16 keys, fp32 values": (
            {"caches_k": [cache, cache.astype(mx.bfloat16), cache]},
            "row 1: cache_k and cache_v must be float32 or bfloat16 .* of one shape and dtype",
        ),
        "bf16 and fp32 rows": (
            {"caches_k": [cache, cache, half], "caches_v": [cache, cache, half]},
            "row 2: the caches of one step must share a dtype .* got bfloat16 after row 0's float32",
        ),
        "3-D cache": ({"caches_k": [cache[0]] * 3}, "cache_k must be float32"),
    }


@pytest.mark.parametrize("case", sorted(bad_step_inputs()))
def test_bad_batched_step_inputs_raise_value_error(case: str) -> None:
    flat = stack_weights(SMALL, 4, "bf16")
    cache = mx.zeros((SMALL.layers, SMALL.kv_heads, 8, SMALL.head_dim))
    rows = Rows(mx.zeros((3, SMALL.hidden)), [cache] * 3, [cache] * 3, [0, 1, 2])
    args = step_args(rows, flat)
    mx.eval(kernels.transformer_step_batch(**args))  # the unchanged arguments are good
    change, match = bad_step_inputs()[case]
    args.update(change)
    with pytest.raises(ValueError, match=match):
        mx.eval(kernels.transformer_step_batch(**args))


# -- the depth-decoder frame ------------------------------------------------------------------------------

# 64 wide: every decoder matrix, head and embedding quantizes in groups of 64.
WIDE = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, hidden_size=64, num_heads=4))
# Wide enough for the pool in the decoder's products and heads.
WIDER = dataclasses.replace(
    TINY,
    backbone=dataclasses.replace(TINY.backbone, hidden_size=256),
    decoder=dataclasses.replace(TINY.decoder, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=1024),
    audio_vocab_size=515,
    audio_codebook_size=512,
)

# One sampling rule per row: (temperature, top_k, top_p, min_p, reserved codes allowed). Greedy rows mix in.
RULES = [
    (0.0, 0, 1.0, 0.0, False),
    (0.9, 50, 1.0, 0.0, False),
    (1.2, 0, 0.8, 0.05, False),
    (0.0, 0, 1.0, 0.0, True),
    (0.7, 20, 0.9, 0.02, False),
    (2.0, 0, 1.0, 0.0, True),
]

FRAME_FORMATS = {"fp32": (mx.float32, 0, "exact"), "bf16": (mx.bfloat16, 0, "exact")} | {
    f"q{bits}-{mode}": (mx.float32, bits, mode) for bits in (4, 8) for mode in ("exact", "int8", "int16")
}


def frame_model(cfg: CsmConfig, fmt: str) -> CSM:
    dtype, bits, _ = FRAME_FORMATS[fmt]
    model = build_model(cfg, random_params(cfg, dtype, seed=7), dtype, "random")
    if bits:
        quantize(model, bits)
    return model


def frame_args(model: CSM) -> dict[str, Any]:
    weights = model.native_weights.depth_frame
    assert weights is not None
    dec = model.config.decoder
    return dict(
        stack=weights.stack, inv_freqs=model.decoder._inv_freqs, norm=model.decoder.norm.scale, heads=weights.heads,
        embeddings=weights.embeddings, projection=weights.projection, num_heads=dec.num_heads,
        num_kv_heads=dec.num_kv_heads, eps=dec.rms_norm_eps, group_size=weights.group_size, bits=weights.bits,
    )  # fmt: skip


def rule_lists(cfg: CsmConfig, rules: list[tuple[float, int, float, float, bool]]) -> dict[str, list[Any]]:
    return {
        "temperature": [r[0] for r in rules],
        "top_k": [r[1] for r in rules],
        "top_p": [r[2] for r in rules],
        "min_p": [r[3] for r in rules],
        "codebook_size": [cfg.audio_vocab_size if r[4] else cfg.audio_codebook_size for r in rules],
    }


def frame_inputs(cfg: CsmConfig, batch: int, seed: int, greedy: bool = False) -> tuple[mx.array, mx.array, list]:
    rules = [RULES[(seed + b) % len(RULES)] for b in range(batch)]
    if greedy:
        rules = [(0.0, 0, 1.0, 0.0, r[4]) for r in rules]
    key_x, key_noise = mx.random.split(mx.random.key(seed))
    x0 = mx.random.normal((batch, 2, cfg.decoder.hidden_size), key=key_x)
    shape = (batch, cfg.num_codebooks - 1, cfg.audio_vocab_size)
    noise = mx.zeros((0,)) if greedy else mx.random.gumbel(shape, key=key_noise)
    return x0, noise, rules


def batched_frame(model: CSM, x0: mx.array, noise: mx.array, rules: list) -> np.ndarray:
    codes = kernels.depth_frame_batch(x0, noise=noise, **frame_args(model), **rule_lists(model.config, rules))
    return np.array(codes)


def one_row_frames(model: CSM, x0: mx.array, noise: mx.array, rules: list) -> np.ndarray:
    frames = []
    for b, rule in enumerate(rules):
        one = {k: v[0] for k, v in rule_lists(model.config, [rule]).items()}
        row_noise = noise if noise.size == 0 else noise[b]
        frames.append(np.array(kernels.depth_frame(x0[b], noise=row_noise, **frame_args(model), **one)))
    return np.stack(frames)


@pytest.mark.parametrize("fmt", sorted(FRAME_FORMATS))
def test_batched_frame_rows_are_the_one_row_frames(fmt: str) -> None:
    model = frame_model(WIDE, fmt)
    with settings(FRAME_FORMATS[fmt][2]):
        assert kernels.depth_frame_batch_available()
        for batch in range(1, 9):
            x0, noise, rules = frame_inputs(WIDE, batch, seed=batch)
            got = batched_frame(model, x0, noise, rules)
            assert got.shape == (batch, WIDE.num_codebooks - 1) and got.dtype == np.int32
            assert np.array_equal(got, one_row_frames(model, x0, noise, rules))


@pytest.mark.parametrize("fmt", ["fp32", "q4-int8"])
def test_an_all_greedy_batch_needs_no_noise(fmt: str) -> None:
    model = frame_model(WIDE, fmt)
    with settings(FRAME_FORMATS[fmt][2]):
        x0, noise, rules = frame_inputs(WIDE, 4, seed=5, greedy=True)
        assert noise.size == 0
        assert np.array_equal(batched_frame(model, x0, noise, rules), one_row_frames(model, x0, noise, rules))


@pytest.mark.parametrize("fmt", ["bf16", "q4-int8", "q8-exact"])
def test_threads_change_no_code_of_the_batched_frame(fmt: str) -> None:
    model = frame_model(WIDER, fmt)
    x0, noise, rules = frame_inputs(WIDER, 5, seed=9)
    results = {}
    for threads in (1, 2, 3):
        with settings(FRAME_FORMATS[fmt][2], threads=threads):
            results[threads] = batched_frame(model, x0, noise, rules)
    assert np.array_equal(results[2], results[1]) and np.array_equal(results[3], results[1])
    with settings(FRAME_FORMATS[fmt][2]):
        assert np.array_equal(results[1], one_row_frames(model, x0, noise, rules))


def bad_frame_inputs() -> dict[str, tuple[dict[str, Any], str]]:
    """Changes to good arguments (3 rows, one greedy), each with the error it must raise."""
    c, v, h = WIDE.num_codebooks - 1, WIDE.audio_vocab_size, WIDE.decoder.hidden_size
    return {
        "fewer top_k": ({"top_k": [0, 0]}, "lists of one length"),
        "more codebook sizes": ({"codebook_size": [64] * 4}, "lists of one length"),
        "no rows": (
            {"x0": mx.zeros((0, 2, h)), **{k: [] for k in ("temperature", "top_k", "top_p", "min_p", "codebook_size")}},
            "1 to 64",
        ),
        "65 rows": (
            {
                "x0": mx.zeros((65, 2, h)),
                "noise": mx.zeros((65, c, v)),
                "temperature": [1.0] * 65,
                "top_k": [0] * 65,
                "top_p": [1.0] * 65,
                "min_p": [0.0] * 65,
                "codebook_size": [64] * 65,
            },
            "1 to 64",
        ),
        "x0 of other rows": ({"x0": mx.zeros((2, 2, h))}, "x0 must be float32 \\[rows, 2, hidden\\]"),
        "x0 of one row": ({"x0": mx.zeros((2, h))}, "x0 must be"),
        "noise of other rows": ({"noise": mx.zeros((2, c, v))}, "noise must be float32 \\[rows, codebooks, vocab\\]"),
        "no noise for sampled rows": ({"noise": mx.zeros((0,))}, "noise must be"),
        "bad temperature": ({"temperature": [0.0, -1.0, 1.0]}, "row 1: temperature"),
        "bad top_p": ({"top_p": [1.0, 1.0, 0.0]}, "row 2: bad sampling rule"),
        "bad codebook_size": ({"codebook_size": [0, 64, 64]}, "row 0: codebook_size"),
    }


@pytest.mark.parametrize("case", sorted(bad_frame_inputs()))
def test_bad_batched_frame_inputs_raise_value_error(case: str) -> None:
    model = frame_model(WIDE, "q4-int8")
    c, v, h = WIDE.num_codebooks - 1, WIDE.audio_vocab_size, WIDE.decoder.hidden_size
    args = frame_args(model) | {
        "x0": mx.zeros((3, 2, h)),
        "noise": mx.zeros((3, c, v)),
        "temperature": [0.0, 1.0, 1.0],
        "top_k": [0, 0, 0],
        "top_p": [1.0, 1.0, 1.0],
        "min_p": [0.0, 0.0, 0.0],
        "codebook_size": [64, 64, 64],
    }
    mx.eval(kernels.depth_frame_batch(**args))  # the unchanged arguments are good
    change, match = bad_frame_inputs()[case]
    args.update(change)
    with pytest.raises(ValueError, match=match):
        mx.eval(kernels.depth_frame_batch(**args))
