"""Small benchmark of csmd_native: 4-bit and bf16 matvec GB/s, pool round trip, transformer_step vs floor.

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python native/bench_kernels.py [--rounds 10] [--backbone]
    python native/bench_kernels.py --batch [--rounds 7]

    python native/bench_kernels.py --attention [--rounds 9] [--against DIR]
    python native/bench_kernels.py --batch --against DIR [--rounds 9]

--batch times only the steps over B rows (transformer_step_batch for csm-1b's backbone, each row with a
context of 1000 positions, and depth_frame_batch for its depth decoder) against B one-row calls, the two
alternated in one run, and prints medians and their ratio.

--attention times the backbone step's attention alone: csm-1b's attention shapes (16 layers, 32 query heads
over 8 kv heads of 64) with projections so narrow (hidden 64) that their weights are negligible, at a long
context and at position 0; the difference is the attention over the context. It runs over fp32 caches and
bf16 ones (half the bytes, widened to fp32 as read), alternated round by round.

--against DIR: A/B against another build of the extension, the `_ext` library in DIR (e.g. a build of main),
loaded beside this one; its runs join the same alternation (fp32 caches: an older build takes no others).
With --batch, it times the batched calls of both builds instead of batched against one-row calls, and this
build's batched backbone step over bf16 caches too.

Bandwidth reference: numpy's np.dot(x, x) over a 512 MiB float64 array (threads set by the env above),
measured in the same run; every figure is repeated `rounds` times (best kept) since the machine is shared.
The matvecs cycle over copies of the matrix totalling >= 256 MiB so that they stream from memory rather than
the last-level cache (each call also pays MLX's per-call cost, tens of microseconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

# the installed package, not the source folder next to this script
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import csmd_native as cn  # noqa: E402


def best(fn, n: int, rounds: int) -> float:
    fn()
    t = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t.append((time.perf_counter() - t0) / n)
    return min(t)


def best_modes(fn, n: int, rounds: int) -> dict[str, float]:
    """Best time per call of fn() under each matvec mode, the modes interleaved round by round."""
    out = {m: float("inf") for m in modes()}
    for _ in range(rounds):
        for m in out:
            cn.set_matvec_mode(m)
            out[m] = min(out[m], best(fn, n, 1))
    return out


def numpy_bw(rounds: int) -> float:
    x = np.ones(512 << 17)  # 512 MiB of float64
    return x.nbytes / best(lambda: np.dot(x, x), 3, rounds) / 1e9


def qw(n: int, k: int, seed: int = 0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * k**-0.5
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    mx.eval(wq, s, b)
    return wq, s, b


def nbytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays)


def bw16(n: int, k: int, seed: int = 0):
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * k**-0.5).astype(mx.bfloat16)
    mx.eval(w)
    return (w,)


def stack(n_layers, hidden, heads, kv_heads, head_dim, inter, max_len, bits=4):
    proj = bw16 if bits == 16 else qw
    flat = []
    for layer in range(n_layers):
        flat.append(mx.ones((hidden,)))
        for i, (o, k) in enumerate(
            [
                (heads * head_dim, hidden),
                (kv_heads * head_dim, hidden),
                (kv_heads * head_dim, hidden),
                (hidden, heads * head_dim),
            ]
        ):
            flat += proj(o, k, 10 * layer + i)
        flat.append(mx.ones((hidden,)))
        for i, (o, k) in enumerate([(inter, hidden), (inter, hidden), (hidden, inter)]):
            flat += proj(o, k, 10 * layer + 5 + i)
    inv = 1.0 / (500000.0 ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
    shape = (n_layers, kv_heads, max_len, head_dim)
    return flat, inv, shape


def bench_step(name, cfg, pos, rounds, bw, bits=4):
    flat, inv, shape = stack(**cfg, bits=bits)
    wbytes = nbytes(*[a for a in flat if a.dtype != mx.float32])
    x = mx.random.normal((1, cfg["hidden"]))
    ck, cv = mx.zeros(shape), mx.zeros(shape)
    mx.eval(x, ck, cv)

    def step():  # the cache is only read; the new position's rows are returned (not stored here)
        h, new_k, new_v = cn.transformer_step(x, flat, ck, cv, pos, inv, cfg["heads"], cfg["kv_heads"], 1e-5, 64, bits)
        mx.eval(h, new_k, new_v)

    if bits == 16:  # the matvec mode only affects quantized weights
        t = best(step, 3, rounds)
        floor = wbytes / (bw * 1e9)
        print(
            f"  {name} step bf16   {t * 1e3:7.2f} ms  floor {floor * 1e3:.2f} ms  ratio {t / floor:.2f}"
            f"  ({wbytes / 1e6:.1f} MB weights)"
        )
        return

    for mode, t in best_modes(step, 3, rounds).items():
        floor = wbytes / (bw * 1e9)
        print(
            f"  {name} step {mode:6s} {t * 1e3:7.2f} ms  floor {floor * 1e3:.2f} ms  ratio {t / floor:.2f}"
            f"  ({wbytes / 1e6:.1f} MB weights)"
        )


def median_pair(batched, singles, rounds: int) -> tuple[float, float]:
    """Median times of batched() and singles(), alternated round by round (which goes first alternates too)."""
    batched()
    singles()
    times: dict[str, list[float]] = {"batched": [], "singles": []}
    for r in range(rounds):
        order = [("batched", batched), ("singles", singles)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return float(np.median(times["batched"])), float(np.median(times["singles"]))


def median_each(fns: dict, rounds: int) -> dict[str, float]:
    """Median time of each fn, all alternated round by round (the order rotating, so none always goes first)."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def load_build(directory: str):
    """The extension library (`_ext*`) in `directory`, loaded as a module of its own beside csmd_native."""
    import importlib.util

    [lib] = Path(directory).glob("_ext*")
    spec = importlib.util.spec_from_file_location("_ext", lib)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CSM_1B_BACKBONE = dict(n_layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, inter=8192)
