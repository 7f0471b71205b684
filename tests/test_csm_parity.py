"""csmd's CSM against transformers' CsmForConditionalGeneration, on tiny random weights (fp32, CPU).

The reference model is saved in HF format and loaded by csmd's loader, so these tests cover the key mapping,
the q/k un-permutation and the config reader as well as the maths. The same weights are then rewritten in
Sesame's naming (safetensors and .pt) and must give the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import tiny_hf_csm
import torch
from tiny_hf_csm import rel_err
from transformers import CsmForConditionalGeneration

from csmd.model.generator import Generator, audio_rows, text_rows
from csmd.model.loading import load_model
from csmd.model.sampling import GenerationParams

NQ, CB, TEXT_VOCAB = tiny_hf_csm.NQ, tiny_hf_csm.CB, tiny_hf_csm.TEXT_VOCAB


def conversation_rows(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A prompt as csmd lays it out: a text segment, its audio and EOS frame, then the reply's text."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(1, CB, size=(6, NQ))
    parts = [
        text_rows(rng.integers(3, TEXT_VOCAB - 3, size=5), NQ),
        audio_rows(np.concatenate([frames, np.zeros((1, NQ), dtype=np.int64)])),
        text_rows(rng.integers(3, TEXT_VOCAB - 3, size=4), NQ),
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def reference_embeddings(ref: CsmForConditionalGeneration, tokens: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """HF's own embedding modules applied row by row: text rows via embed_text_tokens, audio rows summed."""
    rows = []
    for tok_row, mask_row in zip(tokens, mask, strict=True):
        if mask_row[-1]:
            rows.append(ref.embed_text_tokens(torch.tensor([tok_row[-1]])))
        else:
            rows.append(ref.backbone_model.embed_tokens(torch.tensor(tok_row[None, None, :-1]))[0])
    return torch.cat(rows)[None]


def test_backbone_and_codebook0_logits_match_at_prefill_and_later_steps(
    hf_dir: Path, reference: CsmForConditionalGeneration
) -> None:
    model = load_model(str(hf_dir)).model
    tokens, mask = conversation_rows()
    with torch.no_grad():
        out = reference(inputs_embeds=reference_embeddings(reference, tokens, mask), use_cache=True)
        hidden_ref = reference.backbone_model(inputs_embeds=reference_embeddings(reference, tokens, mask))
    cache = model.make_backbone_cache()
    hidden = model.backbone(model.embed_rows(mx.array(tokens[None]), mx.array(mask[None])), cache)
    assert rel_err(hidden, hidden_ref.last_hidden_state) < 1e-4
    assert rel_err(model.codebook0_head(hidden), out.logits) < 1e-4

    # Later frames one row at a time, against HF's cache.
    past = out.cache
    rng = np.random.default_rng(2)
    for _ in range(5):
        step_tokens, step_mask = audio_rows(rng.integers(0, CB, size=(1, NQ)))
        with torch.no_grad():
            step = reference(inputs_embeds=reference_embeddings(reference, step_tokens, step_mask), cache=past)
        past = step.cache
        h = model.backbone_step(mx.array(step_tokens[None]), mx.array(step_mask[None]), cache)
        assert rel_err(model.codebook0_logits(h), step.logits[:, -1]) < 1e-4


def test_depth_decoder_logits_match_for_every_codebook(hf_dir: Path, reference: CsmForConditionalGeneration) -> None:
    model = load_model(str(hf_dir)).model
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((1, 64)).astype(np.float32)
    frame = rng.integers(0, CB, size=NQ)
    with torch.no_grad():
        ids = torch.tensor(np.concatenate([[0], frame[:-1]])[None])  # position 0 is replaced by the hidden state
        ref_logits = reference.depth_decoder(input_ids=ids, backbone_last_hidden_state=torch.tensor(hidden)).logits

    seen: list[mx.array] = []

    def teacher(logits: mx.array, codebook: int) -> mx.array:
        seen.append(logits)
        return mx.array([int(frame[codebook])], dtype=mx.int32)

    out = model.decode_frame(mx.array(hidden), mx.array([int(frame[0])], dtype=mx.int32), teacher)
    assert np.array_equal(np.array(out[0]), frame)
    assert len(seen) == NQ - 1
    for k, logits in enumerate(seen, start=1):
        assert rel_err(logits, ref_logits[:, k - 1]) < 1e-4, f"codebook {k}"


def test_greedy_generation_gives_identical_frames(hf_dir: Path, reference: CsmForConditionalGeneration) -> None:
    loaded = load_model(str(hf_dir))
    assert loaded.tokenizer is not None
    generator = Generator(loaded.model, loaded.tokenizer)
    text = "Hello there."
    params = GenerationParams(temperature=0.0, max_frames=20, allow_reserved_codes=True)
    utterance = generator.generate(generator.new_context(), text, 0, params)
    ids = loaded.tokenizer.encode_segment(0, text)
    with torch.no_grad():
        ref = reference.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=20, do_sample=False, depth_decoder_do_sample=False
        )
    ref_frames = ref.numpy()[0]
    assert ref_frames.shape == (20, NQ)  # the fixture's weights do not stop early
    assert utterance.finish_reason == "max_length"
    np.testing.assert_array_equal(utterance.codes, ref_frames)
