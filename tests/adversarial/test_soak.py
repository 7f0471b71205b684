"""The soak: 8 clients doing random, often hostile, things to one daemon for a bounded time (seeded).

Throughout, a fresh client (a separate process) is welcomed and answered within 200 ms; every request of a
connection the client did not break itself ends exactly once, every cancel is answered exactly once, and every
stream is whole; afterwards the daemon's resident memory is within 10% of where it was after a warm-up, and
it shuts down cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from adversarial.hostile import DaemonProcess, Msg, RawClient, frame, speak, start_prober

SEED = 16
CLIENTS = 8
SOAK_SECONDS = 20.0
FRESH_CLIENT_SECONDS = 0.2
RSS_GROWTH = 1.10
# Lengths of context audio, in frames. Mimi's encoder keeps a compiled trace per input shape for good (a bounded
# set: a chunk is at most 125 frames), so the warm-up encodes each length the soak will use once.
AUDIO_FRAMES = (2, 7, 25, 50)


@dataclass
class Request:
    started: bool = False
    ended: bool = False
    chunks: int = 0
    cancels: int = 0  # cancels sent
    answers: int = 0  # cancels answered (cancelled or no_such_request)


@dataclass
class Ledger:
    """What one connection has been promised: every check of "lost or doubled" happens as messages arrive."""

    requests: dict[str, Request] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def receive(self, msg: Msg) -> None:
        kind = msg["type"]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if "request" not in msg:
            return
        r = self.requests[msg["request"]]  # a message about a request never sent is a bug too (KeyError)
        if kind == "audio.start":
            assert not r.started and not r.ended, msg
            r.started = True
        elif kind == "audio.chunk":
            assert r.started and not r.ended and msg["seq"] == r.chunks, msg
            r.chunks += 1
        elif kind == "audio.end":
            assert r.started and not r.ended and msg["frames"] == r.chunks, msg
            r.ended = True
        elif kind == "cancelled" or (kind == "error" and msg["code"] == "no_such_request"):
            assert r.ended and r.answers < r.cancels, msg  # answered once, after the request's end
            r.answers += 1
        elif kind == "error":
            assert not r.ended and not msg["fatal"], msg
            r.ended = not r.started  # a refusal ends a request; after audio.start its audio.end follows

    def settled(self) -> bool:
        return all(r.ended and r.answers == r.cancels for r in self.requests.values())


class Worker:
    """One client: connection after connection, each a random run of actions, all checked by a ledger."""

    def __init__(self, daemon: DaemonProcess, index: int):
        self.daemon = daemon
        self.rng = random.Random(SEED * 1000 + index)
        self.name = f"w{index}"
        self.lives = 0
        self.ids = 0
        self.done: dict[str, int] = {}
        self.client: RawClient
        self.ledger: Ledger

    async def run(self, until: float) -> None:
        while trio.current_time() < until:
            await self.life(until)

    async def life(self, until: float) -> None:
        self.lives += 1
        self.client = await RawClient.connect(self.daemon.socket, name=self.name)
        self.ledger = Ledger()
        await self.client.send(type="session.open", session="s")
        await self.read_until(lambda x: x["type"] in ("session.opened", "error"))
        actions: list[tuple[Callable[[], Awaitable[bool]], int]] = [
            (self.speak_whole, 6), (self.speak_then_cancel, 4), (self.speak_and_cancel_at_once, 3),
            (self.add_text, 2), (self.add_audio, 2), (self.clear, 1), (self.out_of_range, 2),
            (self.slow_reader, 1), (self.slow_writer, 1), (self.oversized, 1), (self.hostile, 1),
            (self.vanish, 1),
        ]  # fmt: skip
        for _ in range(self.rng.randint(3, 12)):
            if trio.current_time() >= until:
                break
            action = self.rng.choices([a for a, _ in actions], [w for _, w in actions])[0]
            self.done[action.__name__] = self.done.get(action.__name__, 0) + 1
            if not await action():  # the connection is over (by design)
                return
            assert self.ledger.settled(), self.ledger
        await self.client.ping(7)
        assert self.ledger.settled(), self.ledger
        await self.client.aclose()

    # ---- helpers ----

    def new_request(self) -> str:
        self.ids += 1
        request = f"{self.name}-{self.ids}"
        self.ledger.requests[request] = Request()
        return request

    async def read_until(self, done: Callable[[Msg], bool]) -> Msg:
        while True:
            msg = await self.client.recv()
            assert msg is not None, f"{self.name}: the daemon closed a connection it had no reason to close"
            self.ledger.receive(msg)
            if done(msg):
                return msg

    async def settle(self) -> None:
        while not self.ledger.settled():
            await self.read_until(lambda x: True)

    async def expect_fatal(self, code: str) -> bool:
        msgs = await self.client.until_closed()
        assert msgs and msgs[-1]["type"] == "error" and msgs[-1]["fatal"] and msgs[-1]["code"] == code, msgs
        return False

    # ---- actions: each returns whether the connection goes on ----

    async def speak_whole(self) -> bool:
        request = self.new_request()
        await self.client.send(**speak("s", request, max_frames=self.rng.randint(1, 30), seed=self.rng.randrange(99)))
        await self.settle()
        return True

    async def speak_then_cancel(self) -> bool:
        request = self.new_request()
        await self.client.send(**speak("s", request, max_frames=200))
        chunks = self.rng.randint(0, 4)
        await self.read_until(lambda x: (x["type"] == "audio.chunk" and x["seq"] >= chunks) or x["type"] == "error")
        self.ledger.requests[request].cancels += 1
        await self.client.send(type="cancel", request=request)
        await self.settle()
        return True

    async def speak_and_cancel_at_once(self) -> bool:
        request = self.new_request()
        cancels = self.rng.randint(1, 2)
        self.ledger.requests[request].cancels = cancels
        cancel = frame({"type": "cancel", "request": request})
        await self.client.send_raw(frame(speak("s", request, max_frames=200)) + cancel * cancels)
        await self.settle()
        return True

    async def add_text(self) -> bool:
        await self.client.send(type="context.add", session="s", speaker=self.rng.randint(0, 3), text="Some words.")
        await self.read_until(lambda x: x["type"] in ("context.added", "error") and "request" not in x)
        return True

    async def add_audio(self, frames: int | None = None, rate: int | None = None) -> bool:
        rate = rate or self.rng.choice([8_000, 16_000, 22_050, 24_000, 44_100, 48_000])
        frames = frames or self.rng.choice(AUDIO_FRAMES)
        samples = frames * 1920 * rate // 24_000  # whole frames once resampled: one of AUDIO_FRAMES' shapes
        pcm = (0.2 * np.sin(np.arange(samples) * 0.05) * 32767).astype("<i2").tobytes()
        await self.client.send(type="context.add", session="s", speaker=1, text="", audio=pcm, rate=rate,
                               format="pcm_s16le")  # fmt: skip
        await self.read_until(lambda x: x["type"] in ("context.added", "error") and "request" not in x)
        return True

    async def clear(self) -> bool:
        await self.client.send(type="context.clear", session="s")
        await self.read_until(lambda x: x["type"] in ("context.cleared", "error") and "request" not in x)
        return True

    async def out_of_range(self) -> bool:
        request = self.new_request()
        bad = self.rng.choice([{"top_k": 2**31}, {"top_p": 1e-46}, {"temperature": 50.0}, {"speaker": 10**6}])
        await self.client.send(**{**speak("s", request), **bad})
        msg = await self.read_until(lambda x: x.get("request") == request)
        assert msg["type"] == "error" and msg["code"] == "invalid_params", msg
        return True

    async def slow_reader(self) -> bool:
        request = self.new_request()
        await self.client.send(**speak("s", request, max_frames=15))
        while not self.ledger.requests[request].ended:
            await self.read_until(lambda x: True)
            await trio.sleep(0.03)  # the reply waits for this reader; the others do not
        return True

    async def slow_writer(self) -> bool:
        data = frame({"type": "ping", "nonce": 99})
        for i in range(len(data)):
            await self.client.send_raw(data[i : i + 1])
            await trio.sleep(0.01)
        await self.read_until(lambda x: x["type"] == "pong")
        return True

    async def oversized(self) -> bool:
        await self.client.send_raw(struct.pack(">I", 16 * 1024 * 1024 + 1) + b"\x80" * 1000)
        return await self.expect_fatal("too_large")

    async def hostile(self) -> bool:
        nested: object = 0
        for _ in range(300):
            nested = [nested]
        payload, code = self.rng.choice(
            [
                (frame({"type": "ping", "nonce": 1, "x": nested}), "malformed"),
                (frame({"type": "session.open", "session": "s" * 300}), "bad_field"),
                (frame({"type": "no.such.type"}), "unknown_type"),
                (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "malformed"),
                (frame({"type": "hello", "protocol": [1], "client": "again"}), "out_of_order"),
            ]
        )
        await self.client.send_raw(payload)
        return await self.expect_fatal(code)

    async def vanish(self) -> bool:
        request = self.new_request()
        await self.client.send(**speak("s", request, max_frames=200))
        await self.read_until(lambda x: x["type"] == "audio.chunk" or x["type"] == "error")
        await self.client.aclose()  # mid-stream, without a word
        return False


async def warm_up(daemon: DaemonProcess) -> None:
    """One of everything, so that memory the daemon keeps for good (compiled graphs, caches) is counted in the
    start figure, not as growth."""
    worker = Worker(daemon, 99)
    worker.client = await RawClient.connect(daemon.socket)
    worker.ledger = Ledger()
    await worker.client.open("s")
    for action in (worker.speak_whole, worker.speak_then_cancel, worker.add_text, worker.clear):
        await action()
    for frames in AUDIO_FRAMES:
        await worker.add_audio(frames, rate=24_000)
        await worker.clear()
    await worker.client.aclose()


async def test_soak(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon("--max-sessions", "32")
    await warm_up(daemon)
    await trio.sleep(0.5)
    rss_start = daemon.rss_bytes()
    prober = start_prober(daemon.socket, SOAK_SECONDS)
    workers = [Worker(daemon, i) for i in range(CLIENTS)]
    until = trio.current_time() + SOAK_SECONDS
    async with trio.open_nursery() as nursery:
        for worker in workers:
            nursery.start_soon(worker.run, until)
    out, err = await trio.to_thread.run_sync(prober.communicate)
    assert prober.returncode == 0, err
    probes = [json.loads(line)["seconds"] for line in out.splitlines()]
    await trio.sleep(1.0)  # the daemon notices the last connections close and frees their sessions
    rss_end = daemon.rss_bytes()

    done: dict[str, int] = {}
    for worker in workers:
        for name, count in worker.done.items():
            done[name] = done.get(name, 0) + count
    report = (f"{sum(w.lives for w in workers)} connections, actions {done}, {len(probes)} probes (slowest "
              f"{max(probes) * 1000:.0f} ms), RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB")  # fmt: skip
    print(report)
    assert len(probes) >= SOAK_SECONDS / 0.5, report
    assert max(probes) < FRESH_CLIENT_SECONDS, report
    assert rss_end <= RSS_GROWTH * rss_start, report
    assert all(count > 0 for count in done.values()) and len(done) == 12, report  # every action was exercised
    daemon.check_clean_exit()
