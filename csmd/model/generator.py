"""Frame-by-frame speech generation that keeps a conversation in its KV cache.

A `Context` is one conversation: its segments (who said what, with which Mimi codes) and the backbone KV
cache holding them. Rows only ever get appended, so the cache is always a prefix of the conversation; work
is only done for rows past that prefix. A reply is an `Utterance`: `step()` makes one frame of codes, and
when it ends (all-zero frame, frame limit, or `cancel()`) it stays in the context as a segment. Its frames
are already in the cache; only its closing rows are run later, together with whatever comes next.

Window overflow: the backbone sees at most `max_seq_len` (2048) rows. When a new segment or reply would not
fit, the oldest unpinned segments are dropped and the rows after the first dropped one are run again
(the cached rows before it stay valid). Pinned segments, such as a voice prompt, are never dropped; if
they alone leave no room, that is an error before any work is done.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import numpy as np

from csmd.model.csm import CSM
from csmd.model.sampling import FrameSampler, GenerationParams
from csmd.model.tokenizer import TextTokenizer

FinishReason = Literal["eos", "max_length", "cancelled"]
PREFILL_CHUNK = 512  # rows per backbone call when catching up; bounds attention memory


class ContextOverflowError(ValueError):
    """The pinned segments plus the new material do not fit in the model's window."""


class ContextBusyError(RuntimeError):
    """The context is speaking; wait for the utterance to end or cancel it."""


class ContextRequestError(ValueError):
    """A request that does not fit the context as it is now (trimming more frames than a reply has, a reply
    no longer in the context): the caller's mistake, unlike other ValueErrors, which are bugs."""


@dataclass(frozen=True)
class Segment:
    """One turn: a speaker id, what was said, and (for recorded or generated speech) its Mimi codes."""

    speaker: int
    text: str
    codes: np.ndarray | None = None  # [frames, num_codebooks] integer codes
    pinned: bool = False  # survives window overflow (e.g. a voice prompt)


@dataclass
class _Entry:
    segment: Segment
    tokens: np.ndarray  # [rows, num_codebooks + 1]
    mask: np.ndarray  # same shape, bool
    # The utterance that spoke it, if it was a reply. Weak: an utterance refers to its context, so a strong
    # reference would make every context a cycle that only the garbage collector frees (its KV cache with it).
    reply: weakref.ref[Utterance] | None = None

    def spoken_by(self, utterance: Utterance) -> bool:
        return self.reply is not None and self.reply() is utterance