CSM_1B_DECODER = dict(n_layers=4, hidden=1024, heads=8, kv_heads=2, head_dim=128, inter=8192)


def bench_batch_backbone(rounds: int, batches: list[int], context: int = 1000) -> None:
    cfg = CSM_1B_BACKBONE
    flat, inv, shape = stack(**cfg, max_len=context + 1)
    rng = np.random.default_rng(0)
    n = max(batches)
    caches = [mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2 * n)]
    x = mx.random.normal((n, cfg["hidden"]))
    mx.eval(x, *caches)
    ks, vs = caches[:n], caches[n:]
    args = (inv, cfg["heads"], cfg["kv_heads"], 1e-5, 64, 4)
    for b in batches:

        def batched(b=b):
            mx.eval(*cn.transformer_step_batch(x[:b], flat, ks[:b], vs[:b], [context] * b, *args))

        def singles(b=b):
            for i in range(b):
                mx.eval(*cn.transformer_step(x[i : i + 1], flat, ks[i], vs[i], context, *args))

        tb, ts = median_pair(batched, singles, rounds)
        print(
            f"  backbone B={b}: batched {tb * 1e3:7.1f} ms  {b} x one row {ts * 1e3:7.1f} ms"
            f"  batched / one row {tb / (ts / b):.2f}"
        )


def bench_attention(rounds: int, contexts: list[int], other=None) -> None:
    """The backbone step's attention at each context: the step there minus the step at position 0 (the same
    negligible weights), over fp32 and bf16 caches, and with `other` (another build) over fp32 ones."""
    cfg = dict(CSM_1B_BACKBONE, hidden=64, inter=64)
    max_len = max(contexts) + 1
    flat, inv, shape = stack(**cfg, max_len=max_len, bits=16)
    rng = np.random.default_rng(0)
    caches = {"fp32": [mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2)]}
    caches["bf16"] = [c.astype(mx.bfloat16) for c in caches["fp32"]]
    x = mx.random.normal((1, cfg["hidden"]))
    mx.eval(x, *flat, *caches["fp32"], *caches["bf16"])
    args = (inv, cfg["heads"], cfg["kv_heads"], 1e-5, 64, 16)
    runs = {"this build, fp32 cache": (cn, "fp32"), "this build, bf16 cache": (cn, "bf16")}
    if other is not None:
        runs["other build, fp32 cache"] = (other, "fp32")

    def step(module, kv: str, position: int):
        ck, cv = caches[kv]
        return lambda: mx.eval(*module.transformer_step(x, flat, ck, cv, position, *args))

    for context in contexts:
        fns = {}
        for name, (module, kv) in runs.items():
            fns[(name, context)] = step(module, kv, context)
            fns[(name, 0)] = step(module, kv, 0)
        t = median_each(fns, rounds)
        attention = {name: t[(name, context)] - t[(name, 0)] for name in runs}
        base = attention["other build, fp32 cache" if other is not None else "this build, fp32 cache"]
        for name, kv in ((name, kv) for name, (_, kv) in runs.items()):
            mb = 2 * caches[kv][0].nbytes * (context + 1) / max_len / 1e6
            print(
                f"  attention over {context + 1} positions, {name}: {attention[name] * 1e3:7.2f} ms"
                f"  ({attention[name] / base:.2f}x; step {t[(name, context)] * 1e3:.2f} ms, at position 0"
                f" {t[(name, 0)] * 1e3:.2f} ms; {mb:.0f} MB of cache)"
            )


