"""CSM's text tokenizer: each segment is ``[BOS] + bpe(f"[{speaker}]{text}") + [EOS]``.

The real model ships the Llama-3 ``tokenizer.json``; some users have a SentencePiece ``.model``
instead. Both sit behind one small backend protocol so the segment framing lives in one place.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece
import tokenizers


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, of unknown format, or lacks BOS/EOS; or bad speaker/text."""


# Llama-3 names first (what CSM-1B uses), then the classic Llama-2 / SentencePiece names.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>")
# A directory may hold both; tokenizer.json is what CSM-1B actually ships.
_DIR_FILES = ("tokenizer.json", "tokenizer.model")


class _Backend(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_id(self, token: str) -> int | None: ...


class _HFBackend:
    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self._tok = tok
        # Text is only ever text: "<|end_of_text|>" typed by a user must not become a control token.
        self._tok.encode_special_tokens = True
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False bypasses the post-processor template entirely, so it does not
        # matter whether the file adds BOS only (stock Llama-3.2), BOS+EOS (HF CSM), or nothing.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)


class _SPBackend:
    def __init__(self, sp: sentencepiece.SentencePieceProcessor) -> None:
        self._sp = sp
        self.vocab_size: int = int(sp.get_piece_size())
        # SentencePiece records its own BOS/EOS ids; -1 means the model was trained without one.
        self.bos_id: int = int(sp.bos_id())
        self.eos_id: int = int(sp.eos_id())

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._sp.encode(text, out_type=int)]

    def decode(self, ids: list[int]) -> str:
        # Control pieces (<s>, </s>) already decode to nothing in SentencePiece.
        return str(self._sp.decode(ids))

    def token_id(self, token: str) -> int | None:
        # piece_to_id maps unknown pieces to unk's id, so confirm the round trip.
        found = int(self._sp.piece_to_id(token))
        return found if self._sp.id_to_piece(found) == token else None


def _load_hf(path: Path) -> _HFBackend:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer.json: {e}") from e
    try:
        return _HFBackend(tokenizers.Tokenizer.from_str(text))
    except Exception as e:  # the Rust bindings raise bare `Exception` for any parse error
        raise TokenizerError(f"{path}: not a valid HF tokenizers file: {e}") from e


def _load_sp(path: Path) -> _SPBackend:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read SentencePiece model: {e}") from e
    sp = sentencepiece.SentencePieceProcessor()
    try:
        # Loading from bytes (not the path) keeps file errors ours and works for any path encoding.
        sp.LoadFromSerializedProto(data)
    except RuntimeError as e:
        raise TokenizerError(f"{path}: not a valid SentencePiece model: {e}") from e
    return _SPBackend(sp)


def _resolve(path: Path, backend: _Backend, role: str, names: Sequence[str]) -> int:
    for name in names:
        found = backend.token_id(name)
        if found is not None:
            return found
    raise TokenizerError(f"{path}: no {role} token (looked for {', '.join(names)}); pass {role}_token=")


class _ByteBackend:
    """UTF-8 bytes as ids 0..255, plus BOS 256 and EOS 257: for random-weight smoke runs only."""

    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        return {"<bos>": 256, "<eos>": 257}.get(token)


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"text must be a str, got {type(text).__name__}")
    return text


class TextTokenizer:
    """Turns CSM text segments into token ids and back, over a HF or SentencePiece backend."""

    def __init__(self, backend: _Backend, bos_id: int, eos_id: int) -> None:
        self._backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = backend.vocab_size

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, bos_token: str | None = None, eos_token: str | None = None
    ) -> TextTokenizer:
        """A `tokenizer.json` (HF tokenizers), a SentencePiece `.model`, or a directory holding one of
        them (tokenizer.json preferred, then tokenizer.model). bos/eos tokens default to
        <|begin_of_text|>/<|end_of_text|>, then <s>/</s>, for tokenizer.json; SentencePiece uses its own
        ids. Missing ones are a TokenizerError."""
        p = Path(path)
        if not p.exists():
            raise TokenizerError(f"{p}: no such file or directory")
        if p.is_dir():
            found = next((p / name for name in _DIR_FILES if (p / name).is_file()), None)
            if found is None:
                raise TokenizerError(f"{p}: directory holds neither {' nor '.join(_DIR_FILES)}")
            p = found

        suffix = p.suffix.lower()
        if suffix == ".json":
            hf = _load_hf(p)
            bos = _resolve(p, hf, "bos", _BOS_CANDIDATES if bos_token is None else (bos_token,))
            eos = _resolve(p, hf, "eos", _EOS_CANDIDATES if eos_token is None else (eos_token,))
            return cls(hf, bos, eos)
        if suffix == ".model":
            sp = _load_sp(p)
            bos = _resolve(p, sp, "bos", (bos_token,)) if bos_token is not None else sp.bos_id
            eos = _resolve(p, sp, "eos", (eos_token,)) if eos_token is not None else sp.eos_id
            for role, tid in (("bos", bos), ("eos", eos)):
                if tid < 0:
                    raise TokenizerError(f"{p}: SentencePiece model has no {role} piece; pass {role}_token=")
            return cls(sp, bos, eos)
        raise TokenizerError(
            f"{p}: unknown tokenizer format {p.suffix or '(no extension)'!r}; "
            "expected a tokenizer.json or a SentencePiece .model"
        )

    @classmethod
    def utf8_bytes(cls) -> TextTokenizer:
        """A tokenizer that needs no file, for `random:<preset>` models (whose weights mean nothing anyway)."""
        return cls(_ByteBackend(), 256, 257)

    def encode(self, text: str) -> list[int]:
        """Plain BPE ids for `text`; no BOS/EOS or other template tokens are added."""
        return self._backend.encode(_check_text(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`, skipping special tokens (and BOS/EOS even if the file doesn't mark them so)."""
        try:
            # operator.index accepts numpy integers from the sampler but rejects floats and strings.
            checked = [operator.index(i) for i in ids]
        except TypeError as e:
            raise TokenizerError(f"token ids must be ints: {e}") from e
        bad = [i for i in checked if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._backend.decode([i for i in checked if i not in (self.bos_id, self.eos_id)])

    def encode_segment(self, speaker: int, text: str) -> list[int]:
        """`[bos] + encode(f"[{speaker}]{text}") + [eos]`: CSM's framing of one speaker turn."""
        # bool is an int subclass, but `[True]` would silently become a different prompt.
        if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
            raise TokenizerError(f"speaker must be a non-negative int (0, 1, ...), got {speaker!r}")
        # Check text before the f-string, which would happily stringify None or bytes.
        return [self.bos_id, *self.encode(f"[{speaker}]{_check_text(text)}"), self.eos_id]
