"""csmd bench frame's floors: bytes per frame, prefill FLOPs, the machine's rates, the transformers comparison.

Nothing here is timed: the benchmarks run on the tiny model and only their bookkeeping is checked.
"""

from __future__ import annotations

import dataclasses
import json
import math

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