def bench_against(other, rounds: int, batches: list[int], context: int = 1000) -> None:
    """The batched backbone step (each row at `context`) and depth frame of this build against `other`'s,
    alternated; this build's backbone step over bf16 caches too."""
    cfg = CSM_1B_BACKBONE
    flat, inv, shape = stack(**cfg, max_len=context + 1)
    rng = np.random.default_rng(0)
    n = max(batches)
    fp32 = [mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2 * n)]
    bf16 = [c.astype(mx.bfloat16) for c in fp32]
    x = mx.random.normal((n, cfg["hidden"]))
    mx.eval(x, *fp32, *bf16)
    args = (inv, cfg["heads"], cfg["kv_heads"], 1e-5, 64, 4)
    for b in batches:

        def batched(module, caches, b=b):
            ks, vs = caches[:b], caches[n : n + b]
            return lambda: mx.eval(*module.transformer_step_batch(x[:b], flat, ks, vs, [context] * b, *args))

        t = median_each({"other": batched(other, fp32), "this": batched(cn, fp32), "bf16": batched(cn, bf16)}, rounds)
        print(
            f"  backbone B={b}: other build {t['other'] * 1e3:7.1f} ms  this build {t['this'] * 1e3:7.1f} ms"
            f" ({t['this'] / t['other']:.2f}x)  this build, bf16 caches {t['bf16'] * 1e3:7.1f} ms"
            f" ({t['bf16'] / t['other']:.2f}x)"
        )
    dcfg = CSM_1B_DECODER
    codebooks, vocab, embed = 31, 2051, 2048
    dflat, dinv, _ = stack(**dcfg, max_len=codebooks + 1)
    heads = [a.reshape(codebooks, vocab, -1) for a in qw(codebooks * vocab, dcfg["hidden"], 7)]
    table, projection = list(qw((codebooks + 1) * vocab, embed, 8)), list(qw(dcfg["hidden"], embed, 9))
    x0, noise, norm = (
        mx.random.normal((n, 2, dcfg["hidden"])),
        mx.random.gumbel((n, codebooks, vocab)),
        mx.ones((dcfg["hidden"],)),
    )
    mx.eval(x0, noise, norm, *heads)
    dargs = (dflat, dinv, norm, heads, table, projection)
    dims = (dcfg["heads"], dcfg["kv_heads"], 1e-5, 64, 4)
    rule = dict(temperature=0.9, top_k=50, top_p=1.0, min_p=0.0, codebook_size=2048)
    for b in batches:
        rules = {k: [v] * b for k, v in rule.items()}

        def frame(module, b=b, rules=rules):
            return lambda: mx.eval(module.depth_frame_batch(x0[:b], *dargs, noise[:b], *dims, **rules))

        t = median_each({"other": frame(other), "this": frame(cn)}, rounds)
        print(
            f"  depth frame B={b}: other build {t['other'] * 1e3:7.1f} ms  this build {t['this'] * 1e3:7.1f} ms"
            f" ({t['this'] / t['other']:.2f}x)"
        )


def bench_batch_depth(rounds: int, batches: list[int]) -> None:
    cfg = CSM_1B_DECODER
    codebooks, vocab, embed = 31, 2051, 2048
    flat, inv, _ = stack(**cfg, max_len=codebooks + 1)
    heads = [a.reshape(codebooks, vocab, -1) for a in qw(codebooks * vocab, cfg["hidden"], 7)]
    table = list(qw((codebooks + 1) * vocab, embed, 8))
    projection = list(qw(cfg["hidden"], embed, 9))
    mx.eval(*heads)
    n = max(batches)
    x0 = mx.random.normal((n, 2, cfg["hidden"]))
    noise = mx.random.gumbel((n, codebooks, vocab))
    norm = mx.ones((cfg["hidden"],))
    mx.eval(x0, noise, norm)
    args = (flat, inv, norm, heads, table, projection)
    dims = (cfg["heads"], cfg["kv_heads"], 1e-5, 64, 4)
    rule = dict(temperature=0.9, top_k=50, top_p=1.0, min_p=0.0, codebook_size=2048)  # csmd's default sampling
    for b in batches:
        rules = {k: [v] * b for k, v in rule.items()}

        def batched(b=b, rules=rules):
            mx.eval(cn.depth_frame_batch(x0[:b], *args, noise[:b], *dims, **rules))

        def singles(b=b):
            for i in range(b):
                mx.eval(cn.depth_frame(x0[i], *args, noise[i], *dims, **rule))

        tb, ts = median_pair(batched, singles, rounds)
        print(
            f"  depth frame B={b}: batched {tb * 1e3:7.1f} ms  {b} x one row {ts * 1e3:7.1f} ms"
            f"  batched / one row {tb / (ts / b):.2f}"
        )


