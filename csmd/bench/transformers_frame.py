"""The same frame and prefill on transformers' CsmForConditionalGeneration (torch, CPU), for comparison.

The model is built from csmd's config with random weights (no download) and timed the way transformers'
`generate` makes a frame (`CsmGenerationMixin._sample`): one backbone forward over the new row with the
KV cache and `output_hidden_states=True`, codebook 0 sampled from its logits, then
`depth_decoder.generate(...)` for codebooks 1..31 from the backbone's last hidden state. The depth decoder
is called through its own `generate` because that is what `_sample` calls per frame, generation machinery
(logits processors, stopping criteria, a fresh cache) included.

torch and transformers are test extras: imported here only, with a clear error when missing.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from csmd.model.config import CsmConfig
from csmd.model.sampling import GenerationParams


@dataclass
class TransformersFrameResult:
    dtype: str
    threads: int
    frames: int
    backbone_ms: float  # medians over the timed frames
    decoder_ms: float
    frame_ms: float
    prefill_rows: int
    prefill_ms: float
    context_rows: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _import() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise RuntimeError("--compare-transformers needs torch and transformers (pip install -e '.[test]')") from exc
    return torch, transformers


def hf_config(cfg: CsmConfig) -> Any:
    """transformers' CsmConfig with csmd's shapes; a tiny codec, which a frame never runs."""
    _, transformers = _import()

    def rope(t: Any) -> dict[str, Any]:
        s = t.rope_scaling
        if s is None:
            return {"rope_type": "default", "rope_theta": t.rope_theta}
        return {
            "rope_type": "llama3", "rope_theta": t.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }  # fmt: skip

    b, d = cfg.backbone, cfg.decoder
    codec = transformers.MimiConfig(
        hidden_size=32, num_filters=8, codebook_size=cfg.audio_codebook_size, codebook_dim=16,
        vector_quantization_hidden_dimension=16, num_quantizers=cfg.num_codebooks, num_semantic_quantizers=1,
        num_hidden_layers=1, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        upsample_groups=32, sliding_window=16, max_position_embeddings=256,
    )  # fmt: skip
    depth = transformers.CsmDepthDecoderConfig(
        num_codebooks=cfg.num_codebooks, backbone_hidden_size=b.hidden_size, vocab_size=cfg.audio_vocab_size,
        hidden_size=d.hidden_size, intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, head_dim=d.dim_per_head,
        max_position_embeddings=cfg.num_codebooks + 1, rms_norm_eps=d.rms_norm_eps, rope_parameters=rope(d),
    )  # fmt: skip
    text = cfg.text_vocab_size
    return transformers.CsmConfig(
        num_codebooks=cfg.num_codebooks, vocab_size=cfg.audio_vocab_size, text_vocab_size=text,
        hidden_size=b.hidden_size, intermediate_size=b.intermediate_size, num_hidden_layers=b.num_layers,
        num_attention_heads=b.num_heads, num_key_value_heads=b.num_kv_heads, head_dim=b.dim_per_head,
        max_position_embeddings=b.max_seq_len, rms_norm_eps=b.rms_norm_eps, rope_parameters=rope(b),
        pad_token_id=text - 2, codebook_pad_token_id=cfg.audio_vocab_size - 1, codebook_eos_token_id=0,
        bos_token_id=0, audio_token_id=text - 2, audio_eos_token_id=text - 1,
        depth_decoder_config=depth.to_dict(), codec_config=codec.to_dict(),
    )  # fmt: skip


def build(cfg: CsmConfig, dtype: str, seed: int = 0) -> Any:
    torch, transformers = _import()
    torch.manual_seed(seed)
    model = transformers.CsmForConditionalGeneration(hf_config(cfg)).eval()
    return model.to(_torch_dtype(dtype))


def _torch_dtype(name: str) -> Any:
    torch, _ = _import()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"transformers comparison: unsupported dtype {name!r}")
    return dtypes[name]


def run(
    cfg: CsmConfig,
    dtype: str = "float32",
    frames: int = 20,
    warmup: int = 3,
    prefill_rows: int = 300,
    prefill_repeats: int = 3,
    params: GenerationParams | None = None,
) -> TransformersFrameResult:
    """Build the model and time frames after a `prefill_rows` context, as csmd's `bench frame` does."""
    torch, _ = _import()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    params = params or GenerationParams()
    model = build(cfg, dtype)
    rng = np.random.default_rng(0)

    def prompt_embeds() -> Any:
        # Half text, half audio frames, as csmd's prefill; embedded the way transformers' forward does.
        n_text = prefill_rows // 2
        text = torch.from_numpy(rng.integers(0, cfg.text_vocab_size, size=(1, n_text)))
        audio = torch.from_numpy(
            rng.integers(1, cfg.audio_codebook_size, size=(1, prefill_rows - n_text, cfg.num_codebooks))
        )
        return torch.cat([model.embed_text_tokens(text), model.backbone_model.embed_tokens(audio)], dim=1)

    def sample(logits: Any) -> Any:
        top = torch.topk(logits.float() / params.temperature, min(params.top_k, logits.shape[-1]))
        pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1)
        return top.indices.gather(-1, pick)

    prefill_times, cache = [], None
    with torch.inference_mode():
        for _ in range(prefill_repeats):
            start = time.perf_counter()
            out = model(inputs_embeds=prompt_embeds(), use_cache=True, output_hidden_states=True, logits_to_keep=1)
            prefill_times.append(time.perf_counter() - start)
            cache = out.cache

        frame = torch.ones((1, 1, cfg.num_codebooks), dtype=torch.long)
        backbone_times, decoder_times = [], []
        for i in range(warmup + frames):
            start = time.perf_counter()
            out = model(input_ids=frame, cache=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
            code0 = sample(out.logits[:, -1, :])
            middle = time.perf_counter()
            codes = model.depth_decoder.generate(
                input_ids=torch.nn.functional.pad(code0, (1, 0), value=0),
                backbone_last_hidden_state=out.hidden_states[-1][:, -1, :].clone(),
                min_new_tokens=cfg.num_codebooks - 1,
                max_new_tokens=cfg.num_codebooks - 1,
                do_sample=True,
                temperature=params.temperature,
                top_k=params.top_k,
            )
            end = time.perf_counter()
            cache = out.cache
            frame = codes[:, None, 1:]
            if i >= warmup:
                backbone_times.append(middle - start)
                decoder_times.append(end - middle)

    return TransformersFrameResult(
        dtype=dtype,
        threads=threads,
        frames=frames,
        backbone_ms=round(1000 * statistics.median(backbone_times), 2),
        decoder_ms=round(1000 * statistics.median(decoder_times), 2),
        frame_ms=round(1000 * statistics.median(b + d for b, d in zip(backbone_times, decoder_times, strict=True)), 2),
        prefill_rows=prefill_rows,
        prefill_ms=round(1000 * statistics.median(prefill_times), 1),
        context_rows=prefill_rows,
    )
