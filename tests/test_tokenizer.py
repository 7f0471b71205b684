"""TextTokenizer against tokenizers trained in-process (nothing is downloaded)."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, processors
from trained_tokenizers import BOS, CORPUS, EOS, train_byte_level

from csmd.model.tokenizer import TextTokenizer, TokenizerError


def save(tok: Tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_tok() -> Tokenizer:
    return train_byte_level([BOS, EOS])


@pytest.fixture(scope="module")
def hf_path(hf_tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(hf_tok, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=out,
        vocab_size=150,
        hard_vocab_limit=False,  # the corpus is tiny; let sp pick fewer pieces rather than fail
        character_coverage=1.0,
        minloglevel=2,
    )
    return out.getvalue()


# --- tokenizer.json -------------------------------------------------------------------------------


def test_hf_encode_segment_matches_reference(hf_tok: Tokenizer, hf_path: Path) -> None:
    t = TextTokenizer.from_file(hf_path)
    assert (t.bos_id, t.eos_id) == (hf_tok.token_to_id(BOS), hf_tok.token_to_id(EOS))
    assert t.vocab_size == hf_tok.get_vocab_size(with_added_tokens=True)
    expected = hf_tok.encode("[0]Hello there.", add_special_tokens=False).ids
    assert t.encode_segment(0, "Hello there.") == [t.bos_id, *expected, t.eos_id]
    assert t.encode("[0]Hello there.") == expected


@pytest.mark.parametrize("text", ["Hello there.", "", "  spaces  and\ttabs\n", "Café 日本語 🎉 ümlaut"])
def test_hf_round_trip(hf_path: Path, text: str) -> None:
    t = TextTokenizer.from_file(hf_path)
    assert t.decode(t.encode(text)) == text


def test_hf_decode_skips_bos_eos(hf_path: Path) -> None:
    t = TextTokenizer.from_file(hf_path)
    assert t.decode(t.encode_segment(3, "Hi")) == "[3]Hi"


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_hf_round_trip_property(hf_path: Path, text: str) -> None:
    # Byte-level BPE covers every byte, so any valid unicode string must survive a round trip.
    t = TextTokenizer.from_file(hf_path)
    assert t.decode(t.encode(text)) == text


@pytest.mark.parametrize(
    "single",
    [f"{BOS} $A", f"{BOS} $A {EOS}", f"{EOS} $A {BOS}"],
    ids=["bos-only-llama32", "bos-eos-hf-csm", "reversed"],
)
def test_post_processor_does_not_double_specials(hf_tok: Tokenizer, tmp_path: Path, single: str) -> None:
    tok = Tokenizer.from_str(hf_tok.to_str())
    specials = [(BOS, hf_tok.token_to_id(BOS)), (EOS, hf_tok.token_to_id(EOS))]
    template = processors.TemplateProcessing(single=single, special_tokens=specials)
    # Llama 3's file chains ByteLevel and TemplateProcessing in a Sequence.
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    assert len(tok.encode("Hi").ids) > len(tok.encode("Hi", add_special_tokens=False).ids)  # template is live

    ids = TextTokenizer.from_file(save(tok, tmp_path)).encode_segment(1, "Hello there.")
    bos, eos = hf_tok.token_to_id(BOS), hf_tok.token_to_id(EOS)
    assert ids[0] == bos and ids[-1] == eos
    assert ids.count(bos) == 1 and ids.count(eos) == 1


def test_load_directory(hf_tok: Tokenizer, hf_path: Path, sp_model: bytes, tmp_path: Path) -> None:
    t = TextTokenizer.from_file(hf_path.parent)
    assert t.encode("Hello") == hf_tok.encode("Hello", add_special_tokens=False).ids
    # With both files present, tokenizer.json wins.
    shutil.copy(hf_path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    assert TextTokenizer.from_file(str(tmp_path)).vocab_size == t.vocab_size


def test_llama2_style_names_are_the_fallback(tmp_path: Path) -> None:
    tok = train_byte_level(["<unk>", "<s>", "</s>"])
    t = TextTokenizer.from_file(save(tok, tmp_path))
    assert (t.bos_id, t.eos_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))


def test_explicit_bos_eos_override(tmp_path: Path) -> None:
    tok = train_byte_level(["<pad>", "<start>", "<stop>", BOS, EOS])
    path = save(tok, tmp_path)
    t = TextTokenizer.from_file(path, bos_token="<start>", eos_token="<stop>")
    assert (t.bos_id, t.eos_id) == (tok.token_to_id("<start>"), tok.token_to_id("<stop>"))
    assert t.encode_segment(0, "Hi")[:1] == [tok.token_to_id("<start>")]
    with pytest.raises(TokenizerError, match=r"no bos token.*<nope>"):
        TextTokenizer.from_file(path, bos_token="<nope>")


def test_missing_bos_eos_is_an_error(tmp_path: Path) -> None:
    path = save(train_byte_level(["<pad>"]), tmp_path)
    with pytest.raises(TokenizerError, match=r"no bos token \(looked for <\|begin_of_text\|>, <s>\)"):
        TextTokenizer.from_file(path)
    with pytest.raises(TokenizerError, match="no eos token"):
        TextTokenizer.from_file(path, bos_token="<pad>")


# --- SentencePiece --------------------------------------------------------------------------------


def test_sentencepiece(sp_model: bytes, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sp_model)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    t = TextTokenizer.from_file(path)
    assert (t.bos_id, t.eos_id, t.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())
    assert t.encode_segment(1, "Hi") == [sp.bos_id(), *sp.encode("[1]Hi", out_type=int), sp.eos_id()]
    for text in ["Hello there.", "Café naïve résumé", ""]:
        assert t.decode(t.encode(text)) == text
    assert t.decode(t.encode_segment(0, "Hello there.")) == "[0]Hello there."
    assert TextTokenizer.from_file(tmp_path).bos_id == sp.bos_id()  # directory form


def test_sentencepiece_without_bos(tmp_path: Path) -> None:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=150, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2, bos_id=-1,
    )  # fmt: skip
    path = tmp_path / "tokenizer.model"
    path.write_bytes(out.getvalue())
    with pytest.raises(TokenizerError, match="no bos piece"):
        TextTokenizer.from_file(path)
    t = TextTokenizer.from_file(path, bos_token="</s>")
    assert t.bos_id == t.eos_id


# --- errors ---------------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no such file"):
        TextTokenizer.from_file(tmp_path / "missing" / "tokenizer.json")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"neither tokenizer\.json nor tokenizer\.model") as e:
        TextTokenizer.from_file(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("tokenizer.json", b"\x00\xff not json at all", "cannot read tokenizer.json"),
        ("tokenizer.json", b'{"version": "1.0", "model": 42}', "not a valid HF tokenizers file"),
        ("tokenizer.model", b"\x00garbage\xff\x13\x37", "not a valid SentencePiece model"),
        ("tokenizer.model", b"", "not a valid SentencePiece model"),
    ],
)
def test_corrupt_files(tmp_path: Path, name: str, data: bytes, fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(TokenizerError, match=re.escape(fragment)) as e:
        TextTokenizer.from_file(path)
    assert str(path) in str(e.value)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("hello\n")
    with pytest.raises(TokenizerError, match=r"unknown tokenizer format '\.txt'") as e:
        TextTokenizer.from_file(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("speaker", [-1, True, False, "0", 1.0, None])
def test_bad_speaker(hf_path: Path, speaker: object) -> None:
    t = TextTokenizer.from_file(hf_path)
    with pytest.raises(TokenizerError, match="speaker must be a non-negative int"):
        t.encode_segment(speaker, "Hi")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [None, b"Hi", 3, ["Hi"]])
def test_bad_text(hf_path: Path, text: object) -> None:
    t = TextTokenizer.from_file(hf_path)
    with pytest.raises(TokenizerError, match="text must be a str"):
        t.encode_segment(0, text)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="text must be a str"):
        t.encode(text)  # type: ignore[arg-type]


def test_bad_decode_ids(hf_path: Path) -> None:
    t = TextTokenizer.from_file(hf_path)
    with pytest.raises(TokenizerError, match="out of range"):
        t.decode([t.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        t.decode([-1])
    with pytest.raises(TokenizerError, match="must be ints"):
        t.decode([1.5])  # type: ignore[list-item]