def modes() -> list[str]:
    out = ["exact", "int8"]
    try:
        cn.set_matvec_mode("int16")
        out.append("int16")
    except ValueError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--backbone", action="store_true")
    ap.add_argument("--batch", action="store_true", help="only the steps over B rows against B one-row calls")
    ap.add_argument("--attention", action="store_true", help="only the backbone step's attention")
    ap.add_argument("--against", metavar="DIR", help="A/B against the extension library built in DIR")
    a = ap.parse_args()
    other = load_build(a.against) if a.against else None
    print(f"threads {cn.num_threads()}, variant {cn.cpu_features()['variant']}")
    if a.attention:
        bench_attention(a.rounds, [1000, 2047], other)
        return
    if a.batch:
        print(f"matvec mode {cn.get_effective_matvec_mode()}; csm-1b shapes, 4 bits, groups of 64, bf16 scales")
        if other is not None:
            bench_against(other, a.rounds, [1, 2, 4, 8])
            return
        bench_batch_backbone(a.rounds, [1, 2, 4, 8])
        bench_batch_depth(a.rounds, [1, 2, 4, 8])
        return
    bw = numpy_bw(max(3, a.rounds // 2))
    print(f"numpy read bandwidth {bw:.1f} GB/s")
    if hasattr(cn, "_pool_roundtrip_us"):
        print(f"pool no-op round trip {min(cn._pool_roundtrip_us(20000) for _ in range(a.rounds)):.2f} us")
    for n, k in [(8192, 2048), (2048, 8192), (8192, 1024), (1024, 8192)]:
        # Copies totalling >= 256 MiB, cycled: one matrix alone would sit in the last-level cache.
        copies = [qw(n, k, seed) for seed in range(max(1, (256 << 20) // (n * k // 2)))]
        x = mx.random.normal((1, k))
        mx.eval(x)
        it = iter(range(1 << 62))

        def run4(copies=copies, x=x, it=it):
            mx.eval(cn.quantized_matmul(x, *copies[next(it) % len(copies)]))

        for mode, t in best_modes(run4, 2 * len(copies), a.rounds).items():
            gbs = nbytes(*copies[0]) / t / 1e9
            print(f"  {n}x{k} 4-bit {mode:6s} {t * 1e6:8.1f} us  {gbs:5.1f} GB/s  ({gbs / bw:.2f} of numpy)")
    for n, k in [(4096, 4096), (8192, 2048)]:
        copies = [bw16(n, k, seed)[0] for seed in range(max(1, (256 << 20) // (2 * n * k)))]
        x = mx.random.normal((1, k))
        mx.eval(x)
        it = iter(range(1 << 62))

        def run16(copies=copies, x=x, it=it):
            mx.eval(cn.matmul(x, copies[next(it) % len(copies)]))

        t = best(run16, 2 * len(copies), a.rounds)
        gbs = 2 * n * k / t / 1e9
        w0 = copies[0]
        t_mlx = best(lambda w0=w0, x=x: mx.eval(x @ w0.T), 2, 2)
        print(
            f"  {n}x{k} bf16  native {t * 1e6:8.1f} us  {gbs:5.1f} GB/s  ({gbs / bw:.2f} of numpy)"
            f"   mlx x @ w.T {t_mlx * 1e3:.1f} ms"
        )
    depth = dict(n_layers=4, hidden=1024, heads=8, kv_heads=2, head_dim=128, inter=8192, max_len=32)
    bench_step("depth", depth, 16, a.rounds, bw)
    bench_step("depth", depth, 16, a.rounds, bw, bits=16)
    if a.backbone:
        bb = dict(n_layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, inter=8192, max_len=2048)
        bench_step("backbone", bb, 100, a.rounds, bw)
    cn.set_matvec_mode("exact")


if __name__ == "__main__":
    main()
