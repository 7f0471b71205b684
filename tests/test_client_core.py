"""The clients' sans-IO core, driven with bytes in memory: a ClientCore and a server-role Connection, as h11's
tests pair two connections. Every decision the trio and blocking clients share is checked here without a socket."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from csmd.protocol import messages as m
from csmd.protocol.client_core import Chunk, ClientCore, Pending, SpeechState, join_chunks
from csmd.protocol.connection import Connection
from csmd.protocol.errors import ConnectionLost, ProtocolError, RequestError
from csmd.protocol.pcm import decode_pcm, encode_pcm

WELCOME = m.Welcome(
    protocol=1,
    server="test",
    sample_rate=24000,
    frame_samples=1920,
    formats=m.FORMATS,
    model="none",
    watermark=False,
    max_message=Connection.DEFAULT_MAX_MESSAGE,
)


class Pair:
    """A client core and the server end of its stream; bytes go between them by hand."""

    def __init__(self) -> None:
        self.client = ClientCore("test")
        self.server = Connection(m.Role.SERVER)
        welcome, data = self.client.hello()
        assert self.to_server(data) == [m.Hello(protocol=(1,), client="test")]
        self.to_client(WELCOME)
        assert welcome.done and welcome.result() == WELCOME == self.client.welcome

    def to_server(self, data: bytes) -> list[m.Message]:
        events = self.server.receive_data(data)
        assert all(isinstance(e, m.Message) for e in events)
        return events  # type: ignore[return-value]  # checked just above

    def to_client(self, *messages: m.Message) -> None:
        self.client.receive(b"".join(self.server.send(msg) for msg in messages))

    def start(self, state: SpeechState, fmt: m.Format = "pcm_f32le") -> None:
        """Send the speech and answer its audio.start."""
        _, data = self.client.send_speech(state)
        assert self.to_server(data) == [state.msg]
        self.to_client(
            m.AudioStart(
                request=state.request, session=state.session, sample_rate=24000, format=fmt, frame_samples=1920, seed=1
            )
        )

    def chunk(self, state: SpeechState, seq: int, value: float, fmt: m.Format = "pcm_f32le") -> None:
        pcm = encode_pcm(np.full(1920, value, dtype=np.float32), fmt)
        self.to_client(m.AudioChunk(request=state.request, seq=seq, frame=seq, pcm=pcm))

    def end(self, state: SpeechState, frames: int, reason: m.EndReason = "eos") -> None:
        self.to_client(m.AudioEnd(request=state.request, reason=reason, frames=frames, total_ms=1.0))


@pytest.fixture
def pair() -> Pair:
    return Pair()


def test_speak_options_build_one_message(pair: Pair) -> None:
    state = pair.client.speech("s", "Hi.", 2, temperature=0.5, top_k=9, seed=3, max_frames=7, format="pcm_s16le")
    assert state.msg == m.Speak(
        session="s", request="r1", text="Hi.", speaker=2, temperature=0.5, top_k=9, seed=3, max_frames=7,
        format="pcm_s16le",
    )  # fmt: skip
    assert pair.client.speech("s", "Again.", 0, request="mine").request == "mine"
    assert pair.client.speech("s", "Next.", 0).request == "r2"
    with pytest.raises(ProtocolError) as info:
        pair.client.speech("s", "x", -1)
    assert info.value.field == "speaker"


def test_a_speech_goes_out_once(pair: Pair) -> None:
    state = pair.client.speech("s", "Once.", 0)
    assert not state.sent and not state.started_or_failed()
    _, first = pair.client.send_speech(state)
    assert state.sent and pair.to_server(first) == [state.msg]
    assert pair.client.send_speech(state) == (state, b"")
    twin = pair.client.speech("s", "Same id.", 0, request=state.request)
    with pytest.raises(ValueError, match="already in flight"):
        pair.client.send_speech(twin)


def test_two_speeches_interleave_and_decode(pair: Pair) -> None:
    one, two = pair.client.speech("s", "One.", 0), pair.client.speech("s", "Two.", 1)
    pair.start(one)
    pair.start(two, fmt="pcm_s16le")
    assert one.started().format == "pcm_f32le" and two.started().format == "pcm_s16le"
    pair.chunk(one, 0, 0.25)
    pair.chunk(two, 0, 0.5, fmt="pcm_s16le")
    pair.chunk(one, 1, 0.125)
    assert pair.client.reading_paused(2) and not pair.client.reading_paused(3)  # one's backlog of 2
    pair.end(one, 2)
    assert not pair.client.reading_paused(2)  # an ended speech gets nothing more: its backlog does not stop reading
    chunks = [one.next_chunk(), one.next_chunk()]
    assert one.next_chunk() is None and one.end is not None and one.end.frames == 2
    assert [c.frame for c in chunks if c] == [0, 1]
    joined = join_chunks([c for c in chunks if c is not None])
    np.testing.assert_array_equal(joined, np.r_[np.full(1920, 0.25), np.full(1920, 0.125)].astype(np.float32))
    second = two.next_chunk()
    assert second is not None and not two.has_item()  # still streaming: nothing more to take yet
    np.testing.assert_allclose(second.pcm, 0.5, atol=1 / 32767)
    assert join_chunks([]).shape == (0,) and join_chunks([]).dtype == np.float32


def test_session_replies_answer_the_oldest_command_of_their_type(pair: Pair) -> None:
    opened, data = pair.client.open_session("a")
    added, more = pair.client.add_context("a", 0, "Hi.", np.zeros(1920, dtype=np.float32), pinned=True)
    cleared, last = pair.client.clear_context("a")
    other, elsewhere = pair.client.open_session("b")
    sent = pair.to_server(data + more + last + elsewhere)
    assert isinstance(sent[1], m.AddContext) and sent[1].format == "pcm_f32le" and sent[1].rate == 24000
    assert sent[1].pinned and sent[1].audio is not None and len(decode_pcm(sent[1].audio, "pcm_f32le")) == 1920
    pair.to_client(m.SessionOpened(session="b"), m.SessionOpened(session="a"))
    assert other.result() == m.SessionOpened(session="b") and opened.done and not added.done
    pair.to_client(m.ContextCleared(session="a"))  # the daemon answers in order; the type still matches
    assert cleared.done and not added.done
    pair.to_client(m.ContextAdded(session="a", frames=1, rows=11))
    assert added.result().frames == 1


def test_context_audio_as_bytes_goes_as_it_is(pair: Pair) -> None:
    raw = encode_pcm(np.zeros(960, dtype=np.float32), "pcm_s16le")
    _, data = pair.client.add_context("s", 1, "Hi.", raw, rate=16000, format="pcm_s16le")
    [sent] = pair.to_server(data)
    assert isinstance(sent, m.AddContext) and sent.audio == raw and sent.rate == 16000 and not sent.pinned
    _, data = pair.client.add_context("s", 1, "Text only.")
    [sent] = pair.to_server(data)
    assert isinstance(sent, m.AddContext) and sent.audio is None and sent.format is None


def test_a_non_fatal_error_fails_only_its_call(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    bad, _ = pair.client.open_session("bad")
    good, _ = pair.client.open_session("good")
    doomed, fine = pair.client.speech("bad", "Doomed.", 0), pair.client.speech("good", "Fine.", 0)
    pair.client.send_speech(doomed)
    pair.start(fine)
    pair.to_client(
        m.Error(code="unknown_session", message="no", fatal=False, session="bad"),
        m.Error(code="unknown_session", message="no", fatal=False, session="bad", request=doomed.request),
    )
    with pytest.raises(RequestError) as info:
        bad.result()
    assert info.value.code == "unknown_session" and info.value.session == "bad" and not good.done
    with pytest.raises(RequestError) as info:
        doomed.started()
    assert info.value.request == doomed.request
    assert fine.started() is not None and pair.client.lost is None
    with caplog.at_level(logging.WARNING, logger="csmd.protocol.client"):
        pair.to_client(m.Error(code="odd", message="about nothing", fatal=False))
    assert "not tied to a pending call" in caplog.text


def test_a_speech_own_cancel_after_its_end_is_answered_from_the_end(pair: Pair) -> None:
    state = pair.client.speech("s", "Short.", 0)
    pair.start(state)
    pair.chunk(state, 0, 0.1)
    pair.end(state, 1)
    own, _ = pair.client.cancel(state.request, speech=state)
    plain, _ = pair.client.cancel(state.request)
    pair.to_client(m.Error(code="no_such_request", message="gone", fatal=False, request=state.request))
    assert own.result() == m.Cancelled(request=state.request, frames_sent=1)
    with pytest.raises(RequestError) as info:  # Client.cancel(request) knows no speech: the daemon's word stands
        plain.result()
    assert info.value.code == "no_such_request"


def test_a_speech_own_cancel_before_any_end_keeps_the_error(pair: Pair) -> None:
    never = pair.client.speech("s", "Never sent.", 0)
    own, _ = pair.client.cancel(never.request, speech=never)
    pair.to_client(m.Error(code="no_such_request", message="gone", fatal=False, request=never.request))
    with pytest.raises(RequestError):
        own.result()


def test_cancel_mid_stream(pair: Pair) -> None:
    state = pair.client.speech("s", "Long.", 0)
    pair.start(state)
    pair.chunk(state, 0, 0.1)
    cancelled, data = pair.client.cancel(state.request, speech=state)
    assert pair.to_server(data) == [m.Cancel(request=state.request)]
    pair.end(state, 1, reason="cancelled")
    pair.to_client(m.Cancelled(request=state.request, frames_sent=1))
    assert cancelled.result().frames_sent == 1
    assert state.next_chunk() is not None and state.next_chunk() is None


def test_closing_a_speech(pair: Pair) -> None:
    unsent = pair.client.speech("s", "Not yet.", 0)
    assert not pair.client.close_speech(unsent) and not unsent.closed  # nothing to stop: it may start later
    streaming = pair.client.speech("s", "Streaming.", 0)
    pair.start(streaming)
    pair.chunk(streaming, 0, 0.1)
    assert pair.client.close_speech(streaming)  # still streaming: the caller cancels it
    assert streaming.has_item() and streaming.next_chunk() is None  # its backlog is gone
    pair.chunk(streaming, 1, 0.1)  # its tail is dropped
    assert not streaming.chunks and not pair.client.reading_paused(1)
    ended = pair.client.speech("s", "Done.", 0)
    pair.start(ended)
    pair.end(ended, 0)
    assert not pair.client.close_speech(ended)  # over already: nothing to cancel
    _, data = pair.client.cancel_quietly(streaming.request)
    assert pair.to_server(data) == [m.Cancel(request=streaming.request)]


def test_an_error_end_fails_the_speech_after_its_chunks(pair: Pair) -> None:
    state = pair.client.speech("s", "Broken.", 0)
    pair.start(state)
    pair.chunk(state, 0, 0.1)
    pair.end(state, 1, reason="error")
    assert isinstance(state.next_chunk(), Chunk)
    with pytest.raises(RequestError) as info:
        state.next_chunk()
    assert info.value.code == "internal"


def test_ping_matches_its_nonce(pair: Pair) -> None:
    first, one = pair.client.ping()
    second, two = pair.client.ping()
    assert pair.to_server(one + two) == [m.Ping(nonce=1), m.Ping(nonce=2)]
    pair.to_client(m.Pong(nonce=2))
    assert second.done and not first.done


def test_a_fatal_error_fails_everything_and_every_later_call(pair: Pair) -> None:
    opened, _ = pair.client.open_session("s")
    ping, _ = pair.client.ping()
    streaming = pair.client.speech("s", "Cut.", 0)
    pair.start(streaming)
    pair.chunk(streaming, 0, 0.1)
    cancel, _ = pair.client.cancel(streaming.request, speech=streaming)
    pair.to_client(m.Error(code="internal", message="fell over", fatal=True))
    assert pair.client.lost is not None and pair.client.lost.code == "internal"
    pendings: list[Pending[object]] = [opened, ping, cancel]  # type: ignore[list-item]  # only failures are read
    for pending in pendings:
        with pytest.raises(ConnectionLost) as info:
            pending.result()
        assert info.value.code == "internal" and info.value is not pair.client.lost  # a copy each
    assert streaming.next_chunk() is not None  # what came before the failure is still there
    with pytest.raises(ConnectionLost):
        streaming.next_chunk()
    assert not pair.client.close_speech(streaming)  # nothing to cancel on a lost connection
    with pytest.raises(ConnectionLost):
        pair.client.ping()
    with pytest.raises(ConnectionLost):
        pair.client.send_speech(pair.client.speech("s", "Too late.", 0))


def test_the_end_of_the_stream_and_garbage_lose_the_connection() -> None:
    ended = Pair()
    ended.client.receive(b"")
    assert ended.client.lost is not None and ended.client.lost.code == "closed"
    broken = Pair()
    broken.client.receive(b"\x00\x00\x00\x01\xc1")  # a msgpack byte that is never valid
    assert broken.client.lost is not None and "broke the protocol" in broken.client.lost.message
    assert broken.client.receive(b"more") is None  # ignored once lost


def test_a_refused_hello_fails_the_handshake() -> None:
    client, server = ClientCore("old", versions=(2,)), Connection(m.Role.SERVER)
    welcome, data = client.hello()
    with pytest.raises(ProtocolError) as refused:
        server.receive_data(data)
    client.receive(server.send(m.Error.from_protocol_error(refused.value)))
    with pytest.raises(ConnectionLost) as info:
        welcome.result()
    assert info.value.code == "unsupported_version"
