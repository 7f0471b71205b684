"""csmd bench frame's floors: bytes per frame, prefill FLOPs, the machine's rates, the transformers comparison.

Nothing here is timed: the benchmarks run on the tiny model and only their bookkeeping is checked.
"""

from __future__ import annotations

import dataclasses
import json
import math

import mlx.core as mx
import numpy as np
import pytest

from csmd.bench import budget, machine
from csmd.bench.frame import run
from csmd.cli import main
from csmd.model.config import CSM_1B, TINY
from csmd.model.loading import load_model
from csmd.model.weights import quantize

F32 = 4
BF16 = 2


def q8(out: int, inputs: int) -> int:
    """An MLX 8-bit linear [out, inputs], groups of 64: one byte per weight + bf16 scale and bias per group."""
    return out * inputs + out * (inputs // 64) * 2 * BF16


def test_tiny_fp32_frame_bytes_match_a_hand_count() -> None:
    model = load_model("random:tiny").model
    # Backbone block (hidden 64, 4 heads / 2 KV heads of 16, MLP 128): q, k, v, o, w1, w2, w3, two norms.
    block = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    backbone = 2 * block + 64 + 67 * 64 + (1 + 4) * 64  # 2 blocks, norm, codebook0 head, 1 text + 4 audio rows
    # Decoder block (hidden 32, 2 heads / 1 KV head of 16, MLP 64).
    dblock = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    step = 2 * dblock + 32 + 32 * 64 + 32 * 67 + 64  # 2 blocks, norm, projection, audio_head[k], one code row
    context = 20
    kv = 2 * 2 * 2 * 16 * (context + 1) + 2 * 2 * 1 * 16 * (2 + 3 + 4)  # backbone; decoder steps see 2, 3, 4
    got = budget.frame_budget(model, context)
    assert got.backbone_bytes == backbone * F32
    assert got.decoder_step_bytes == step * F32
    assert got.kv_bytes == kv * F32
    assert got.total_bytes == (backbone + 3 * step + 32 * 64 + kv) * F32  # + the backbone state's projection


def test_quantized_frame_bytes_count_weights_scales_and_biases() -> None:
    # A decoder 64 wide, so every linear, embedding and audio_head quantizes (groups of 64 along the input).
    decoder = dataclasses.replace(TINY.decoder, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)
    model = load_model("random:tiny", config=dataclasses.replace(TINY, decoder=decoder)).model
    quantize(model, 8)
    block = q8(64, 64) + 2 * q8(32, 64) + q8(64, 64) + 2 * q8(128, 64) + q8(64, 128) + 2 * 64 * F32
    backbone = 2 * block + 64 * F32 + q8(67, 64) + 5 * q8(1, 64)
    step = 2 * block + 64 * F32 + q8(64, 64) + q8(67, 64) + q8(1, 64)  # same block shapes; audio_head[k] is 67x64
    got = budget.frame_budget(model, 0)
    assert got.backbone_bytes == backbone
    assert got.decoder_step_bytes == step
    assert got.total_bytes == backbone + 3 * step + q8(64, 64) + got.kv_bytes


def test_prefill_flops() -> None:
    linear = 64 * (2 * 64 + 2 * 32) + 3 * 64 * 128
    attention = 4 * 4 * 16 * (10 * 11 // 2)  # QK^T and AV, 2 FLOPs each, over the causal pairs
    assert budget.prefill_flops(TINY, 10) == 2 * (2 * 10 * linear + attention)
    assert budget.linear_weights_per_layer(CSM_1B.backbone) == 60_817_408


def test_machine_rates_are_positive_and_finite() -> None:
    rates = machine.measure(buffer_mib=4, gemm_size=64, repeats=2)
    for name, value in rates.as_dict().items():
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, name
    assert rates.bandwidth_gbs == max(rates.read_numpy_dot_gbs, rates.read_mlx_matvec_gbs, rates.read_mlx_sum_gbs)


def test_frame_result_carries_floor_and_prefill_rate() -> None:
    rates = machine.measure(buffer_mib=4, gemm_size=64, repeats=1)
    model = load_model("random:tiny").model
    r = run(model, "random:tiny", frames=2, warmup=1, prefill_rows=10, prefill_repeats=1, machine=rates)
    assert r.bytes_per_frame == budget.frame_budget(model, 11).total_bytes
    assert r.floor_ms == pytest.approx(r.bytes_per_frame / (rates.bandwidth_gbs * 1e9) * 1000, rel=1e-2, abs=1e-3)
    assert r.prefill_gflop == round(budget.prefill_flops(model.config, 10) / 1e9, 3)
    assert r.floor_ratio > 0 and r.prefill_gflops > 0 and r.prefill_gemm_ratio > 0
    assert r.machine == rates.as_dict()


def test_bench_frame_compare_transformers(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    args = ["bench", "frame", "--model", "random:tiny", "--frames", "2", "--warmup", "1", "--prefill", "10"]
    assert main([*args, "--prefill-repeats", "1", "--compare-transformers", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    theirs = result["transformers"]
    assert theirs["dtype"] == "float32" and theirs["frames"] == 2 and theirs["prefill_rows"] == 10
    ratio = result["frame_ms"] / theirs["frame_ms"]
    assert result["transformers_frame_ratio"] == pytest.approx(ratio, rel=1e-2, abs=1e-3)
    assert result["transformers_prefill_ratio"] > 0


def test_mimi_decode_budget_matches_the_hand_count() -> None:
    """Full-size Mimi, one streamed frame (BENCHMARKS.md, "the budget"): the transformer's 8 layers of
    3 * 512^2 + 512^2 + 2 * 512 * 2048 projection weights (plus norms and layer scales), 249 past steps of
    keys and values read once (their rings are written in place), the first conv (7 * 512 * 1024) and first upsampling
    (16 * 1024 * 512) on 2 rows, and 281.8 MFLOP of GEMMs at 16-1920 rows; with bf16 weights the
    weight-bound matrices halve."""
    from csmd.audio.mimi.loading import load_mimi
    from csmd.bench.codec import steady_state_frames
    from csmd.bench.codec_budget import decode_budget

    mimi = load_mimi("random:mimi")
    assert steady_state_frames(mimi) == 130  # 249 past steps at 2 a frame, and 5 more (bench codec's warm-up)
    b = decode_budget(mimi)
    projections = 8 * (4 * 512 * 512 + 2 * 512 * 2048)
    assert projections * 4 < b.transformer_bytes < projections * 4 + 200_000  # + norms, layer scales
    assert b.state_bytes == 2 * 8 * 249 * 512 * 4
    assert b.few_row_bytes == (7 * 512 * 1024 + 16 * 1024 * 512) * 4
    convs = [  # (rows, weights) of the GEMM-sized convolutions, stride by stride
        (16, 3 * 512 * 256), (16, 256 * 512), (16, 512 * 12 * 256),
        (96, 3 * 256 * 128), (96, 128 * 256), (96, 256 * 10 * 128),
        (480, 3 * 128 * 64), (480, 64 * 128), (480, 128 * 8 * 64),
        (1920, 3 * 64 * 32), (1920, 32 * 64), (1920, 3 * 64),
    ]  # fmt: skip
    assert b.gemm_flops == sum(2 * rows * weights for rows, weights in convs)
    assert b.floor_ms(bandwidth_gbs=40.0, gemm_gflops=200.0) == pytest.approx(
        1000 * (b.total_bytes / 40e9 + b.gemm_flops / 200e9)
    )
    for _, layer in mimi.decoder.named_modules():  # the MLX path (no packed panels) computes the same GEMMs
        if hasattr(layer, "_packed"):
            layer._packed = None
    assert decode_budget(mimi).gemm_flops == b.gemm_flops
    mimi.use_bf16_weights()
    half = decode_budget(mimi)
    assert half.few_row_bytes == b.few_row_bytes // 2
    assert half.transformer_bytes < 0.51 * b.transformer_bytes
    assert half.gemm_flops == b.gemm_flops and half.state_bytes == b.state_bytes


def test_bench_concurrency_reports_each_count_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "concurrency", "--model", "random:tiny", "--sessions", "1,3", "--frames", "4", "--warmup", "2"]
    assert main([*args, "--context", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["context_rows"] >= 40 and result["bandwidth_gbs"] > 0
    runs = {(r["sessions"], r["where"]): r for r in result["runs"]}
    assert set(runs) == {(1, "in-process"), (1, "daemon"), (3, "in-process"), (3, "daemon")}
    for (sessions, where), r in runs.items():
        assert r["frames"] == 3 and len(r["real_time_factors"]) == sessions  # 4 timed frames: 3 intervals
        assert r["aggregate_fps"] > 0 and 0 < r["interval_p50_ms"] <= r["interval_p95_ms"]
        if where == "in-process":
            assert r["floor_ms"] > 0 and r["floor_ratio"] == pytest.approx(r["step_ms"] / r["floor_ms"], rel=0.02)
            assert r["rss_mb"] > 0
    # The batched step's floor: the weights once, the KV caches once per session.
    assert runs[(3, "in-process")]["floor_ms"] > runs[(1, "in-process")]["floor_ms"] * 0.5


@pytest.mark.parametrize("value", ["0", "9", "1,,2", "two", "1,2,x"])
def test_bench_concurrency_refuses_bad_session_counts(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "concurrency", "--model", "random:tiny", "--sessions", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "--sessions" in err and "1 to 8" in err and len(err.splitlines()) == 1


# ---- precision schemes ----


def test_each_part_is_counted_at_its_own_bits() -> None:
    """csm-1b's shapes, quantized in layout only (nothing computed): a mixed scheme's backbone reads the backbone
    at the backbone's bits and the audio-embedding rows at the decoder's, and its decoder steps are the decoder's."""
    from csmd.model.config import CSM_1B
    from csmd.model.csm import CSM
    from csmd.model.quantization import QuantizationScheme

    def layout(scheme: str) -> CSM:
        model = CSM(CSM_1B)
        model.set_dtype(mx.bfloat16)
        quantize(model, QuantizationScheme.parse(scheme), layout_only=True)
        return model

    four, eight, mixed = layout("4"), layout("8"), layout("backbone=4,decoder=8")
    got = {name: budget.frame_budget(m, 300) for name, m in (("4", four), ("8", eight), ("mixed", mixed))}
    row_growth = budget.row_bytes(eight.audio_embeddings) - budget.row_bytes(four.audio_embeddings)
    audio_rows = CSM_1B.num_codebooks * row_growth
    assert got["mixed"].backbone_bytes == got["4"].backbone_bytes + audio_rows
    assert got["mixed"].decoder_step_bytes == got["8"].decoder_step_bytes
    assert got["4"].total_bytes < got["mixed"].total_bytes < got["8"].total_bytes


def test_teacher_forced_logits_are_the_generated_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """`backbone_states` and `teacher_forced_decoder_logits` on given codes compute what generating those codes
    computed, step by step: the same logits (the reference kernels, fp32; only summation order differs)."""
    from csmd.model.llama import make_cache

    monkeypatch.setenv("CSMD_KERNELS", "reference")
    model = load_model("random:tiny").model
    cfg = model.config
    tokens = mx.array(np.random.default_rng(0).integers(1, 60, size=(1, 5, cfg.num_codebooks + 1)).astype(np.int32))
    mask = mx.ones(tokens.shape, dtype=mx.bool_)
    hidden = model.backbone_step(tokens, mask, model.make_backbone_cache())
    states = model.backbone_states(tokens, mask, make_cache(cfg.backbone, 1, mx.float32, 8))
    np.testing.assert_allclose(np.array(states[:, -1]), np.array(hidden), rtol=1e-5, atol=1e-5)

    seen: list[np.ndarray] = []

    def greedy(logits: mx.array, codebook: int) -> mx.array:
        seen.append(np.array(logits))
        return mx.argmax(logits, axis=-1).astype(mx.int32)

    codes = model.decode_frame(hidden, mx.array([7], dtype=mx.int32), greedy)
    forced = np.array(model.teacher_forced_decoder_logits(hidden, codes))
    assert forced.shape == (1, cfg.num_codebooks - 1, cfg.audio_vocab_size)
    np.testing.assert_allclose(forced[0], np.concatenate(seen), rtol=1e-4, atol=1e-5)


def test_divergence_figures() -> None:
    from csmd.bench.precision import divergence, entropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 40)).astype(np.float32)
    same = divergence(logits, logits)
    assert same.kl == pytest.approx(0, abs=1e-12) and same.top1 == same.top5 == 1.0
    assert entropy(np.zeros((3, 8))) == pytest.approx(np.log(8), abs=1e-4)
    # Two codes: KL(p || q) in closed form.
    p, q = np.array([[0.0, np.log(3.0)]]), np.array([[0.0, 0.0]])
    half = divergence(p, q)
    assert half.kl == pytest.approx(0.25 * np.log(0.5) + 0.75 * np.log(1.5))  # p = (1/4, 3/4), q = (1/2, 1/2)
    # Reversing the ranking keeps no top-1 and none of the top 5 (of 40).
    flipped = divergence(logits, -logits)
    assert flipped.top1 == 0.0 and flipped.top5 == 0.0 and flipped.kl > same.kl
    shuffled = divergence(logits, logits + 0.3 * rng.normal(size=logits.shape))
    assert 0 < shuffled.kl < flipped.kl and 0 < shuffled.top5 <= 1


def test_precision_bench_on_random_tiny() -> None:
    """Each scheme scored on the reference's own frames: the bytes are the quantized model's budget, 8 bits
    diverge less than 4, and the figures are in range."""
    from csmd.bench.precision import PROMPT_ROWS, run
    from csmd.model.quantization import QuantizationScheme

    reference = load_model("random:tiny", dtype="bfloat16").model
    schemes = [QuantizationScheme.parse(s) for s in ("4", "8", "backbone=8,decoder=none")]
    r = run(reference, "random:tiny", schemes, frames=6)
    assert [s.scheme for s in r.schemes] == ["4", "8", "backbone=8,decoder=none"]
    assert r.frames == 6 and r.prompt_rows == PROMPT_ROWS and r.dtype == "bfloat16"
    assert r.reference_bytes_per_frame == budget.frame_budget(reference, PROMPT_ROWS + 6).total_bytes
    four, eight, backbone_only = r.schemes
    expected = load_model("random:tiny", dtype="bfloat16").model
    quantize(expected, 4)
    assert four.bytes_per_frame == budget.frame_budget(expected, PROMPT_ROWS + 6).total_bytes
    assert four.bytes_per_frame < eight.bytes_per_frame < backbone_only.bytes_per_frame < r.reference_bytes_per_frame
    for s in r.schemes:
        for d in (s.codebook0, s.depth):
            assert d.kl >= 0 and d.kl_p95 >= 0 and 0 <= d.top1 <= 1 and 0 <= d.top5 <= 1
    assert 0 < eight.codebook0.kl < four.codebook0.kl and 0 < eight.depth.kl < four.depth.kl
    assert 0 < r.codebook0_entropy <= r.flat_entropy and 0 < r.depth_entropy <= r.flat_entropy


def test_bench_precision_command(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "precision", "--model", "random:tiny", "--frames", "3"]
    assert main([*args, "--schemes", "backbone=4,decoder=8", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["scheme"] for s in result["schemes"]] == ["backbone=4,decoder=8", "8"]
    assert result["schemes"][0]["description"] == "backbone 4-bit, decoder 8-bit"
    assert result["reference_times"] is None and result["schemes"][0]["times"] is None  # no timing unless asked
    assert main([*args, "--timed-rounds", "2"]) == 0  # the default schemes, printed as a table, timed in turns
    out = capsys.readouterr().out
    assert "bfloat16 (reference)" in out and "backbone=8,decoder=4" in out and "proxy for quality" in out
    timed = [line for line in out.splitlines() if "depth decoder" in line]
    assert len(timed) == 5 and all("(6 frames)" in line for line in timed)  # 2 turns of 4, the first of each untimed


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--schemes", "16"], ["argument --schemes", "'16'"]),
        (["--schemes", "4", "backbone=4"], ["argument --schemes", "decoder's bits"]),
        (["--frames", "2040"], ["--frames 2040", "window of random:tiny (2048 rows)"]),
        (["--frames", "0"], ["argument --frames"]),
        (["--timed-rounds", "500"], ["--timed-rounds 500", "window of random:tiny"]),
        (["--timed-rounds", "-1"], ["argument --timed-rounds"]),
    ],
)
def test_bench_precision_refuses_bad_flags_in_one_line(
    flags: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a model before the arguments were checked")

    monkeypatch.setattr("csmd.model.loading.load_model", refuse)
    assert main(["bench", "precision", "--model", "random:tiny", *flags]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("csmd: error: ") and all(f in line for f in fragments), line


# ---- the KV cache's dtype ----


def test_bf16_kv_cache_halves_the_backbone_cache_bytes_of_a_frame() -> None:
    model = load_model("random:tiny").model
    cfg = model.config.backbone
    fp32, bf16 = budget.frame_budget(model, 300, mx.float32), budget.frame_budget(model, 300, mx.bfloat16)
    assert fp32.total_bytes - bf16.total_bytes == budget.kv_read_bytes(cfg, 301, BF16)
    assert budget.frame_budget(model, 300) == fp32  # default: the activations' dtype, fp32 here


def test_kv_cache_bench_on_random_tiny() -> None:
    """bf16 against fp32 on the same rows: half the bytes per session, logits close but not equal. Scoring an
    fp32 cache the same way replays the reference's own steps: no divergence at all."""
    from csmd.bench.kv_cache import run

    model = load_model("random:tiny").model
    cfg = model.config.backbone
    r = run(model, "random:tiny", context_rows=40, frames=6)
    full = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.max_seq_len * cfg.dim_per_head
    assert (r.reference.kv_cache, r.bf16.kv_cache) == ("float32", "bfloat16")
    assert r.reference.cache_mb == round(full * F32 / 1e6, 1) and r.bf16.cache_mb == round(full * BF16 / 1e6, 1)
    assert r.frames == 6 and r.context_rows == 40 and r.window == cfg.max_seq_len
    for d in (r.codebook0, r.depth):
        assert 0 < d.kl < 1e-3 and d.kl_p95 >= 0 and 0.5 <= d.top1 <= 1 and 0.5 <= d.top5 <= 1
    assert r.reference.session_rss_mb >= 0 and r.bf16.session_rss_mb >= 0
    same = run(model, "random:tiny", context_rows=40, frames=6, compared=mx.float32)
    for d in (same.codebook0, same.depth):
        assert d.kl == 0 and d.top1 == 1 and d.top5 == 1


def test_bench_kv_cache_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kv-cache", "--model", "random:tiny", "--context", "30", "--frames", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bf16"]["kv_cache"] == "bfloat16" and result["frames"] == 3 and result["context_rows"] == 30
    assert main(["bench", "kv-cache", "--model", "random:tiny", "--context", "30", "--frames", "3"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "bfloat16" in out and "proxy for quality" in out


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (
            ["--context", "2000", "--frames", "49"],
            ["--context 2000 + --frames 49 = 2049 rows", "window of random:tiny"],
        ),
        (["--frames", "0"], ["argument --frames"]),
        (["--context", "x"], ["argument --context"]),
        (["--quantize", "3"], ["argument --quantize"]),
    ],
)
def test_bench_kv_cache_refuses_bad_flags_in_one_line(
    flags: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a model before the arguments were checked")

    monkeypatch.setattr("csmd.model.loading.load_model", refuse)
    assert main(["bench", "kv-cache", "--model", "random:tiny", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csmd: error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]


def test_bench_frame_and_concurrency_take_the_kv_cache(capsys: pytest.CaptureFixture[str]) -> None:
    frame = ["bench", "frame", "--model", "random:tiny", "--frames", "2", "--warmup", "0", "--prefill", "10"]
    assert main([*frame, "--prefill-repeats", "1", "--kv-cache", "bf16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = load_model("random:tiny").model
    assert result["kv_cache"] == "bfloat16"
    assert result["bytes_per_frame"] == budget.frame_budget(model, 10, mx.bfloat16).total_bytes
    together = ["bench", "concurrency", "--model", "random:tiny", "--sessions", "1", "--frames", "2", "--warmup", "1"]
    assert main([*together, "--context", "20", "--no-daemon", "--kv-cache", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"] == "bfloat16"
