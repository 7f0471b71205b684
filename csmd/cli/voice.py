"""Loading what speaks, for every command that needs it: the model, its tokenizer and its codec, through one
helper (`load_voice`) that names the flag behind any failure and says once when the weights are random."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from csmd.cli import checks
from csmd.cli.errors import flagged
from csmd.cli.options import dtype, kv_cache, model_spec
from csmd.errors import UserError

if TYPE_CHECKING:
    import mlx.core as mx

    from csmd.audio.mimi.model import Mimi
    from csmd.model.generator import Generator
    from csmd.model.loading import LoadedModel
    from csmd.model.tokenizer import TextTokenizer


@dataclass
class Voice:
    loaded: LoadedModel
    generator: Generator
    mimi: Mimi


def note_random(model: str) -> None:
    """The one place that says random weights make noise."""
    print(f"csmd: note: {model} has random weights, which do not speak: expect noise", file=sys.stderr)


def load_model(args: argparse.Namespace, tokenizer: TextTokenizer | None = None) -> LoadedModel:
    """--model (with --dtype and --tokenizer), loaded; says so when its weights are random."""
    from csmd.model.loading import load_model as load

    spec = model_spec(args)
    if tokenizer is None:
        tokenizer = checks.tokenizer_file(args.tokenizer)
    with flagged("--model"):
        loaded = load(spec, dtype=dtype(args), tokenizer=tokenizer)
    if loaded.tokenizer is None:
        raise UserError(f"--model {spec}: no tokenizer beside its weights; pass --tokenizer FILE")
    if loaded.random:
        note_random(spec)
    return loaded


def kv_cache_dtype(args: argparse.Namespace) -> mx.Dtype | None:
    """--kv-cache as `CSM.make_backbone_cache` takes it: None for fp32 (the keys and values as computed)."""
    import mlx.core as mx

    return mx.bfloat16 if kv_cache(args) == "bf16" else None


def load_voice(args: argparse.Namespace, tokenizer: TextTokenizer | None = None) -> Voice:
    """The model and the codec it speaks through (--codec, else its own), ready to generate, each conversation's
    backbone cache in --kv-cache's dtype (commands without the flag: fp32)."""
    from csmd import runtime
    from csmd.model.generator import Generator
    from csmd.speak import codec_for

    runtime.announce()  # which kernels run, and MLX's first compile: before the slow part, not after
    loaded = load_model(args, tokenizer)
    with flagged("--codec"):
        mimi = codec_for(loaded, args.codec, bf16=args.codec_bf16)
    return Voice(loaded, Generator(loaded.model, loaded.tokenizer, kv_cache_dtype(args)), mimi)
