"""Small tokenizers trained in-process, shaped like the real ones (nothing is downloaded)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

CORPUS = [
    "Hello there. How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "[0]Hi there! [1]Hey, what's up?",
    "Sphinx of black quartz, judge my vow.",
    "Pack my box with five dozen liquor jugs.",
    "Café naïve résumé, 12345 67890.",
] * 20


def train_byte_level(special_tokens: list[str], vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE built like Llama 3's (ByteLevel pre-tokenizer and decoder)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok
