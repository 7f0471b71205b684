"""TurnTaker driven by synthetic VAD sequences: (seconds, speech) segments cut into frames (20 ms unless said)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from csmd.talk.turns import Backchannel, BargeIn, Event, TurnConfig, TurnEnded, TurnStarted, TurnTaker

FRAME = 0.02
# A script step: a VAD segment (seconds, speech), or "start"/"stop": csmd begins/ends playback right there.
Step = tuple[float, bool] | str


class Feeder:
    """Feeds a script frame by frame, keeping stream time across calls: t = frames so far * frame, exactly."""

    def __init__(self, taker: TurnTaker, frame: float = FRAME):
        self.taker, self.frame, self.n = taker, frame, 0

    def run(self, script: Sequence[Step]) -> list[tuple[float, Event]]:
        """Returns (t of the feed call that emitted it, event), with the raw float times."""
        out: list[tuple[float, Event]] = []
        for step in script:
            if step == "start":
                self.taker.assistant_started(self.n * self.frame)
            elif step == "stop":
                self.taker.assistant_stopped(self.n * self.frame)
            else:
                assert isinstance(step, tuple)
                seconds, speech = step
                for _ in range(round(seconds / self.frame)):
                    self.n += 1
                    t = self.n * self.frame
                    out += [(t, e) for e in self.taker.feed(t, speech, self.frame)]
        return out

    def timed(self, script: Sequence[Step]) -> list[tuple[float, Event]]:
        """Like run, with every time rounded to the microsecond, so expected values can be written as decimals."""
        return [(round(t, 6), rounded(e)) for t, e in self.run(script)]


def rounded(e: Event) -> Event:
    # 47 * 0.02 is 0.9400000000000001 in binary; round(x, 6) gives back exactly the double nearest 0.94.
    if isinstance(e, TurnEnded | Backchannel):
        return type(e)(round(e.start, 6), round(e.end, 6))
    return type(e)(round(e.at, 6))


def drive(taker: TurnTaker, script: Sequence[Step], frame: float = FRAME) -> list[tuple[float, Event]]:
    return Feeder(taker, frame).timed(script)


def events(script: Sequence[Step], config: TurnConfig | None = None, frame: float = FRAME) -> list[Event]:
    return [e for _, e in drive(TurnTaker(config or TurnConfig()), script, frame)]


# -- the user's turn ----------------------------------------------------------------------------------------


def test_normal_turn() -> None:
    taker = TurnTaker(TurnConfig())
    assert taker.state == "idle"
    got = drive(taker, [(0.5, False), (1.0, True), (1.0, False)])
    # min_speech 0.25 s at 20 ms frames: the 13th speech frame (t = 0.76, 0.26 s of speech) opens the turn,
    # stamped with the speech onset; the 35th silent frame (0.7 s) closes it, stamped with the speech end.
    assert got == [
        (0.76, TurnStarted(0.5)),
        (2.2, TurnEnded(0.5, 1.5)),
    ]
    assert taker.state == "idle" and taker.turn_start is None


def test_state_while_a_turn_is_open() -> None:
    taker = TurnTaker(TurnConfig())
    assert drive(taker, [(0.24, True)]) == []
    before = taker.state
    assert before == "idle" and taker.turn_start is None  # 0.24 s of speech: not a turn yet
    assert taker.feed(0.26, True, FRAME) == [TurnStarted(0.0)]
    after = taker.state
    assert after == "user_speaking" and taker.turn_start == 0.0


def test_cough_is_a_backchannel_not_a_turn() -> None:
    got = drive(TurnTaker(TurnConfig()), [(1.0, False), (0.1, True), (2.0, False)])
    # Reported at the first silent frame after it.
    assert got == [(1.12, Backchannel(1.0, 1.1))]
    # The limit is inclusive: 0.24 s is a backchannel, 0.26 s (the next frame count) a turn.
    assert events([(0.24, True), (1.0, False)]) == [Backchannel(0.0, 0.24)]
    assert events([(0.26, True), (1.0, False)]) == [TurnStarted(0.0), TurnEnded(0.0, 0.26)]
    # Exactly min_speech also counts, despite 0.02 * n not being exact in binary.
    assert events([(0.3, True), (1.0, False)], TurnConfig(min_speech=0.3)) == [TurnStarted(0.0), TurnEnded(0.0, 0.3)]


def test_separate_short_bursts_do_not_add_up() -> None:
    # Two coughs 0.2 s apart: 0.32 s of speech in all, but neither run lasts min_speech.
    script: list[Step] = [(0.16, True), (0.2, False), (0.16, True), (1.0, False)]
    assert events(script) == [Backchannel(0.0, 0.16), Backchannel(0.36, 0.52)]


def test_pauses_inside_a_turn_do_not_end_it() -> None:
    script: list[Step] = [(0.5, True), (0.5, False), (0.1, True), (0.68, False), (0.4, True), (0.7, False)]
    got = drive(TurnTaker(TurnConfig()), script)
    # Short runs inside the turn are part of it, not backchannels.
    assert [e for _, e in got] == [TurnStarted(0.0), TurnEnded(0.0, 2.18)]
    assert got[-1][0] == 2.88


@pytest.mark.parametrize("frame", [0.01, 0.02, 0.032])
@pytest.mark.parametrize("end_silence", [0.7, 0.5, 0.35])
def test_turn_end_is_exact_to_a_frame(frame: float, end_silence: float) -> None:
    config = TurnConfig(end_silence=end_silence)
    speech_frames = 47
    # Raw times here (no rounding): the span must be the frame boundaries to within float error.
    got = Feeder(TurnTaker(config), frame).run([(10 * frame, False), (speech_frames * frame, True), (2.0, False)])
    started, ended = got
    assert isinstance(started[1], TurnStarted)
    assert started[1].at == pytest.approx(10 * frame, abs=1e-9)
    t, end = ended
    assert isinstance(end, TurnEnded)
    # The span is exactly the speech frames...
    assert end.start == pytest.approx(10 * frame, abs=1e-9)
    assert end.end == pytest.approx((10 + speech_frames) * frame, abs=1e-9)
    # ...and it is emitted by the first frame that completes end_silence: not before, at most a frame after.
    silent = t - end.end
    assert end_silence - 1e-9 <= silent < end_silence + frame - 1e-9
    assert math.ceil(end_silence / frame - 1e-6) * frame == pytest.approx(silent)


# -- csmd speaking: grace, barge-in, echo guard -------------------------------------------------------------


def test_barge_in_after_grace() -> None:
    taker = TurnTaker(TurnConfig())
    feeder = Feeder(taker)
    got = feeder.timed([(1.0, False), "start", (0.5, False), (0.5, True)])
    assert taker.assistant_speaking
    # barge_in_speech 0.15 s: the 8th frame (0.16 s) interrupts; the same frame opens the user's turn.
    assert got == [
        (1.66, BargeIn(1.5)),
        (1.66, TurnStarted(1.5)),
    ]
    assert taker.state == "user_speaking"
    assert feeder.timed(["stop"]) == []  # the loop stops playback at t = 2.0
    assert taker.state == "user_speaking" and not taker.assistant_speaking
    assert feeder.timed([(1.0, False)]) == [(2.7, TurnEnded(1.5, 2.0))]
    assert taker.state == "idle"


def test_full_conversation_script() -> None:
    script: list[Step] = [
        (0.3, False),
        (1.2, True),  # the user asks
        (0.8, False),  # ... TurnEnded at 1.5 + 0.7
        (0.4, False),  # reply being generated
        "start",  # t = 2.7: csmd plays
        (0.1, True),  # its own voice leaking in during the grace window: ignored
        (1.0, False),
        (0.1, True),  # "mm-hm" while it talks: a backchannel
        (0.5, False),
        (0.6, True),  # the user interrupts
        "stop",  # the loop cut playback
        (1.0, False),
    ]
    taker = TurnTaker(TurnConfig())
    assert [e for _, e in drive(taker, script)] == [
        TurnStarted(0.3),
        TurnEnded(0.3, 1.5),
        Backchannel(3.8, 3.9),
        BargeIn(4.4),
        TurnStarted(4.4),
        TurnEnded(4.4, 5.0),
    ]
    assert taker.state == "idle"


def test_speech_inside_grace_is_ignored() -> None:
    # Speech only inside the first 0.3 s of playback: no event of any kind, not even a backchannel.
    assert events(["start", (0.28, True), (2.0, False)]) == []
    # Speech that goes on past the grace window counts from the window's end.
    assert events(["start", (1.0, True)]) == [BargeIn(0.3), TurnStarted(0.3)]
    # A longer grace window moves it.
    assert events(["start", (1.0, True)], TurnConfig(grace=0.5)) == [BargeIn(0.5), TurnStarted(0.5)]
    # With no grace the very first frames count...
    assert events(["start", (1.0, True)], TurnConfig(grace=0.0)) == [BargeIn(0.0), TurnStarted(0.0)]
    # ...and a run that began before playback needs barge_in_speech of it after playback began (0.1 + 0.16),
    # but is stamped with its real onset.
    got = drive(TurnTaker(TurnConfig(grace=0.0)), [(0.1, True), "start", (0.3, True)])
    assert got == [(0.26, BargeIn(0.0)), (0.26, TurnStarted(0.0))]


def test_grace_is_measured_from_playback_start_only() -> None:
    # A second assistant_started during the same playback (next sentence) does not reopen the window...
    assert events(["start", (1.0, False), "start", (0.5, True)]) == [BargeIn(1.0), TurnStarted(1.0)]
    # ...but a new playback after a stop does.
    assert events(["start", (1.0, False), "stop", "start", (0.5, True)]) == [BargeIn(1.3), TurnStarted(1.3)]


def test_echo_guard_ignores_all_speech_while_csmd_talks() -> None:
    config = TurnConfig(echo_guard=True)
    taker = TurnTaker(config)
    assert drive(taker, ["start", (3.0, True), (0.5, False), (0.1, True)]) == []
    assert taker.state == "assistant_speaking"
    taker = TurnTaker(config)
    # After playback stops, speech is a normal turn again (min_speech, no BargeIn).
    got = events(["start", (2.0, True), "stop", (1.0, True), (1.0, False)], config)
    assert got == [TurnStarted(2.0), TurnEnded(2.0, 3.0)]


def test_short_speech_while_csmd_talks_is_a_backchannel() -> None:
    assert events(["start", (0.5, False), (0.14, True), (0.5, False)]) == [Backchannel(0.5, 0.64)]


def test_one_barge_in_per_playback() -> None:
    script: list[Step] = ["start", (0.5, False), (0.5, True), (1.0, False), (0.5, True), (1.0, False)]
    # The first interruption opens a turn that ends; the loop has not stopped playback (yet), and the next
    # speech is a plain turn again (needs min_speech), not a second BargeIn.
    assert events(script) == [
        BargeIn(0.5),
        TurnStarted(0.5),
        TurnEnded(0.5, 1.0),
        TurnStarted(2.0),
        TurnEnded(2.0, 2.5),
    ]


def test_user_already_talking_when_csmd_starts() -> None:
    # The user resumes while the reply is still being generated; playback starts under them.
    script: list[Step] = [(0.5, True), "start", (1.0, True), (1.0, False)]
    got = events(script)
    # Grace frames count as silence (the turn stays open: 0.3 s < end_silence), then the user's continued
    # speech interrupts: BargeIn only, because their turn is already open.
    assert got == [TurnStarted(0.0), BargeIn(0.8), TurnEnded(0.0, 1.5)]


def test_echo_guard_silence_ends_an_open_turn() -> None:
    # Half-duplex: once csmd talks, the open turn hears only silence and ends after end_silence.
    got = events([(0.5, True), "start", (1.0, True)], TurnConfig(echo_guard=True))
    assert got == [TurnStarted(0.0), TurnEnded(0.0, 0.5)]


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_speech": 0},
        {"end_silence": -1.0},
        {"barge_in_speech": math.nan},
        {"grace": -0.1},
        {"grace": math.inf},
        {"min_speech": True},
        {"end_silence": "0.7"},
        {"echo_guard": 1},
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="TurnConfig"):
        TurnConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_feeds_are_rejected() -> None:
    taker = TurnTaker(TurnConfig())
    taker.feed(1.0, True, FRAME)
    with pytest.raises(ValueError, match="stream order"):
        taker.feed(0.98, True, FRAME)
    with pytest.raises(ValueError, match="frame_seconds"):
        taker.feed(1.02, True, 0.0)
    with pytest.raises(ValueError, match="t must be"):
        taker.feed(math.nan, True, FRAME)
    with pytest.raises(ValueError, match="t must be"):
        taker.assistant_started(math.inf)
    assert taker.feed(1.0, True, FRAME) == []  # same t again is allowed (e.g. a re-fed frame) and state is intact


# -- properties over random VAD sequences -------------------------------------------------------------------

steps = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 60), st.booleans()),  # frames of speech / silence
        st.sampled_from(["start", "stop"]),
    ),
    max_size=40,
)
configs = st.builds(
    TurnConfig,
    min_speech=st.floats(0.01, 1.0),
    end_silence=st.floats(0.01, 1.5),
    barge_in_speech=st.floats(0.01, 0.6),
    grace=st.floats(0.0, 1.0),
    echo_guard=st.booleans(),
)


def key(e: Event) -> float:
    """The time an event is about: the moment the speech it reports began, or for TurnEnded, stopped."""
    return e.end if isinstance(e, TurnEnded) else e.start if isinstance(e, Backchannel) else e.at


@settings(max_examples=400, deadline=None)
@given(script=steps, config=configs, frame=st.sampled_from([0.01, 0.02, 0.032]))
def test_random_sequences_keep_the_invariants(
    script: list[tuple[int, bool] | str], config: TurnConfig, frame: float
) -> None:
    taker = TurnTaker(config)
    open_turn: float | None = None
    playing_since: float | None = None
    barged = False
    starts: list[float] = []
    last_key = -math.inf
    n = 0
    for step in script:
        if step == "start":
            if playing_since is None:
                playing_since, barged = n * frame, False
                starts.append(playing_since)
            taker.assistant_started(n * frame)
            continue
        if step == "stop":
            playing_since = None
            taker.assistant_stopped(n * frame)
            continue
        assert isinstance(step, tuple)
        count, speech = step
        for _ in range(count):
            n += 1
            t = n * frame
            for e in taker.feed(t, speech, frame):
                # Events come in time order, and never report the future.
                assert last_key - 1e-9 <= key(e) <= t + 1e-9
                last_key = key(e)
                if isinstance(e, TurnStarted):
                    assert open_turn is None
                    open_turn = e.at
                elif isinstance(e, TurnEnded):
                    assert open_turn is not None and e.start == open_turn  # never an end without its start
                    assert e.end - e.start >= min(config.min_speech, config.barge_in_speech) - 1e-9
                    assert config.end_silence - 1e-9 <= t - e.end < config.end_silence + frame + 1e-9
                    open_turn = None
                elif isinstance(e, BargeIn):
                    # Only while csmd plays, after its grace window, never half-duplex, once per playback.
                    assert playing_since is not None and not config.echo_guard and not barged
                    # barge_in_speech of it came after the grace window (with grace 0 it may have begun earlier).
                    assert t - max(e.at, playing_since + config.grace) >= config.barge_in_speech - 1e-9
                    assert config.grace < 1e-6 or e.at >= playing_since + config.grace - 1e-9
                    barged = True
                else:
                    # Too short for the rule in force. (A run that began before playback and went on into it,
                    # possible only with no grace window, was under both rules and may be longer.)
                    if not any(e.start + 1e-9 < s < e.end - 1e-9 for s in starts):
                        assert e.end - e.start < max(config.min_speech, config.barge_in_speech) + 1e-9
                    # Known only once its run has ended: at a silent frame, or one whose speech csmd's playback masks.
                    assert not speech or playing_since is not None
            assert (taker.state == "user_speaking") == (open_turn is not None)
            assert taker.assistant_speaking == (playing_since is not None)


# -- under trio's MockClock: the same machine, fed in (mock) real time --------------------------------------


async def listen(
    frames: trio.MemoryReceiveChannel[tuple[float, bool]], taker: TurnTaker, on_event: Callable[[Event], None]
) -> None:
    """What `csmd talk` does with the microphone: feed each frame as it arrives."""
    async for t, speech in frames:
        for e in taker.feed(t, speech, FRAME):
            on_event(e)


async def microphone(send: trio.MemorySendChannel[tuple[float, bool]], script: list[tuple[float, bool]]) -> None:
    """A live VAD: one decision every 20 ms of (trio) time, stamped with the stream time at the frame's end."""
    t0 = trio.current_time()
    async with send:
        for seconds, speech in script:
            for _ in range(round(seconds / FRAME)):
                await trio.sleep(FRAME)
                await send.send((trio.current_time() - t0, speech))


