"""`csmd convert SRC DIR`: a self-contained csmd directory (see csmd/convert.py) that `csmd say --model DIR`
loads offline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from csmd.cli import checks
from csmd.cli.errors import flagged
from csmd.cli.runtime import apply_runtime
from csmd.errors import UserError

if TYPE_CHECKING:
    from csmd.audio.mimi.model import Mimi


def cmd_convert(args: argparse.Namespace) -> int:
    from csmd.convert import write_converted
    from csmd.model.loading import TOKENIZER_FILES, load_model
    from csmd.model.weights import quantize
    from csmd.speak import codec_for

    checks.model_argument(args.src, "SRC")
    _not_quantized(args.src)
    checks.codec_argument(args.codec)
    dst = Path(args.dst)
    _check_destination(dst)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if tokenizer is not None and tokenizer.is_dir():
        tokenizer = next((tokenizer / n for n in TOKENIZER_FILES if (tokenizer / n).is_file()), tokenizer)
    checks.tokenizer_file(str(tokenizer) if tokenizer else None)
    apply_runtime(args)
    with flagged("SRC"):
        loaded = load_model(args.src, dtype=args.dtype, tokenizer=tokenizer)
    if tokenizer is None and not args.src.startswith("random:"):
        tokenizer = _source_tokenizer(loaded.source)
    if tokenizer is None and not loaded.random:
        raise UserError(f"SRC {args.src}: no tokenizer beside its weights; pass --tokenizer FILE to bundle one")
    spec = args.codec or loaded.codec
    if spec is not None and spec.startswith("random:"):
        codec: Mimi | str = spec  # nothing to bundle: the spec is recorded, and rebuilds the same weights
    else:
        print("csmd: loading the codec to bundle it", file=sys.stderr)
        with flagged("--codec"):
            codec = codec_for(loaded, args.codec)
    quantization = args.quantize  # a QuantizationScheme (options.quantization_scheme) or None
    if quantization is not None:
        quantize(loaded.model, quantization)
    print(f"csmd: writing {dst}", file=sys.stderr)
    written = write_converted(loaded, dst, quantization=quantization, tokenizer_file=tokenizer, codec=codec)
    print(f"wrote {dst}: {', '.join(written)}")
    return 0


def _not_quantized(src: str) -> None:
    """Converting reads float weights: a quantized csmd directory (already converted) is refused up front,
    since its integer levels would be written as if they were weights, and a model that cannot load would
    come out."""
    import json

    from csmd.model.quantization import QuantizationScheme

    path = Path(src).expanduser()
    config = (path if path.is_dir() else path.parent) / "config.json"
    if src.startswith("random:") or not config.is_file():
        return
    try:
        recorded = json.loads(config.read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return  # not ours to judge here: the load says what is wrong with it
    if recorded:
        try:
            how = QuantizationScheme.from_dict(recorded).describe()
        except ValueError:
            how = "in a scheme this csmd does not know"
        raise UserError(f"SRC {src}: already quantized ({how}); convert the float checkpoint it came from instead")


def _check_destination(dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise UserError(f"DIR {dst}: exists and is not a directory")
    parent = dst if dst.exists() else next((p for p in dst.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"DIR {dst}: cannot write in {parent} (permission denied)")


def _source_tokenizer(weights_file: str) -> Path | None:
    from csmd.model.loading import TOKENIZER_FILES

    directory = Path(weights_file).parent
    return next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)