class Context:
    """A conversation's segments and the backbone KV cache that holds them (batch of one)."""

    def __init__(
        self,
        model: CSM,
        tokenizer: TextTokenizer | None,
        max_positions: int | None = None,
        kv_dtype: mx.Dtype | None = None,
    ):
        """kv_dtype: the backbone cache's (`CSM.make_backbone_cache`; None: as computed)."""
        window = model.config.backbone.max_seq_len
        if max_positions is not None and not 1 <= max_positions <= window:
            raise ValueError(f"max_positions must be in 1..{window} (the model's window), got {max_positions}")
        self.model = model
        self.tokenizer = tokenizer
        self._cache = model.make_backbone_cache(batch=1, max_len=max_positions, dtype=kv_dtype)
        self._entries: list[_Entry] = []
        self._active: Utterance | None = None
        self.rows_computed = 0  # backbone rows run so far, re-runs included (tests and stats read it)

    @property
    def window(self) -> int:
        return self._cache.max_len

    @property
    def kv_dtype(self) -> mx.Dtype:
        return self._cache.dtype

    @property
    def length(self) -> int:
        """Rows in the conversation, whether or not they are in the cache yet."""
        return sum(len(e.tokens) for e in self._entries)

    @property
    def cached(self) -> int:
        return self._cache.offset

    @property
    def segments(self) -> list[Segment]:
        return [e.segment for e in self._entries]

    @property
    def busy(self) -> bool:
        return self._active is not None

    def append(self, segment: Segment, *, prefill: bool = True) -> None:
        """Add a finished turn and run its rows (only those) through the backbone; `prefill=False` leaves them
        pending (for `prefill` in chunks, or the next reply)."""
        self._check_idle()
        entry = self._entry(segment)
        self._make_room(len(entry.tokens))
        self._entries.append(entry)
        if prefill:
            self._run_pending()

    def clear(self) -> None:
        """Forget everything, pinned segments included."""
        self._check_idle()
        self._entries.clear()
        self._truncate(0)

    def trim_last(self, frames: int, text: str) -> Segment:
        """Cut the last segment down to its first `frames` frames and `text`: what the listener really heard.

        For barge-in: a reply that was interrupted stays in the conversation only as far as it was played.
        The cache keeps every row before that segment; the segment's rows are run again at the next flush
        (its text rows change, and every row after them depends on them).
        """
        self._check_idle()
        if not self._entries or self._entries[-1].segment.codes is None:
            raise ContextRequestError("the last segment has no audio to trim")
        last = self._entries[-1].segment
        assert last.codes is not None
        if not 0 <= frames <= len(last.codes):
            raise ContextRequestError(f"frames must be in 0..{len(last.codes)}, got {frames}")
        trimmed = Segment(last.speaker, text, last.codes[:frames], pinned=last.pinned)
        start = self.length - len(self._entries[-1].tokens)
        rows = self._entry(trimmed)
        entry = self._entries[-1]  # changed in place: it stays the entry of the reply that spoke it
        entry.segment, entry.tokens, entry.mask = rows.segment, rows.tokens, rows.mask
        self._truncate(min(start, self.cached))
        return trimmed

    def trim_reply(self, utterance: Utterance, frames: int, text: str) -> Segment | None:
        """Cut the conversation back to what was heard of `utterance`: everything after it goes, and it keeps
        its first `frames` frames and `text` (see `trim_last`). Nothing heard at all (0 frames, no text): the
        reply goes too, and None is returned."""
        self._check_idle()
        index = next((i for i, e in enumerate(self._entries) if e.spoken_by(utterance)), None)
        if index is None:
            raise ContextRequestError("that reply is no longer in the context (cleared, or dropped by window overflow)")
        while len(self._entries) - 1 > index:
            self.drop_last()
        if frames == 0 and not text:
            self.drop_last()
            return None
        return self.trim_last(frames, text)

    def drop_last(self) -> Segment:
        """Remove the last segment (e.g. a reply sentence made ahead but never played)."""
        self._check_idle()
        if not self._entries:
            raise ContextRequestError("the context is empty")
        entry = self._entries.pop()
        self._truncate(min(self.length, self.cached))
        return entry.segment

    def flush(self) -> None:
        """Run the rows not yet in the cache now (e.g. a finished reply's closing rows) instead of later."""
        self._check_idle()
        self._run_pending()

    # -- the reply being spoken: `start_reply` makes it, its Utterance calls the rest ----------------------

    def start_reply(self, text: str, speaker: int, params: GenerationParams, seed: int) -> Utterance:
        """Begin a reply (validated `params`): make room for it and append its text rows; nothing runs yet
        (`Utterance.prefill` runs the rows, all at once or a chunk at a time; its first step runs the rest).

        The room is the reply's text rows, a row per frame up to `params.max_frames`, and the closing frame.
        Until the reply ends the context is busy: every other change waits for it.
        """
        self._check_idle()
        tokens, mask = self._text_rows(speaker, text)
        self._make_room(len(tokens) + params.max_frames + 1)
        entry = _Entry(Segment(speaker, text), tokens, mask)
        self._entries.append(entry)
        self._active = Utterance(self, params, seed)
        entry.reply = weakref.ref(self._active)
        return self._active

    def advance_reply(self, reply: Utterance, max_rows: int | None = None) -> mx.array | None:
        """Run the rows not yet in the cache (a new reply's text rows, or its previous frame), at most
        `max_rows` of them; returns the backbone state of the last one run, or None when none ran."""
        self._active_entry(reply)
        return self._run_pending(max_rows)

    def add_frame(self, reply: Utterance, frame: np.ndarray) -> None:
        """Add a frame's row to `reply`'s segment; it runs at the next `advance_reply` (or with what follows)."""
        entry = self._active_entry(reply)
        tokens, mask = audio_rows(frame[None])
        entry.tokens = np.concatenate([entry.tokens, tokens])
        entry.mask = np.concatenate([entry.mask, mask])

    def end_reply(self, reply: Utterance) -> None:
        """`reply` has ended: its segment gets its codes and the closing all-zero frame (run later, with
        whatever the context gets next), and the context is free again."""
        self.add_frame(reply, np.zeros(self.model.config.num_codebooks, dtype=np.int32))
        entry = self._active_entry(reply)
        entry.segment = Segment(entry.segment.speaker, entry.segment.text, reply.codes)
        self._active = None

    # -- internals -----------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Rows in the conversation not yet in the cache."""
        return self.length - self.cached

    def prefill(self, max_rows: int | None = None) -> int:
        """Run at most `max_rows` (default: all) of the rows not yet in the cache, as `flush` does; returns how
        many are still pending. For a daemon that interleaves a long prefill with other sessions' frames."""
        self._check_idle()
        self._run_pending(max_rows)
        return self.pending

    def _pending_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """tokens and mask of the rows not yet in the cache (only the entries that hold them are joined)."""
        first, end = len(self._entries), self.length
        while first > 0 and end > self.cached:
            first -= 1
            end -= len(self._entries[first].tokens)
        tail = self._entries[first:]
        skip = self.cached - end
        return (
            np.concatenate([e.tokens for e in tail])[skip:] if tail else np.zeros((0, 0), np.int32),
            np.concatenate([e.mask for e in tail])[skip:] if tail else np.zeros((0, 0), bool),
        )

    def _run_pending(self, max_rows: int | None = None) -> mx.array | None:
        """Run the rows not yet in the cache (at most `max_rows`); returns the backbone state of the last one
        run, or None when none ran."""
        if self.pending == 0 or max_rows == 0:
            return None
        tokens, mask = self._pending_rows()
        if max_rows is not None:
            tokens, mask = tokens[:max_rows], mask[:max_rows]
        hidden = None
        for chunk in range(0, len(tokens), PREFILL_CHUNK):
            rows = slice(chunk, chunk + PREFILL_CHUNK)
            hidden = self.model.backbone_step(mx.array(tokens[None, rows]), mx.array(mask[None, rows]), self._cache)
            mx.eval(hidden, *self._cache.state())
            self.rows_computed += len(tokens[rows])
        return hidden

    def _check_idle(self) -> None:
        if self._active is not None:
            raise ContextBusyError("this context is speaking; cancel the utterance or let it finish first")

    def _active_entry(self, reply: Utterance) -> _Entry:
        """The entry of `reply`, which must be the reply being spoken (it is always the last one)."""
        if reply is not self._active:
            raise ValueError("that utterance is not this context's reply in progress")
        entry = self._entries[-1]  # nothing else changes the entries while a reply is in progress
        assert entry.spoken_by(reply)
        return entry

    def _entry(self, segment: Segment) -> _Entry:
        tokens, mask = self._text_rows(segment.speaker, segment.text)
        if segment.codes is not None:
            codes = self._check_codes(segment.codes)
            closing = np.zeros((1, codes.shape[1]), dtype=np.int32)  # the all-zero audio-EOS frame
            audio_tokens, audio_mask = audio_rows(np.concatenate([codes, closing]))
            tokens = np.concatenate([tokens, audio_tokens])
            mask = np.concatenate([mask, audio_mask])
        return _Entry(segment, tokens, mask)

    def _text_rows(self, speaker: int, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self.tokenizer is None:
            raise ValueError("this model has no text tokenizer; load one (a tokenizer.json or .model file)")
        ids = np.asarray(self.tokenizer.encode_segment(speaker, text), dtype=np.int32)
        vocab = self.model.config.text_vocab_size
        if ids.max(initial=0) >= vocab:
            raise ValueError(f"the tokenizer produced id {ids.max()}, but the model's text vocabulary is {vocab}")
        return text_rows(ids, self.model.config.num_codebooks)

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        cfg = self.model.config
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != cfg.num_codebooks:
            raise ValueError(f"codes must have shape [frames, {cfg.num_codebooks}], got {list(codes.shape)}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= cfg.audio_vocab_size):
            raise ValueError(f"codes must be in [0, {cfg.audio_vocab_size}), got {codes.min()}..{codes.max()}")
        return codes.astype(np.int32)

    def _make_room(self, rows: int) -> None:
        """Drop the oldest unpinned segments until `rows` more fit in the window."""
        if self.length + rows <= self.window:
            return
        pinned = sum(len(e.tokens) for e in self._entries if e.segment.pinned)
        if pinned + rows > self.window:
            raise ContextOverflowError(
                f"{rows} new rows plus {pinned} pinned rows exceed the model's window of {self.window}; "
                "shorten the text, lower max_frames, or unpin segments"
            )
        kept_prefix = 0  # rows before the first dropped entry: still valid in the cache
        prefix_intact = True
        kept = []
        excess = self.length + rows - self.window
        for entry in self._entries:
            if excess > 0 and not entry.segment.pinned:
                excess -= len(entry.tokens)
                prefix_intact = False
                continue
            kept.append(entry)
            if prefix_intact:
                kept_prefix += len(entry.tokens)
        self._entries = kept
        self._truncate(min(kept_prefix, self.cached))

    def _truncate(self, rows: int) -> None:
        """Keep the first `rows` positions of the cache; the rows after them run again at the next flush."""
        self._cache.trim(self.cached - rows)


def text_rows(ids: np.ndarray, num_codebooks: int) -> tuple[np.ndarray, np.ndarray]:
    """Backbone rows for text token ids: the id in the last column, audio columns masked off."""
    tokens = np.zeros((len(ids), num_codebooks + 1), dtype=np.int32)
    tokens[:, -1] = ids
    mask = np.zeros(tokens.shape, dtype=bool)
    mask[:, -1] = True
    return tokens, mask


def audio_rows(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backbone rows for audio frames [T, N]: every codebook column on, the text column off."""
    tokens = np.zeros((len(frames), frames.shape[1] + 1), dtype=np.int32)
    tokens[:, :-1] = frames
    mask = np.ones(tokens.shape, dtype=bool)
    mask[:, -1] = False
    return tokens, mask


class Utterance:
    """A reply being spoken. Iterate it, or call `step()` until it returns None."""

    def __init__(self, context: Context, params: GenerationParams, seed: int):
        """Made by `Context.start_reply`, its text rows appended to the context but not yet run."""
        self.context = context
        self.params = params
        self.seed = seed
        self.frames: list[np.ndarray] = []
        self.finish_reason: FinishReason | None = None
        self._hidden: mx.array | None = None  # backbone state after the last row run: it predicts the next frame

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def prefill(self, max_rows: int | None = None) -> int:
        """Run at most `max_rows` (default: all) of the rows waiting before the next frame (at the start, the
        reply's text rows and anything the context had pending); returns how many still wait."""
        if not self.done:
            self._advance(max_rows)
        return self.context.pending if not self.done else 0

    def step(self) -> np.ndarray | None:
        """The next frame ([num_codebooks] int32), or None once the utterance has ended."""
        if self.done:
            return None
        self._advance()  # feeds the previous frame, or the rest of the prefill
        assert self._hidden is not None
        return self._accept(self._next_frame(self._hidden))

    def _advance(self, max_rows: int | None = None) -> None:
        hidden = self.context.advance_reply(self, max_rows)
        if hidden is not None:
            self._hidden = hidden

    def _accept(self, frame: np.ndarray) -> np.ndarray | None:
        """Take a frame made from `_hidden`: the all-zero one ends the reply, any other joins it."""
        if not frame.any():
            self._finish("eos")  # the all-zero frame closes the utterance and is not emitted
            return None
        self.frames.append(frame)
        self.context.add_frame(self, frame)
        if len(self.frames) >= self.params.max_frames:
            self._finish("max_length")
        return frame

    def cancel(self) -> None:
        """End now; frames already made stay in the context as what was said."""
        if not self.done:
            self._finish("cancelled")

    def __iter__(self) -> Iterator[np.ndarray]:
        while (frame := self.step()) is not None:
            yield frame

    @property
    def codes(self) -> np.ndarray:
        """All frames so far, [frames, num_codebooks]."""
        n = self.context.model.config.num_codebooks
        return np.stack(self.frames) if self.frames else np.zeros((0, n), dtype=np.int32)

    def _sampler(self) -> FrameSampler:
        """How the next frame's codes are picked: this reply's rule, with that frame's own keys."""
        codebook_size = self.context.model.config.audio_codebook_size
        return FrameSampler(self.params, codebook_size, self.seed, len(self.frames))

    def _next_frame(self, hidden: mx.array) -> np.ndarray:
        model = self.context.model
        pick = self._sampler()
        code0 = pick(model.codebook0_logits(hidden), 0)
        frame = model.decode_frame(hidden, code0, pick)
        mx.eval(frame)
        return np.array(frame[0], dtype=np.int32)

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self.context.end_reply(self)


def step_together(utterances: Sequence[Utterance]) -> list[np.ndarray | None]:
    """`step()` of each utterance (each of its own context, all of one model), as one batched step.

    The rows their previous frames added run through the backbone together, then codebook 0 and the depth
    decoder for every frame together: with the native kernels each weight is read once for the whole batch,
    and each frame is exactly the one `step()` would make alone (same seed, same codes). An utterance with
    more rows to run first (its prefill) runs them alone before joining.
    """
    if len(utterances) == 1:  # (also the path of one context at a time in `step`)
        return [utterances[0].step()]
    live = [u for u in utterances if not u.done]
    made: dict[int, np.ndarray | None] = {}  # by id(utterance); the ones already done make nothing
    if len({id(u.context) for u in live}) != len(live):
        raise ValueError("step_together takes at most one utterance per context")
    if live:
        model = live[0].context.model
        if any(u.context.model is not model for u in live):
            raise ValueError("step_together takes utterances of one model")
        _advance_together(model, live)
        frames = _next_frames(model, live)
        failed: dict[int, Exception] = {}
        for u, frame in zip(live, frames, strict=True):
            try:  # each reply takes its frame even when another's fails
                made[id(u)] = u._accept(frame)
            except Exception as exc:
                failed[id(u)] = exc
        if failed:
            raise StepFailedError([failed.get(id(u), made.get(id(u))) for u in utterances])
    return [made.get(id(u)) for u in utterances]


class StepFailedError(RuntimeError):
    """Some replies of a batched step failed as they took their frames; the others took theirs. `results` holds,
    in the order given, each reply's frame (None: it ended) or its exception."""

    def __init__(self, results: list[np.ndarray | Exception | None]):
        super().__init__(f"{sum(isinstance(r, Exception) for r in results)} replies of a batched step failed")
        self.results = results


def _advance_together(model: CSM, utterances: list[Utterance]) -> None:
    """Run each utterance's pending rows: one row each (its previous frame) in one batched backbone step,
    anything else alone first."""
    batch = []
    for u in utterances:
        u.context._active_entry(u)
        if u.context.pending == 1:
            batch.append(u)
        else:
            u._advance()
    if len(batch) == 1:
        batch[0]._advance()
    elif batch:
        rows = [u.context._pending_rows() for u in batch]
        tokens = mx.array(np.stack([t for t, _ in rows]))
        mask = mx.array(np.stack([m for _, m in rows]))
        hidden = model.backbone_rows(tokens, mask, [u.context._cache for u in batch])
        mx.eval(hidden)
        for b, u in enumerate(batch):
            u._hidden = hidden[b : b + 1]
            u.context.rows_computed += 1


def _next_frames(model: CSM, utterances: list[Utterance]) -> np.ndarray:
    """`Utterance._next_frame` of every utterance, as one batch: [B, num_codebooks] int32."""
    hidden = mx.concatenate([u._hidden for u in utterances if u._hidden is not None])
    assert hidden.shape[0] == len(utterances)
    samplers = [u._sampler() for u in utterances]
    logits = model.codebook0_logits(hidden)
    code0 = mx.concatenate([pick(logits[b : b + 1], 0) for b, pick in enumerate(samplers)])
    frames = model.decode_frames(hidden, code0, list(samplers))
    mx.eval(frames)
    return np.array(frames, dtype=np.int32)


class Generator:
    """Speaks with one model; any number of contexts share its weights. Each context's backbone cache is in
    `kv_dtype` (None: as computed; mx.bfloat16: half the memory per conversation, see `CSM.make_backbone_cache`)."""

    def __init__(self, model: CSM, tokenizer: TextTokenizer | None, kv_dtype: mx.Dtype | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_dtype = kv_dtype

    def new_context(self, max_positions: int | None = None) -> Context:
        return Context(self.model, self.tokenizer, max_positions, self.kv_dtype)

    def start(self, context: Context, text: str, speaker: int, params: GenerationParams | None = None) -> Utterance:
        """Begin a reply: checks everything, makes room, runs the reply's text rows. No frame yet."""
        utterance = self.begin(context, text, speaker, params)
        utterance.prefill()
        return utterance

    def begin(self, context: Context, text: str, speaker: int, params: GenerationParams | None = None) -> Utterance:
        """`start` without running any row: the caller prefills (`Utterance.prefill`), or the first step does."""
        params = (params or GenerationParams()).validate()
        if context.model is not self.model:
            raise ValueError("this context belongs to another model")
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        return context.start_reply(text, speaker, params, seed)

    def generate(
        self,
        context: Context,
        text: str,
        speaker: int,
        params: GenerationParams | None = None,
        on_frame: Callable[[np.ndarray], None] | None = None,
    ) -> Utterance:
        """Speak a whole reply, calling `on_frame` with each frame as it is made."""
        utterance = self.start(context, text, speaker, params)
        try:
            for frame in utterance:
                if on_frame is not None:
                    on_frame(frame)
        finally:
            utterance.cancel()  # a no-op when it ended by itself; frees the context if on_frame raised
        return utterance
