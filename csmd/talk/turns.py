"""Turn-taking as a pure state machine: VAD decisions with stream timestamps in, conversation events out.

No I/O and no clock: the caller feeds one VAD decision per frame, stamped with the stream time (seconds of
microphone audio heard so far, monotonic), and tells it when csmd starts and stops playing a reply. The same
machine runs while the user talks and while csmd talks, which is what makes barge-in possible.

Time
    ``feed(t, speech, frame_seconds)`` describes the frame that covers ``[t - frame_seconds, t)``: ``t`` is the
    stream time at the frame's END, i.e. "now", the moment its decision became available. Every time inside
    an event is a frame boundary at which audio happened (when speech began or last stopped), never the time
    it was detected; the event comes out of the ``feed`` call whose frame completed the detection, so the
    detection time is that call's ``t``. ``assistant_started``/``assistant_stopped`` take times on the same
    stream clock.

Rules
    - Speech is counted in runs of consecutive speech frames; one non-speech frame ends a run.
    - A run becomes a user turn when it has lasted ``min_speech``: ``TurnStarted(at)`` with ``at`` the run's
      first frame start. A run that ends sooner is a ``Backchannel(start, end)`` (a cough, "mm-hm"), emitted
      at its first silent frame, and no turn.
    - Inside a turn, pauses do not end it; ``end_silence`` of continuous silence does:
      ``TurnEnded(start, end)`` with ``end`` the end of the last speech frame, emitted by the frame that
      completes the silence (at ``end + end_silence``, to within a frame).
    - While the assistant is speaking (between ``assistant_started`` and ``assistant_stopped``):
      * speech in frames that start within ``grace`` seconds of ``assistant_started`` is treated as silence:
        it is most likely csmd's own voice coming back through the speakers before any echo canceller has
        converged, and the start of playback is where that is loudest;
      * with ``echo_guard`` (half-duplex, for setups with no echo cancellation at all), ALL speech is treated
        as silence for the whole time the assistant speaks, so there is never a barge-in;
      * otherwise a run with ``barge_in_speech`` of it after the grace window (shorter than ``min_speech``,
        because interrupting must feel immediate) yields ``BargeIn(at)`` with ``at`` the run's start,
        followed by ``TurnStarted(at)`` at the same time: the interruption is the start of the user's turn.
        If the user's turn was already open when csmd started, only ``BargeIn`` is emitted. There is at most
        one ``BargeIn`` per playback; after it, until ``assistant_stopped``, speech follows the ``min_speech``
        rule again. Runs too short to interrupt are ``Backchannel`` as usual.
      Speech treated as silence also counts toward ``end_silence`` of a turn in progress. With ``grace`` 0,
      a run that began before playback goes on under the barge-in rule, so if it stops before reaching
      ``barge_in_speech`` of playback it is a ``Backchannel`` even when it was longer than ``min_speech``.
    - ``assistant_started`` while already speaking and ``assistant_stopped`` while not are no-ops, so a reply
      made of several sentences keeps the grace window of its first one. There is no grace after playback
      stops: a room's echo tail is far shorter than ``min_speech``.

``state`` is ``"user_speaking"`` while a user turn is open (including after a barge-in, before the caller has
called ``assistant_stopped``), else ``"assistant_speaking"`` while csmd plays, else ``"idle"``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

# Stream times are sums of frame lengths (e.g. 0.02 s) in floating point; a duration that should be exactly
# min_speech may come out a few ulps short. A nanosecond is far below any frame and far above that error.
_EPS = 1e-9


@dataclass(frozen=True)
class TurnConfig:
    min_speech: float = 0.25  # seconds of continuous speech before a run counts as a turn (coughs, "mm-hm" don't)
    end_silence: float = 0.7  # seconds of continuous silence that end the user's turn
    # Seconds of user speech, while csmd talks, that interrupt it. The < 100 ms barge-in budget is for stopping
    # playback AFTER detection; detection itself needs this much speech to tell a word from a click.
    barge_in_speech: float = 0.15
    grace: float = 0.3  # after csmd STARTS talking, ignore user speech this long (its own voice, echo tail)
    echo_guard: bool = False  # while csmd talks, ignore all user speech (half-duplex): no echo cancellation

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError unless every duration is a finite number of seconds in range."""
        durations = {
            "min_speech": self.min_speech,
            "end_silence": self.end_silence,
            "barge_in_speech": self.barge_in_speech,
            "grace": self.grace,
        }
        for name, value in durations.items():
            _check_seconds(value, f"TurnConfig.{name}")
            if value < 0 or (value == 0 and name != "grace"):  # grace 0 is "no grace"; the rest need a length
                bound = ">= 0" if name == "grace" else "> 0"
                raise ValueError(f"TurnConfig.{name} must be {bound} seconds, got {value!r}")
        if not isinstance(self.echo_guard, bool):
            raise ValueError(f"TurnConfig.echo_guard must be a bool, got {self.echo_guard!r}")