async def test_turn_ends_after_the_configured_silence_in_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    config = TurnConfig(end_silence=0.7)
    taker = TurnTaker(config)
    seen: list[tuple[float, Event]] = []
    start = trio.current_time()
    wall = time.perf_counter()
    send, receive = trio.open_memory_channel[tuple[float, bool]](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen, receive, taker, lambda e: seen.append((trio.current_time() - start, e)))
        nursery.start_soon(microphone, send, [(0.4, False), (1.5, True), (0.3, False), (0.5, True), (3.0, False)])
    assert time.perf_counter() - wall < 2.0  # 5.7 s of trio time went by without waiting for it

    assert [type(e) for _, e in seen] == [TurnStarted, TurnEnded]
    (started_at, started), (ended_at, ended) = seen
    assert isinstance(started, TurnStarted) and isinstance(ended, TurnEnded)
    assert started.at == pytest.approx(0.4, abs=1e-6)
    assert started_at == pytest.approx(0.4 + 0.26, abs=1e-6)  # min_speech later, rounded up to a frame
    # The 0.3 s pause did not end it; the end is the last speech frame, and it fired end_silence later.
    assert ended.start == pytest.approx(0.4, abs=1e-6) and ended.end == pytest.approx(2.7, abs=1e-6)
    assert ended_at == pytest.approx(2.7 + config.end_silence, abs=1e-6)
