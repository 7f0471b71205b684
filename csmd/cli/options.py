"""The pieces of `csmd`'s argument parser: a parser whose errors are one line, value types that check
ranges as arguments are parsed, and the option groups several commands share.

Every flag's value is validated here, before any command runs, so a bad value is a one-line error that
names the flag (`csmd: error: argument --max-seconds: ...`) and nothing is loaded first.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from csmd import runtime
from csmd.daemon.validation import MAX_SPEAKER
from csmd.model.quantization import QuantizationScheme
from csmd.model.sampling import MAX_MIN_P, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, MIN_TOP_P

DEFAULT_MODEL = "sesame/csm-1b"
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`csmd: error: ...`, exit 2) that point at the command's --help."""

    def error(self, message: str) -> NoReturn:
        print(f"csmd: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _ranged(
    convert: Callable[[str], float], what: str, low: float | None = None, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False,
) -> Callable[[str], float]:  # fmt: skip
    """An argparse type: `convert`ed, finite, within [low, high] (either end open)."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}")
        return value

    parse.__name__ = what
    return parse


def _int(text: str) -> int:
    return int(text, 10)


positive_int = _ranged(_int, "an integer >= 1", 1)
count = _ranged(_int, "an integer >= 0", 0)
seconds = _ranged(float, "a number of seconds > 0", 0, low_open=True)
seconds_or_never = _ranged(float, "a number of seconds >= 0 (0: never)", 0)
gigabytes = _ranged(float, "a number of GB >= 0", 0)
percent = _ranged(float, "a percentage in [0, 1000]", 0, 1000)
# The sampling ranges are GenerationParams' own (what the float32 kernels can represent), so that every value
# the parser takes is one the engine takes.
_some_temperature = _ranged(float, f"0 (greedy) or a temperature in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]",
                            MIN_TEMPERATURE, MAX_TEMPERATURE)  # fmt: skip


def _counts(text: str, what: str, high: int) -> list[int]:
    what = f"{what} from 1 to {high}, comma-separated"
    parse = _ranged(_int, what, 1, high)
    try:
        return [int(parse(part.strip())) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None


def session_counts(text: str) -> list[int]:
    """A comma-separated list of session counts, each 1..8 (what a daemon holds at once by default)."""
    return _counts(text, "session counts", 8)


def stream_counts(text: str) -> list[int]:
    """A comma-separated list of stream counts for one batched codec step, each 1..64 (each a compiled trace)."""
    return _counts(text, "stream counts", 64)


def temperature(text: str) -> float:
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _some_temperature(text)


temperature.__name__ = _some_temperature.__name__
top_k = _ranged(_int, f"an integer in [0, {MAX_TOP_K}] (0 = off)", 0, MAX_TOP_K)
top_p = _ranged(float, f"a probability in [{MIN_TOP_P:g}, 1] (1 = off)", MIN_TOP_P, 1)
min_p = _ranged(float, f"a probability in [0, {MAX_MIN_P:g}] (0 = off)", 0, MAX_MIN_P)
speaker = _ranged(_int, f"a speaker id in [0, {MAX_SPEAKER}]", 0, MAX_SPEAKER)
seed = _ranged(_int, "an integer in [0, 2**32)", 0, 2**32, high_open=True)


def quantization_scheme(text: str) -> QuantizationScheme:
    """--quantize's value: bits for every part (4, 8) or per part (backbone=4,decoder=8; a part may be none)."""
    try:
        return QuantizationScheme.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def runtime_options() -> Parser:
    parent = Parser(add_help=False)
    group = parent.add_argument_group("runtime")
    group.add_argument("--device", default="auto", choices=runtime.DEVICES, help="where MLX runs (default: auto)")
    group.add_argument("--memory-limit", type=gigabytes, metavar="GB", help="MLX memory limit in GB")
    group.add_argument("--cache-limit", type=gigabytes, metavar="GB", help="MLX buffer cache limit in GB")
    return parent


def model_options() -> Parser:
    """--model, --dtype, --tokenizer. Their defaults are None (see `model_spec`, `dtype`), so that a command
    can tell a flag the user typed from a default (see checks.model_flags_typed)."""
    parent = Parser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model",
        help="a local checkpoint (file or directory), an HF repo id, or random:<preset> (csm-1b, tiny) "
        f"(default: {DEFAULT_MODEL}). Random weights have the real shapes and speed but do not speak.",
    )
    group.add_argument("--dtype", choices=DTYPE_NAMES, help="float32, bfloat16 or float16 (default: float32)")
    group.add_argument("--tokenizer", help="tokenizer.json or SentencePiece .model (default: beside the weights)")
    return parent


def model_spec(args: argparse.Namespace) -> str:
    return str(args.model or DEFAULT_MODEL)


def dtype(args: argparse.Namespace) -> str:
    return str(args.dtype or "float32")


def add_codec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--codec", help="Mimi weights: a path, an HF repo id or random:<preset> (default: the model's own)"
    )
    parser.add_argument(
        "--codec-bf16",
        action="store_true",
        help="keep the codec's weight-bound matrices in bfloat16: half the bytes each decoded frame reads "
        "(about 0.3%% off fp32 audio; see README)",
    )


KV_CACHES = ("fp32", "bf16")


def add_kv_cache_option(parser: argparse.ArgumentParser) -> None:
    """--kv-cache, for the commands that hold conversations. Its default is None (fp32), so that `say` and
    `talk` can tell it was typed when a daemon, with its own setting, would speak for them."""
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        help="each conversation's backbone KV cache: fp32 (the default; on other devices than the native CPU "
        "kernels, the model's dtype) or bf16, half the memory (67 MB a conversation at csm-1b's full window "
        "instead of 134 MB) for keys and values rounded to bf16, which changes the frames a little (see README)",
    )


def kv_cache(args: argparse.Namespace) -> str:
    return str(getattr(args, "kv_cache", None) or "fp32")


def sampling_options() -> Parser:
    from csmd.model.sampling import FRAME_MS, GenerationParams

    d = GenerationParams()
    parent = Parser(add_help=False)
    group = parent.add_argument_group("sampling")
    group.add_argument(
        "--temperature", type=temperature, default=d.temperature, help="0 = greedy (default: %(default)s)"
    )
    group.add_argument("--top-k", type=top_k, default=d.top_k, help="0 = off (default: %(default)s)")
    group.add_argument("--top-p", type=top_p, default=d.top_p, help="1 = off (default: %(default)s)")
    group.add_argument("--min-p", type=min_p, default=d.min_p, help="0 = off (default: %(default)s)")
    group.add_argument(
        "--max-seconds",
        type=seconds,
        default=d.max_frames * FRAME_MS / 1000,
        help="longest reply, in seconds (default: %(default)s)",
    )
    group.add_argument("--seed", type=seed, help="makes the reply reproducible")
    return parent


def socket_options(parser: argparse.ArgumentParser) -> None:
    """--socket PATH or --local, for the commands that use a running daemon when there is one."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        metavar="PATH",
        help="speak through the daemon on this socket; an error if none listens there "
        "(default: use the daemon on the default path if one runs, else load the model here)",
    )
    where.add_argument("--local", action="store_true", help="load the model in this process even if a daemon runs")