@dataclass(frozen=True)
class TurnStarted:
    at: float  # start of the speech that became the turn


@dataclass(frozen=True)
class TurnEnded:
    start: float  # the user's turn, as a span of stream time: its first speech ...
    end: float  # ... to the end of its last speech frame (the trailing silence is not part of it)


@dataclass(frozen=True)
class BargeIn:
    at: float  # start of the user's speech that interrupted csmd


@dataclass(frozen=True)
class Backchannel:
    start: float  # speech too short to be a turn or a barge-in; reported for stats only
    end: float


Event = TurnStarted | TurnEnded | BargeIn | Backchannel
State = Literal["idle", "user_speaking", "assistant_speaking"]


class TurnTaker:
    """Feed it VAD frames in stream order; it returns what each frame made happen (usually nothing)."""

    def __init__(self, config: TurnConfig | None = None):
        self.config = config if config is not None else TurnConfig()
        self.config.validate()
        self._now = -math.inf  # t of the last frame fed, to insist on stream order
        self._run_start: float | None = None  # start of the current run of (counted) speech frames
        self._last_speech_end = -math.inf  # end of the latest counted speech frame
        self._turn_start: float | None = None  # open user turn
        self._assistant_since: float | None = None  # assistant_started time while csmd plays
        self._barged = False  # a BargeIn was already emitted for this stretch of playback

    @property
    def state(self) -> State:
        if self._turn_start is not None:
            return "user_speaking"
        if self._assistant_since is not None:
            return "assistant_speaking"
        return "idle"

    @property
    def assistant_speaking(self) -> bool:
        return self._assistant_since is not None

    @property
    def speech_run_open(self) -> bool:
        """The latest frame was counted speech (not silence, not suppressed as echo or within grace)."""
        return self._run_start is not None

    @property
    def turn_start(self) -> float | None:
        """Start of the open user turn, or None."""
        return self._turn_start

    def assistant_started(self, t: float) -> None:
        """csmd began playing a reply at stream time ``t``."""
        _check_seconds(t, "t")
        if self._assistant_since is None:
            self._assistant_since = t
            self._barged = False

    def assistant_stopped(self, t: float) -> None:
        """Playback ended or was cut at stream time ``t``."""
        _check_seconds(t, "t")
        self._assistant_since = None

    def feed(self, t: float, speech: bool, frame_seconds: float) -> list[Event]:
        """One VAD frame covering ``[t - frame_seconds, t)``; returns the events it completes, in order."""
        _check_seconds(t, "t")
        _check_seconds(frame_seconds, "frame_seconds")
        if frame_seconds <= 0:
            raise ValueError(f"frame_seconds must be a positive number of seconds, got {frame_seconds!r}")
        if t < self._now:
            raise ValueError(f"frames must be fed in stream order: t={t} after t={self._now}")
        self._now = t
        start = t - frame_seconds
        if speech and self._suppressed(start):
            speech = False
        return self._speech(start, t) if speech else self._silence(t)

    def _suppressed(self, frame_start: float) -> bool:
        if self._assistant_since is None:
            return False
        return self.config.echo_guard or frame_start < self._assistant_since + self.config.grace - _EPS

    def _speech(self, start: float, t: float) -> list[Event]:
        if self._run_start is None:
            self._run_start = start
        run_start, lasted = self._run_start, t - self._run_start
        self._last_speech_end = t
        events: list[Event] = []
        if self._assistant_since is not None and not self._barged:
            # Only speech while csmd is audible counts toward interrupting it; with grace 0 a run can have
            # begun before playback did.
            lasted = t - max(run_start, self._assistant_since + self.config.grace)
            if lasted >= self.config.barge_in_speech - _EPS:
                self._barged = True
                events.append(BargeIn(run_start))
                if self._turn_start is None:
                    self._turn_start = run_start
                    events.append(TurnStarted(run_start))
        elif self._turn_start is None and lasted >= self.config.min_speech - _EPS:
            self._turn_start = run_start
            events.append(TurnStarted(run_start))
        return events

    def _silence(self, t: float) -> list[Event]:
        events: list[Event] = []
        if self._run_start is not None:
            if self._turn_start is None:
                events.append(Backchannel(self._run_start, self._last_speech_end))
            self._run_start = None
        if self._turn_start is not None and t - self._last_speech_end >= self.config.end_silence - _EPS:
            events.append(TurnEnded(self._turn_start, self._last_speech_end))
            self._turn_start = None
        return events


def _check_seconds(value: float, name: str) -> None:
    # numbers.Real admits numpy scalars; bool is an int subclass, and a time of True is a bug, not 1 s.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
