"""The generator's contract, on the tiny random model (fp32, CPU; nothing is downloaded).

A `Context` keeps a conversation in the backbone KV cache and only ever runs rows that are not cached yet.
Every test that touches the cache checks it against an independent from-scratch prefill: the expected rows
are built here from `TextTokenizer.encode_segment` and the codes (not with the generator's own helpers),
run through `model.backbone_step` with a fresh cache, and the keys/values and codebook-0 logits compared.

Random weights almost never emit the all-zero (EOS) frame, so the EOS tests use a copy of the model whose
codebook heads are all zero: every logit ties, greedy picks id 0 everywhere, and the first frame is EOS.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from trained_tokenizers import BOS, EOS, train_byte_level

from csmd.model import generator as generator_module
from csmd.model.config import TINY
from csmd.model.csm import CSM
from csmd.model.generator import (
    Context,
    ContextBusyError,
    ContextOverflowError,
    Generator,
    Segment,
    audio_rows,
    text_rows,
)
from csmd.model.llama import KVCache
from csmd.model.sampling import GenerationParams, sample, sampling_key
from csmd.model.tokenizer import TextTokenizer, TokenizerError
from csmd.model.weights import build_model, random_params

NQ = TINY.num_codebooks  # 4
CODES = TINY.audio_codebook_size  # 64 real codes (of 67 ids)
GREEDY = GenerationParams(temperature=0.0, max_frames=10, seed=0)
SAMPLED = GenerationParams(temperature=0.9, top_k=50, max_frames=10, seed=1234)
TOL = 1e-5  # rtol and atol of every float comparison

Rows = tuple[np.ndarray, np.ndarray]  # tokens [rows, NQ + 1] int32, mask of the same shape


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path: Path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_byte_level([BOS, EOS], vocab_size=280).save(str(path))
    tokenizer = TextTokenizer.from_file(path)
    assert tokenizer.vocab_size < TINY.text_vocab_size
    return tokenizer


def tiny_model(seed: int = 0, silent: bool = False) -> CSM:
    params = random_params(TINY, mx.float32, seed=seed)
    if silent:
        # Every codebook logit ties at 0, so greedy argmax picks id 0 everywhere: an all-zero (EOS) frame.
        params["codebook0_head.weight"] = mx.zeros_like(params["codebook0_head.weight"])
        params["audio_head"] = mx.zeros_like(params["audio_head"])
    return build_model(TINY, params, mx.float32, f"random:tiny:{seed}")


@pytest.fixture(scope="module")
def model() -> CSM:
    return tiny_model()


@pytest.fixture(scope="module")
def gen(model: CSM, tok: TextTokenizer) -> Generator:
    return Generator(model, tok)


@pytest.fixture(scope="module")
def silent_gen(tok: TextTokenizer) -> Generator:
    return Generator(tiny_model(silent=True), tok)


# -- helpers: expected rows and a cold prefill, built independently of the generator ------------------


def random_codes(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODES, size=(frames, NQ), dtype=np.int64)


def expected_rows(tok: TextTokenizer, speaker: int, text: str, codes: np.ndarray | None = None) -> Rows:
    """A turn's rows: one per text token (text column only), then per frame plus an all-zero EOS frame
    (audio columns only)."""
    ids = tok.encode_segment(speaker, text)
    audio = 0 if codes is None else len(codes) + 1
    tokens = np.zeros((len(ids) + audio, NQ + 1), dtype=np.int32)
    mask = np.zeros(tokens.shape, dtype=bool)
    tokens[: len(ids), NQ] = ids
    mask[: len(ids), NQ] = True
    if codes is not None:
        tokens[len(ids) : len(ids) + len(codes), :NQ] = codes  # the last row stays all-zero: EOS
        mask[len(ids) :, :NQ] = True
    return tokens, mask


def segment_rows(tok: TextTokenizer, segment: Segment) -> Rows:
    return expected_rows(tok, segment.speaker, segment.text, segment.codes)


def concat(*parts: Rows) -> Rows:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def prefill(model: CSM, rows: Rows) -> tuple[mx.array, KVCache]:
    """All rows at once through a fresh backbone cache: (hidden state of the last row, the cache)."""
    cache = model.make_backbone_cache(batch=1)
    hidden = model.backbone_step(mx.array(rows[0][None]), mx.array(rows[1][None]), cache)
    mx.eval(hidden)
    return hidden, cache


def assert_cache_holds(ctx: Context, rows: Rows) -> mx.array:
    """The context's cache is exactly a cold prefill of `rows`; returns that prefill's last hidden state."""
    n = len(rows[0])
    assert ctx.cached == n
    hidden, cold = prefill(ctx.model, rows)
    assert ctx._cache.offset == cold.offset == n
    for ours, ref in zip(ctx._cache.layers, cold.layers, strict=True):
        for got, want in ((ours.keys, ref.keys), (ours.values, ref.values)):
            np.testing.assert_allclose(np.array(got[:, :, :n]), np.array(want[:, :, :n]), rtol=TOL, atol=TOL)
    return hidden


def assert_same_logits(model: CSM, hidden: mx.array, reference: mx.array) -> None:
    np.testing.assert_allclose(
        np.array(model.codebook0_logits(hidden)),
        np.array(model.codebook0_logits(reference)),
        rtol=TOL,
        atol=TOL,
    )


def sized_segment(tok: TextTokenizer, speaker: int, text: str, rows: int, seed: int, pinned: bool = False) -> Segment:
    """A segment with codes, whose text + frames + EOS come to exactly `rows` rows."""
    frames = rows - len(tok.encode_segment(speaker, text)) - 1
    assert frames >= 0, "text too long for the requested size"
    return Segment(speaker, text, random_codes(frames, seed), pinned=pinned)


def state(ctx: Context) -> tuple[list[Segment], int, int, int]:
    return list(ctx.segments), ctx.length, ctx.cached, ctx.rows_computed


# -- row layout ----------------------------------------------------------------------------------------


def test_text_and_audio_rows_layout() -> None:
    tokens, mask = text_rows(np.array([5, 7], dtype=np.int32), NQ)
    assert tokens.tolist() == [[0, 0, 0, 0, 5], [0, 0, 0, 0, 7]]
    assert mask.tolist() == [[False] * NQ + [True]] * 2
    tokens, mask = audio_rows(np.array([[1, 2, 3, 4], [0, 0, 0, 0]]))
    assert tokens.tolist() == [[1, 2, 3, 4, 0], [0, 0, 0, 0, 0]]
    assert mask.tolist() == [[True] * NQ + [False]] * 2


# -- 1. appends only run new rows, and give what a cold prefill gives -----------------------------------


def test_warm_appends_match_a_cold_prefill(gen: Generator, tok: TextTokenizer, model: CSM) -> None:
    seg1 = Segment(0, "Hello there.")
    seg2 = Segment(1, "How are you today?", random_codes(6, seed=1))
    rows1, rows2 = segment_rows(tok, seg1), segment_rows(tok, seg2)
    reply = expected_rows(tok, 0, "The quick brown fox.")
    n1, n2, n3 = len(rows1[0]), len(rows2[0]), len(reply[0])

    ctx = gen.new_context()
    ctx.append(seg1)
    assert (ctx.rows_computed, ctx.cached, ctx.length) == (n1, n1, n1)
    ctx.append(seg2)
    assert (ctx.rows_computed, ctx.cached, ctx.length) == (n1 + n2, n1 + n2, n1 + n2)
    assert ctx.segments == [seg1, seg2]

    utt = gen.start(ctx, "The quick brown fox.", 0, GREEDY)
    assert ctx.rows_computed == n1 + n2 + n3  # nothing was run twice
    cold_hidden = assert_cache_holds(ctx, concat(rows1, rows2, reply))
    assert_same_logits(model, utt._hidden, cold_hidden)

    # Greedy: the first frame's codebook 0 is the best real code of those logits.
    frame = utt.step()
    assert frame is not None
    cold_logits = np.array(model.codebook0_logits(cold_hidden))[0]
    assert frame[0] == int(np.argmax(cold_logits[:CODES]))
    utt.cancel()


def test_prefill_in_chunks_matches_one_pass(
    gen: Generator, tok: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generator_module, "PREFILL_CHUNK", 7)
    seg = Segment(1, "Pack my box with five dozen liquor jugs.", random_codes(20, seed=2))
    ctx = gen.new_context()
    ctx.append(seg)
    rows = segment_rows(tok, seg)
    assert len(rows[0]) > 3 * 7
    assert ctx.rows_computed == len(rows[0])
    assert_cache_holds(ctx, rows)


# -- 2. a finished reply becomes a segment without being run again ---------------------------------------


def test_finished_utterance_becomes_a_segment(gen: Generator, tok: TextTokenizer, model: CSM) -> None:
    prompt = Segment(0, "Hello there.", random_codes(3, seed=3))
    ctx = gen.new_context()
    ctx.append(prompt)
    n_prompt = len(segment_rows(tok, prompt)[0])

    text = "How are you today?"
    utt = gen.start(ctx, text, 1, SAMPLED.replace(max_frames=5))
    frames = list(utt)
    assert utt.finish_reason == "max_length"
    assert len(frames) == 5
    assert not ctx.busy

    seg = ctx.segments[-1]
    assert (seg.speaker, seg.text, seg.pinned) == (1, text, False)
    assert seg.codes is not None
    np.testing.assert_array_equal(seg.codes, utt.codes)
    np.testing.assert_array_equal(utt.codes, np.stack(frames))
    n_text = len(tok.encode_segment(1, text))
    assert ctx.length == n_prompt + n_text + 5 + 1
    assert ctx.cached == n_prompt + n_text + 4  # the last frame and the EOS row are still pending

    # The reply's rows, built independently: its text, its 5 frames, an all-zero EOS row.
    reply_rows = expected_rows(tok, 1, text, np.stack(frames))
    following = Segment(0, "Sphinx of black quartz.", random_codes(4, seed=4))
    before = ctx.rows_computed
    ctx.append(following)
    assert ctx.rows_computed - before == 2 + len(segment_rows(tok, following)[0])
    history = concat(segment_rows(tok, prompt), reply_rows, segment_rows(tok, following))
    assert_cache_holds(ctx, history)

    # A reply right after a finished reply also only runs the pending rows plus its text.
    utt2 = gen.start(ctx, "Fine.", 1, SAMPLED.replace(max_frames=3))
    list(utt2)
    before = ctx.rows_computed
    utt3 = gen.start(ctx, "Good.", 0, GREEDY)
    second = expected_rows(tok, 1, "Fine.", utt2.codes)
    third = expected_rows(tok, 0, "Good.")
    assert ctx.rows_computed - before == 2 + len(third[0])
    cold_hidden = assert_cache_holds(ctx, concat(history, second, third))
    assert_same_logits(model, utt3._hidden, cold_hidden)
    utt3.cancel()


# -- 3. EOS ---------------------------------------------------------------------------------------------


def test_all_zero_frame_ends_the_utterance(silent_gen: Generator, tok: TextTokenizer) -> None:
    prompt = Segment(0, "Hello there.")
    ctx = silent_gen.new_context()
    ctx.append(prompt)
    n_prompt = len(segment_rows(tok, prompt)[0])
    utt = silent_gen.start(ctx, "Hi!", 1, GREEDY)
    assert utt.step() is None
    assert utt.finish_reason == "eos"
    assert utt.frames == []
    assert utt.codes.shape == (0, NQ)
    assert not ctx.busy

    n_text = len(tok.encode_segment(1, "Hi!"))
    assert ctx.length == n_prompt + n_text + 1  # text rows plus the EOS row
    assert ctx.cached == n_prompt + n_text  # the EOS row waits for whatever comes next
    seg = ctx.segments[-1]
    assert seg.codes is not None and seg.codes.shape == (0, NQ)

    following = Segment(0, "Okay.")
    ctx.append(following)
    eos_reply = expected_rows(tok, 1, "Hi!", np.zeros((0, NQ), dtype=np.int32))
    assert_cache_holds(ctx, concat(segment_rows(tok, prompt), eos_reply, segment_rows(tok, following)))


def test_only_a_wholly_zero_frame_is_eos(tok: TextTokenizer) -> None:
    # Codebook 0 always ties (greedy picks 0) but the depth decoder's heads are random: not an EOS frame.
    params = random_params(TINY, mx.float32)
    params["codebook0_head.weight"] = mx.zeros_like(params["codebook0_head.weight"])
    gen = Generator(build_model(TINY, params, mx.float32, "random:code0-silent"), tok)
    utt = gen.generate(gen.new_context(), "Hello there.", 0, GREEDY.replace(max_frames=3))
    assert utt.finish_reason == "max_length"
    assert len(utt.frames) == 3
    assert all(frame[0] == 0 and frame.any() for frame in utt.frames)


# -- 4. frame limit, cancel, iteration ------------------------------------------------------------------


def test_max_frames_limits_the_reply(gen: Generator) -> None:
    ctx = gen.new_context()
    utt = gen.start(ctx, "Hello there.", 0, SAMPLED.replace(max_frames=7))
    frames = [utt.step() for _ in range(7)]
    assert all(f is not None and f.shape == (NQ,) and f.dtype == np.int32 for f in frames)
    assert utt.done and utt.finish_reason == "max_length"
    assert utt.step() is None and utt.step() is None
    assert len(utt.frames) == 7
    assert all(((f >= 0) & (f < CODES)).all() for f in utt.frames)  # reserved ids are never emitted


def test_cancel_keeps_the_frames_so_far(gen: Generator, tok: TextTokenizer) -> None:
    ctx = gen.new_context()
    utt = gen.start(ctx, "Hello there.", 0, SAMPLED)
    made: list[np.ndarray] = []
    for _ in range(3):
        frame = utt.step()
        assert frame is not None
        made.append(frame)
    utt.cancel()
    assert utt.finish_reason == "cancelled"
    assert utt.step() is None
    assert not ctx.busy
    utt.cancel()  # a second cancel changes nothing
    assert utt.finish_reason == "cancelled"
    np.testing.assert_array_equal(utt.codes, np.stack(made))
    seg = ctx.segments[-1]
    assert seg.codes is not None
    np.testing.assert_array_equal(seg.codes, np.stack(made))
    n_text = len(tok.encode_segment(0, "Hello there."))
    assert ctx.length == n_text + 3 + 1
    assert ctx.cached == n_text + 2


def test_cancel_before_any_frame(gen: Generator, tok: TextTokenizer) -> None:
    ctx = gen.new_context()
    utt = gen.start(ctx, "Hello there.", 0, SAMPLED)
    utt.cancel()
    assert utt.finish_reason == "cancelled"
    assert utt.step() is None
    assert ctx.segments[-1].codes is not None and ctx.segments[-1].codes.shape == (0, NQ)
    ctx.append(Segment(1, "Okay."))
    empty = np.zeros((0, NQ), dtype=np.int32)
    assert_cache_holds(ctx, concat(expected_rows(tok, 0, "Hello there.", empty), expected_rows(tok, 1, "Okay.")))


def test_iterating_gives_the_same_frames_as_step(gen: Generator) -> None:
    iterated = list(gen.start(gen.new_context(), "Hello there.", 0, SAMPLED))
    stepped_utt = gen.start(gen.new_context(), "Hello there.", 0, SAMPLED)
    stepped = []
    while (frame := stepped_utt.step()) is not None:
        stepped.append(frame)
    assert len(iterated) == len(stepped) == SAMPLED.max_frames
    np.testing.assert_array_equal(np.stack(iterated), np.stack(stepped))


def test_flushing_a_speaking_context_is_refused_and_changes_nothing(gen: Generator) -> None:
    params = GREEDY.replace(max_frames=4)
    expected = gen.generate(gen.new_context(), "Hello there.", 0, params).codes
    ctx = gen.new_context()
    utt = gen.start(ctx, "Hello there.", 0, params)
    frames = []
    while (frame := utt.step()) is not None:
        frames.append(frame)
        if not utt.done:
            with pytest.raises(ContextBusyError):
                ctx.flush()
    np.testing.assert_array_equal(np.stack(frames), expected)


# -- 5. a speaking context is busy ----------------------------------------------------------------------


def test_busy_context_refuses_changes(gen: Generator) -> None:
    ctx = gen.new_context()
    ctx.append(Segment(0, "Hello there."))
    utt = gen.start(ctx, "Hi!", 1, SAMPLED)
    utt.step()
    assert ctx.busy
    before = state(ctx)
    with pytest.raises(ContextBusyError):
        ctx.append(Segment(0, "Wait."))
    with pytest.raises(ContextBusyError):
        gen.start(ctx, "Me too.", 0, SAMPLED)
    with pytest.raises(ContextBusyError):
        ctx.clear()
    assert state(ctx) == before

    # Other contexts on the same weights are not affected.
    other = gen.new_context()
    other.append(Segment(0, "Hello there."))
    assert other.length > 0

    utt.cancel()
    assert not ctx.busy
    ctx.append(Segment(0, "Wait."))
    gen.generate(ctx, "Me too.", 0, SAMPLED.replace(max_frames=2))
    assert not ctx.busy
    ctx.clear()
    assert (ctx.segments, ctx.length, ctx.cached) == ([], 0, 0)


def test_clear_forgets_everything_and_starts_over(gen: Generator, tok: TextTokenizer) -> None:
    ctx = gen.new_context()
    ctx.append(Segment(0, "Hello there.", random_codes(2, seed=5), pinned=True))
    ctx.append(Segment(1, "Hi!"))
    ctx.clear()
    assert (ctx.segments, ctx.length, ctx.cached) == ([], 0, 0)
    seg = Segment(1, "How are you today?", random_codes(3, seed=6))
    ctx.append(seg)
    assert_cache_holds(ctx, segment_rows(tok, seg))


# -- 6. seeds -------------------------------------------------------------------------------------------


def speak(gen: Generator, params: GenerationParams) -> tuple[np.ndarray, int]:
    """The same conversation and reply in a fresh context each time; (codes, seed used)."""
    ctx = gen.new_context()
    ctx.append(Segment(0, "Hello there.", random_codes(4, seed=7)))
    utt = gen.generate(ctx, "How are you today?", 1, params)
    assert utt.finish_reason == "max_length"
    return utt.codes, utt.seed


def test_same_seed_same_frames(gen: Generator) -> None:
    first, seed = speak(gen, SAMPLED)
    again, _ = speak(gen, SAMPLED)
    assert seed == SAMPLED.seed
    assert first.shape == (SAMPLED.max_frames, NQ)
    np.testing.assert_array_equal(first, again)


def test_different_seeds_different_frames(gen: Generator) -> None:
    a, _ = speak(gen, SAMPLED.replace(seed=1))
    b, _ = speak(gen, SAMPLED.replace(seed=2))
    assert not np.array_equal(a, b)


def test_any_frame_can_be_reproduced_from_its_own_keys(gen: Generator, tok: TextTokenizer, model: CSM) -> None:
    # Frame i uses sampling_key(seed, i, codebook) for every codebook, whatever came before it.
    utt = gen.generate(gen.new_context(), "Hello there.", 0, SAMPLED.replace(max_frames=3))
    seed = utt.seed
    # Frames 0 and 1 are in the cache when frame 2 is made; the EOS row is not.
    tokens, mask = expected_rows(tok, 0, "Hello there.", utt.codes[:2])
    hidden, _ = prefill(model, (tokens[:-1], mask[:-1]))

    def pick(logits: mx.array, codebook: int) -> mx.array:
        return sample(logits, SAMPLED, CODES, sampling_key(seed, 2, codebook))

    code0 = pick(model.codebook0_logits(hidden), 0)
    frame = model.decode_frame(hidden, code0, pick)
    np.testing.assert_array_equal(np.array(frame[0]), utt.frames[2])


def test_unseeded_reply_reports_a_reproducible_seed(gen: Generator) -> None:
    codes, seed = speak(gen, SAMPLED.replace(seed=None))
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again, _ = speak(gen, SAMPLED.replace(seed=seed))
    np.testing.assert_array_equal(codes, again)


# -- 7. window overflow ---------------------------------------------------------------------------------

WINDOW = 64


@pytest.fixture
def voice(tok: TextTokenizer) -> Segment:
    return sized_segment(tok, 0, "Hello there.", 16, seed=10, pinned=True)


@pytest.fixture
def turns(tok: TextTokenizer) -> list[Segment]:
    """Three unpinned 16-row segments A, B, C and a 20-row D."""
    return [
        sized_segment(tok, 1, "Hi!", 16, seed=11),
        sized_segment(tok, 0, "Hey.", 16, seed=12),
        sized_segment(tok, 1, "Yes.", 16, seed=13),
        sized_segment(tok, 0, "No.", 20, seed=14),
    ]


def test_overflow_drops_the_oldest_unpinned_segment(
    gen: Generator, tok: TextTokenizer, voice: Segment, turns: list[Segment]
) -> None:
    a, b, _, d = turns
    ctx = gen.new_context(max_positions=WINDOW)
    assert ctx.window == WINDOW
    for seg in (voice, a, b):
        ctx.append(seg)
    assert ctx.length == 48
    before = ctx.rows_computed
    ctx.append(d)  # 48 + 20 > 64: A goes
    assert ctx.segments == [voice, b, d]
    assert ctx.length == ctx.cached == 52
    # The pinned voice prompt before A stays cached; B is re-run at its new position, then D.
    assert ctx.rows_computed - before == 16 + 20
    assert_cache_holds(ctx, concat(*(segment_rows(tok, s) for s in (voice, b, d))))


def test_overflow_with_pinned_segment_in_the_middle(
    gen: Generator, tok: TextTokenizer, voice: Segment, turns: list[Segment]
) -> None:
    a, b, _, d = turns
    ctx = gen.new_context(max_positions=WINDOW)
    for seg in (a, voice, b):
        ctx.append(seg)
    before = ctx.rows_computed
    ctx.append(d)
    assert ctx.segments == [voice, b, d]
    assert ctx.rows_computed - before == 16 + 16 + 20  # nothing before A: everything runs again
    assert_cache_holds(ctx, concat(*(segment_rows(tok, s) for s in (voice, b, d))))


def test_overflow_drops_as_many_segments_as_needed(
    gen: Generator, tok: TextTokenizer, voice: Segment, turns: list[Segment]
) -> None:
    a, b, c, _ = turns
    big = sized_segment(tok, 1, "Okay.", 40, seed=15)
    ctx = gen.new_context(max_positions=WINDOW)
    for seg in (voice, a, b, c):
        ctx.append(seg)
    assert ctx.length == WINDOW  # exactly full is fine
    assert ctx.segments == [voice, a, b, c]
    ctx.append(big)  # 64 + 40 > 64: A and B are not enough (64 + 40 - 32 = 72), C goes too
    assert ctx.segments == [voice, big]
    assert_cache_holds(ctx, concat(segment_rows(tok, voice), segment_rows(tok, big)))


def test_reply_makes_room_for_text_frames_and_eos(
    gen: Generator, tok: TextTokenizer, model: CSM, voice: Segment, turns: list[Segment]
) -> None:
    a, b, _, _ = turns
    ctx = gen.new_context(max_positions=WINDOW)
    for seg in (voice, a, b):
        ctx.append(seg)
    n_text = len(tok.encode_segment(1, "Hello there."))
    # 48 + text + 10 frames + EOS does not fit; dropping A makes it fit.
    assert 48 + n_text + 11 > WINDOW >= 32 + n_text + 11
    utt = gen.start(ctx, "Hello there.", 1, SAMPLED)
    assert ctx.segments[:2] == [voice, b]
    cold_hidden = assert_cache_holds(
        ctx, concat(segment_rows(tok, voice), segment_rows(tok, b), expected_rows(tok, 1, "Hello there."))
    )
    assert_same_logits(model, utt._hidden, cold_hidden)
    list(utt)  # the reserved room really holds every frame
    assert utt.finish_reason == "max_length"
    assert ctx.length == 32 + n_text + 11 <= WINDOW


def test_reply_too_big_for_the_pinned_room_fails_before_any_work(
    gen: Generator, tok: TextTokenizer, voice: Segment, turns: list[Segment]
) -> None:
    ctx = gen.new_context(max_positions=WINDOW)
    for seg in (voice, turns[0]):
        ctx.append(seg)
    n_text = len(tok.encode_segment(1, "Hello there."))
    most = WINDOW - 16 - n_text - 1  # the largest max_frames that fits beside the pinned prompt
    before = state(ctx)
    with pytest.raises(ContextOverflowError, match="window"):
        gen.start(ctx, "Hello there.", 1, SAMPLED.replace(max_frames=most + 1))
    assert state(ctx) == before
    assert not ctx.busy

    utt = gen.start(ctx, "Hello there.", 1, SAMPLED.replace(max_frames=most))
    assert ctx.segments[0] == voice and len(ctx.segments) == 2  # the unpinned turn made way
    utt.cancel()


def test_segment_too_big_for_the_window_fails(
    gen: Generator, tok: TextTokenizer, voice: Segment, turns: list[Segment]
) -> None:
    ctx = gen.new_context(max_positions=WINDOW)
    with pytest.raises(ContextOverflowError):
        ctx.append(sized_segment(tok, 1, "Hi!", WINDOW + 1, seed=16))
    assert state(ctx) == ([], 0, 0, 0)

    ctx.append(voice)
    ctx.append(turns[0])
    before = state(ctx)
    with pytest.raises(ContextOverflowError):  # fits an empty window, but not beside the pinned 16 rows
        ctx.append(sized_segment(tok, 1, "Hi!", WINDOW - 15, seed=17))
    assert state(ctx) == before
    ctx.append(sized_segment(tok, 1, "Hi!", WINDOW - 16, seed=18))
    assert ctx.segments[0] == voice and ctx.length == WINDOW


# -- 8. validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (np.zeros((3, NQ - 1), dtype=np.int32), r"shape \[frames, 4\]"),
        (np.zeros((3, NQ + 1), dtype=np.int32), r"shape \[frames, 4\]"),
        (np.zeros(NQ, dtype=np.int32), r"shape \[frames, 4\]"),
        (np.zeros((2, 3, NQ), dtype=np.int32), r"shape \[frames, 4\]"),
        (np.zeros((3, NQ), dtype=np.float32), "integers"),
        (np.zeros((3, NQ), dtype=bool), "integers"),
        (np.full((3, NQ), TINY.audio_vocab_size), r"\[0, 67\)"),
        (np.full((3, NQ), -1), r"\[0, 67\)"),
    ],
    ids=["too-few-codebooks", "too-many-codebooks", "1-d", "3-d", "float", "bool", "too-high", "negative"],
)
def test_bad_codes_are_rejected(gen: Generator, codes: np.ndarray, message: str) -> None:
    ctx = gen.new_context()
    ctx.append(Segment(0, "Hello there."))
    before = state(ctx)
    with pytest.raises(ValueError, match=message):
        ctx.append(Segment(1, "Hi!", codes))
    assert state(ctx) == before


def test_any_integer_dtype_and_every_id_in_range_is_accepted(gen: Generator, tok: TextTokenizer) -> None:
    codes = np.array([[0, 1, 2, 3], [66, 65, 64, 63]], dtype=np.uint8)
    ctx = gen.new_context()
    ctx.append(Segment(1, "Hi!", codes))
    assert_cache_holds(ctx, expected_rows(tok, 1, "Hi!", codes))


def test_bad_speaker_is_a_tokenizer_error(gen: Generator) -> None:
    ctx = gen.new_context()
    with pytest.raises(TokenizerError, match="speaker"):
        ctx.append(Segment(-1, "Hello there."))
    with pytest.raises(TokenizerError, match="speaker"):
        gen.start(ctx, "Hello there.", -1, SAMPLED)
    assert state(ctx) == ([], 0, 0, 0)
    assert not ctx.busy


def test_context_of_another_model_is_rejected(gen: Generator, tok: TextTokenizer) -> None:
    other = Generator(tiny_model(seed=1), tok)
    ctx = other.new_context()
    with pytest.raises(ValueError, match="another model"):
        gen.start(ctx, "Hello there.", 0, SAMPLED)
    assert state(ctx) == ([], 0, 0, 0)


def test_model_without_tokenizer(model: CSM) -> None:
    gen = Generator(model, None)
    ctx = gen.new_context()
    with pytest.raises(ValueError, match="tokenizer"):
        gen.start(ctx, "Hello there.", 0, SAMPLED)
    with pytest.raises(ValueError, match="tokenizer"):
        ctx.append(Segment(0, "Hello there."))
    assert state(ctx) == ([], 0, 0, 0)


def test_invalid_params_are_rejected_before_any_work(gen: Generator) -> None:
    ctx = gen.new_context()
    with pytest.raises(ValueError, match="top_p"):
        gen.start(ctx, "Hello there.", 0, GenerationParams(top_p=0.0))
    assert state(ctx) == ([], 0, 0, 0)


def test_tokenizer_larger_than_the_model_vocabulary(model: CSM, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    train_byte_level([BOS, EOS], vocab_size=400).save(str(path))
    big = TextTokenizer.from_file(path)
    text = "The quick brown fox jumps over the lazy dog."
    assert max(big.encode_segment(0, text)) >= TINY.text_vocab_size
    ctx = Generator(model, big).new_context()
    with pytest.raises(ValueError, match="text vocabulary is 300"):
        ctx.append(Segment(0, text))
    assert state(ctx) == ([], 0, 0, 0)


def test_window_may_be_smaller_than_the_model_s(gen: Generator) -> None:
    assert gen.new_context().window == TINY.backbone.max_seq_len
    assert gen.new_context(max_positions=TINY.backbone.max_seq_len).window == TINY.backbone.max_seq_len
    assert gen.new_context(max_positions=1).window == 1


@pytest.mark.parametrize("max_positions", [TINY.backbone.max_seq_len + 1, 0])
def test_window_outside_the_model_s_range_is_rejected(gen: Generator, max_positions: int) -> None:
    with pytest.raises(ValueError, match=r"max_positions|window"):
        gen.new_context(max_positions=max_positions)


# -- 9. generate() ------------------------------------------------------------------------------------


def test_generate_calls_on_frame_with_each_frame_in_order(gen: Generator) -> None:
    seen: list[np.ndarray] = []
    utt = gen.generate(gen.new_context(), "Hello there.", 0, SAMPLED, on_frame=seen.append)
    assert len(seen) == len(utt.frames) == SAMPLED.max_frames
    for got, frame in zip(seen, utt.frames, strict=True):
        np.testing.assert_array_equal(got, frame)
    stepped = list(gen.start(gen.new_context(), "Hello there.", 0, SAMPLED))
    np.testing.assert_array_equal(np.stack(seen), np.stack(stepped))


def test_generate_ends_the_utterance_if_on_frame_raises(gen: Generator) -> None:
    class Hangup(Exception):
        pass

    seen: list[np.ndarray] = []

    def on_frame(frame: np.ndarray) -> None:
        seen.append(frame)
        if len(seen) == 2:
            raise Hangup

    ctx = gen.new_context()
    with pytest.raises(Hangup):
        gen.generate(ctx, "Hello there.", 0, SAMPLED, on_frame=on_frame)
    assert not ctx.busy
    ctx.append(Segment(1, "Hello?"))


def test_generate_on_silent_model_calls_nothing(silent_gen: Generator) -> None:
    seen: list[np.ndarray] = []
    utt = silent_gen.generate(silent_gen.new_context(), "Hi!", 0, GREEDY, on_frame=seen.append)
    assert utt.finish_reason == "eos"
    assert seen == []


def test_trim_last_keeps_only_what_was_heard(gen: Generator, tok: TextTokenizer) -> None:
    """Barge-in: an interrupted reply stays in the context only as far as it was played."""
    ctx = gen.new_context()
    ctx.append(Segment(0, "Hello there."))
    before_reply = ctx.length
    utt = gen.start(ctx, "A reply that gets interrupted.", 1, GREEDY.replace(max_frames=6))
    frames = list(utt)
    assert len(frames) == 6
    segment = ctx.trim_last(2, "A reply")
    assert segment.text == "A reply" and np.array_equal(segment.codes, np.stack(frames[:2]))
    assert ctx.cached == before_reply  # rows before the reply stay cached; the reply's rows run again
    ctx.flush()
    assert_cache_holds(ctx, concat(segment_rows(tok, Segment(0, "Hello there.")), segment_rows(tok, segment)))
    with pytest.raises(ValueError, match=r"frames must be in 0\.\.2"):
        ctx.trim_last(3, "x")
