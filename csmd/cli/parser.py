"""The `csmd` argument parser: every command, its flags, and the function that runs it."""

from __future__ import annotations

from csmd import __version__
from csmd.cli import bench, convert, info, say, serve, talk
from csmd.cli.options import (
    DTYPE_NAMES,
    Parser,
    add_codec_options,
    add_kv_cache_option,
    count,
    model_options,
    percent,
    positive_int,
    quantization_scheme,
    runtime_options,
    sampling_options,
    seconds,
    seconds_or_never,
    session_counts,
    socket_options,
    speaker,
    stream_counts,
)
from csmd.model.quantization import BENCHMARK_SCHEMES, QuantizationScheme


def build_parser() -> Parser:
    parser = Parser(prog="csmd", description="Local real-time voice conversation with CSM-1B")
    parser.add_argument("--version", action="version", version=f"csmd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_opts, model_opts = runtime_options(), model_options()

    info_ = commands.add_parser("info", parents=[run_opts], help="device, backend, BLAS and memory settings")
    info_.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="model dtype to check and report")
    info_.set_defaults(func=info.cmd_info)

    convert_ = commands.add_parser(
        "convert", parents=[run_opts], help="write a checkpoint as a self-contained csmd directory"
    )
    convert_.add_argument("src", metavar="SRC", help="a checkpoint: file, directory, HF repo id or random:<preset>")
    convert_.add_argument("dst", metavar="DIR", help="output directory")
    convert_.add_argument(
        "--quantize",
        type=quantization_scheme,
        metavar="SCHEME",
        help="quantize the linear and embedding weights: 4 or 8 bits, or per part, e.g. backbone=4,decoder=8 "
        "(a part may be none: left in --dtype)",
    )
    convert_.add_argument(
        "--dtype", default="bfloat16", choices=DTYPE_NAMES, help="dtype of the float weights (default: bfloat16)"
    )
    convert_.add_argument("--tokenizer", help="tokenizer file to bundle (default: the one beside SRC)")
    convert_.add_argument("--codec", help="the codec to bundle (default: the one SRC speaks through)")
    convert_.set_defaults(func=convert.cmd_convert)

    talk_ = commands.add_parser(
        "talk",
        parents=[run_opts, model_opts, sampling_options()],
        help="a live conversation: microphone in, speaker out",
    )
    talk_.add_argument(
        "--llm", metavar="URL", help="OpenAI-compatible chat endpoint for replies (e.g. http://127.0.0.1:8080/v1)"
    )
    talk_.add_argument("--llm-model", default="default", help="model name sent to the endpoint")
    talk_.add_argument("--api-key", help="bearer token for the endpoint (default: $OPENAI_API_KEY)")
    talk_.add_argument("--voice", metavar="AUDIO", help="a recording of the voice csmd should keep")
    talk_.add_argument("--voice-text", help="what the --voice recording says")
    talk_.add_argument("--input-device", help="microphone name or index (see csmd devices)")
    talk_.add_argument("--output-device", help="speaker name or index (see csmd devices)")
    talk_.add_argument("--min-speech", type=seconds, default=0.25, help="seconds of speech that make a turn")
    talk_.add_argument("--end-silence", type=seconds, default=0.7, help="seconds of silence that end a turn")
    talk_.add_argument("--echo-guard", action="store_true", help="ignore the microphone while csmd talks (no AEC)")
    add_codec_options(talk_)
    add_kv_cache_option(talk_)
    socket_options(talk_)
    talk_.add_argument(
        "--asr",
        type=talk.asr_spec,
        default="none",
        metavar="ASR",
        help="transcripts of your turns: none (audio only; the default), typed (you type them after each turn), "
        "whisper or whisper:MODEL (faster-whisper, default model base.en; MODEL is a size name such as small.en "
        'or a CTranslate2 directory; needs pip install "csmd[whisper]")',
    )
    talk_.add_argument(
        "--asr-language", metavar="CODE", help="language you speak, for Whisper, e.g. en, de (default: detected)"
    )
    talk_.set_defaults(func=talk.cmd_talk)

    devices = commands.add_parser("devices", help="list sound devices (names or indices for --output-device)")
    devices.set_defaults(func=info.cmd_devices)

    serve_ = commands.add_parser("serve", parents=[run_opts, model_opts], help="run the daemon on a Unix socket")
    serve_.add_argument(
        "--socket",
        metavar="PATH",
        help="socket path (default: $XDG_RUNTIME_DIR/csmd/csmd.sock, on macOS $TMPDIR/csmd/, else /tmp/csmd-UID/)",
    )
    serve_.add_argument(
        "--allow-shared-socket-dir",
        action="store_true",
        help="serve even where other users can write the socket's directory (they could replace the socket)",
    )
    add_codec_options(serve_)
    add_kv_cache_option(serve_)
    serve_.add_argument("--max-sessions", type=positive_int, default=8, help="sessions held at once (default: 8)")
    serve_.add_argument(
        "--max-sessions-per-connection", type=positive_int, default=4, help="sessions one client may hold (default: 4)"
    )
    serve_.add_argument("--max-connections", type=positive_int, default=64, help="clients at once (default: 64)")
    serve_.add_argument(
        "--idle-timeout",
        type=seconds_or_never,
        default=120.0,
        metavar="SECONDS",
        help="close a connection with no session after this many quiet seconds (default: 120; 0: never)",
    )
    serve_.set_defaults(func=serve.cmd_serve)

    say_ = commands.add_parser(
        "say", parents=[run_opts, model_opts, sampling_options()], help="speak text into a 24 kHz WAV file"
    )
    say_.add_argument("text", help="what to say")
    say_.add_argument("-o", "--output", help="output file (.wav, .flac or .ogg)")
    say_.add_argument("--play", action="store_true", help="play on the speaker as it is generated")
    say_.add_argument("--output-device", help="sound device name or index for --play (default: the system's)")
    socket_options(say_)
    say_.add_argument("--speaker", type=speaker, default=0, help="speaker id of the reply (default: 0)")
    say_.add_argument("--context", action="append", default=[], metavar="AUDIO", help="a recorded turn (repeatable)")
    say_.add_argument("--context-text", action="append", default=[], metavar="TEXT", help="its transcript")
    say_.add_argument(
        "--context-speaker",
        action="append",
        type=speaker,
        default=[],
        metavar="N",
        help="its speaker (default: --speaker)",
    )
    add_codec_options(say_)
    add_kv_cache_option(say_)
    say_.set_defaults(func=say.cmd_say)

    bench_ = commands.add_parser("bench", help="latency benchmarks")
    benches = bench_.add_subparsers(dest="bench", required=True)
    frame = benches.add_parser("frame", parents=[run_opts, model_opts], help="time per 80 ms frame and prefill")
    frame.add_argument("--frames", type=positive_int, default=20, help="timed frames (default: 20)")
    frame.add_argument("--warmup", type=count, default=3, help="untimed frames first (default: 3)")
    frame.add_argument("--prefill", type=positive_int, default=300, help="rows of context to prefill (default: 300)")
    frame.add_argument("--prefill-repeats", type=positive_int, default=3, help="timed prefills, median (default: 3)")
    frame.add_argument(
        "--quantize",
        type=quantization_scheme,
        metavar="SCHEME",
        help="quantize the loaded weights first: 4, 8, or per part, e.g. backbone=4,decoder=8 (or none)",
    )
    add_kv_cache_option(frame)
    frame.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also time transformers' CsmForConditionalGeneration (torch CPU, random weights) in the same run",
    )
    frame.add_argument("--json", action="store_true", help="print one JSON object")
    frame.set_defaults(func=bench.cmd_bench_frame)
    precision = benches.add_parser(
        "precision",
        parents=[run_opts],
        help="each quantization scheme's bytes per frame and its logits' divergence from the float model",
    )
    precision.add_argument(
        "--model",
        default="random:csm-1b",
        help="the float model the schemes are quantized from: a checkpoint or random:<preset> (default: "
        "%(default)s; on random weights the divergence is a proxy for quality only)",
    )
    precision.add_argument(
        "--dtype",
        default="bfloat16",
        choices=DTYPE_NAMES,
        help="the reference's dtype, which unquantized parts keep (default: %(default)s)",
    )
    precision.add_argument(
        "--frames", type=positive_int, default=200, help="frames generated and scored (default: %(default)s)"
    )
    precision.add_argument(
        "--schemes",
        nargs="+",
        type=quantization_scheme,
        default=[QuantizationScheme.parse(s) for s in BENCHMARK_SCHEMES],
        metavar="SCHEME",
        help=f"--quantize values to compare (default: {' '.join(BENCHMARK_SCHEMES)})",
    )
    precision.add_argument(
        "--timed-rounds",
        type=count,
        default=0,
        metavar="R",
        help="then time the reference's and every scheme's frames in R turns of 4, alternated in this process "
        "(holds every scheme's weights at once; default: 0, no timing)",
    )
    precision.add_argument("--json", action="store_true", help="print one JSON object")
    precision.set_defaults(func=bench.cmd_bench_precision)
    kv = benches.add_parser(
        "kv-cache",
        parents=[run_opts, model_opts],
        help="what a bf16 backbone KV cache does to the logits against an fp32 one, and its memory per session",
    )
    kv.add_argument(
        "--context", type=positive_int, default=1500, help="rows of context before the frames (default: %(default)s)"
    )
    kv.add_argument(
        "--frames", type=positive_int, default=300, help="frames generated and scored (default: %(default)s)"
    )
    kv.add_argument(
        "--quantize",
        type=quantization_scheme,
        metavar="SCHEME",
        help="quantize the loaded weights first: 4, 8, or per part, e.g. backbone=4,decoder=8 (or none)",
    )
    kv.add_argument("--json", action="store_true", help="print one JSON object")
    kv.set_defaults(func=bench.cmd_bench_kv_cache)
    over_socket = benches.add_parser(
        "daemon", parents=[run_opts, model_opts], help="time to first audio and per-frame cost: socket vs in-process"
    )
    over_socket.add_argument("--frames", type=positive_int, default=25, help="frames per reply (default: 25)")
    over_socket.add_argument("--runs", type=positive_int, default=5, help="replies each way (default: 5)")
    add_codec_options(over_socket)
    over_socket.add_argument("--json", action="store_true", help="print one JSON object")
    over_socket.set_defaults(func=bench.cmd_bench_daemon)
    together = benches.add_parser(
        "concurrency",
        parents=[run_opts, model_opts],
        help="sessions speaking at once: aggregate frames/s, each session's frame interval, the batched step's floor",
    )
    together.add_argument(
        "--sessions", type=session_counts, default=[1, 2, 4, 8], help="session counts to run (default: 1,2,4,8)"
    )
    together.add_argument("--frames", type=positive_int, default=30, help="timed frames per session (default: 30)")
    together.add_argument("--warmup", type=count, default=5, help="untimed frames first (default: 5)")
    together.add_argument(
        "--context", type=count, default=300, help="rows of history in every session first (default: 300)"
    )
    together.add_argument("--no-daemon", action="store_true", help="in-process only (not also through a daemon)")
    add_codec_options(together)
    add_kv_cache_option(together)
    together.add_argument("--json", action="store_true", help="print one JSON object")
    together.set_defaults(func=bench.cmd_bench_concurrency)
    talk_bench = benches.add_parser(
        "talk", parents=[run_opts, model_opts], help="a scripted conversation on real devices: turn and barge-in"
    )
    talk_bench.add_argument("--user-device", default="loopback", help="plays the user's voice into csmd's mic")
    talk_bench.add_argument("--csmd-device", default="system", help="where csmd speaks (not heard back)")
    talk_bench.add_argument("--rounds", type=positive_int, default=3, help="rounds (default: 3)")
    add_codec_options(talk_bench)
    talk_bench.add_argument("--json", action="store_true", help="print one JSON object")
    talk_bench.set_defaults(func=bench.cmd_bench_talk)
    codec = benches.add_parser("codec", parents=[run_opts], help="Mimi streaming decode/encode per frame")
    codec.add_argument("--codec", default="random:mimi", help="Mimi weights (default: random:mimi, full size)")
    codec.add_argument("--frames", type=positive_int, default=50, help="timed frames (default: 50)")
    codec.add_argument(
        "--warmup", type=count, help="untimed frames first (default: enough to fill the attention window, 130)"
    )
    codec.add_argument("--compare-moshi", action="store_true", help="also time moshi's PyTorch decoder")
    codec.add_argument("--bf16", action="store_true", help="bfloat16 weight-bound matrices (Mimi.use_bf16_weights)")
    codec.add_argument(
        "--batch",
        type=stream_counts,
        help="instead: B streams decoded in one batched step against B single decodes, for each B (e.g. 1,2,4,8)",
    )
    codec.add_argument("--json", action="store_true", help="print one JSON object")
    codec.set_defaults(func=bench.cmd_bench_codec)
    scenarios = benches.add_parser(
        "run",
        parents=[run_opts, model_opts],
        help="named scenarios with repetitions, medians and spread: a table, and --json, --markdown, --plot",
    )
    scenarios.add_argument(
        "--scenarios",
        type=bench.scenario_names,
        default=["reply", "context", "frame"],
        metavar="LIST",
        help=f"comma-separated, from {', '.join(bench.SCENARIOS)} (default: reply,context,frame)",
    )
    scenarios.add_argument(
        "--socket",
        metavar="PATH",
        help="measure the daemon on this socket (reply and context only) instead of one started in this process",
    )
    scenarios.add_argument("--frames", type=positive_int, default=25, help="frames per reply (default: 25)")
    scenarios.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (default: 5)")
    scenarios.add_argument("--warmup", type=count, default=1, help="untimed rounds first (default: 1)")
    scenarios.add_argument(
        "--prefill", type=positive_int, default=300, help="frame: rows of context prefilled (default: 300)"
    )
    scenarios.add_argument(
        "--peers", action="store_true", help="frame, codec: also time transformers' CSM and moshi's Mimi if installed"
    )
    scenarios.add_argument(
        "--user-device",
        default="loopback",
        help="conversation: plays the user's voice into csmd's mic (default: loopback)",
    )
    scenarios.add_argument(
        "--csmd-device", default="system", help="conversation: where csmd speaks, not heard back (default: %(default)s)"
    )
    add_kv_cache_option(scenarios)
    add_codec_options(scenarios)
    scenarios.add_argument("--json", metavar="FILE", help="also write the report as JSON (for `csmd bench compare`)")
    scenarios.add_argument("--markdown", metavar="FILE", help="also write it as Markdown tables")
    scenarios.add_argument("--plot", metavar="DIR", help="also draw PNG charts into DIR (needs matplotlib)")
    scenarios.set_defaults(func=bench.cmd_bench_run)
    compare = benches.add_parser(
        "compare", help="the change of every figure between two `bench run --json` reports; exit 3 if one got worse"
    )
    compare.add_argument("before", help="the earlier report (JSON)")
    compare.add_argument("after", help="the later report (JSON)")
    compare.add_argument(
        "--threshold",
        type=percent,
        default=10.0,
        help="a figure worse by more than this many percent is a regression (default: 10)",
    )
    compare.set_defaults(func=bench.cmd_bench_compare)
    return parser
