"""The reply-text side of `csmd talk`: sentence splitting, cleaning for speech, and the responders.

`OpenAIChatResponder` is tested against a real HTTP/1.1 server on 127.0.0.1, written here by hand, that streams
chat-completion chunks the way llama.cpp, Ollama, vLLM and OpenAI do.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from csmd.talk.responder import (
    DEFAULT_SYSTEM_PROMPT,
    OpenAIChatResponder,
    Responder,
    ResponderError,
    Turn,
    TypedResponder,
    clean_for_speech,
    split_sentences,
)

# ---------------------------------------------------------------------------------------------- sentences


@pytest.mark.parametrize(
    ("text", "sentences", "rest"),
    [
        ("", [], ""),
        ("Hello there", [], "Hello there"),
        ("Hello there. How are you? I'm", ["Hello there.", "How are you?"], "I'm"),
        ("Hello there.", [], "Hello there."),  # more may follow ("...", a quote): not complete yet
        ("Hello there. ", ["Hello there."], ""),
        ("Great! Really? Yes… ok", ["Great!", "Really?", "Yes…"], "ok"),
        ("Wait... what?! No", ["Wait...", "what?!"], "No"),
        ('He said "hi." Then left.', ['He said "hi."'], "Then left."),
        ("(Quite so.) Next", ["(Quite so.)"], "Next"),
        (
            "She said \u201cFine.\u201d Then \u2018no.\u2019 Ok",
            ["She said \u201cFine.\u201d", "Then \u2018no.\u2019"],
            "Ok",
        ),
        ("**Bold.** Plain", ["**Bold.**"], "Plain"),
        ("It costs 3.5 dollars, or 2.75 euros. Cheap", ["It costs 3.5 dollars, or 2.75 euros."], "Cheap"),
        ("Mr. and Mrs. Smith met Dr. Jones. Later", ["Mr. and Mrs. Smith met Dr. Jones."], "Later"),
        ("Fruit, e.g. apples, i.e. food, etc. and more. ", ["Fruit, e.g. apples, i.e. food, etc. and more."], ""),
        ("Cats vs. dogs. Go", ["Cats vs. dogs."], "Go"),
        ("J. R. R. Tolkien wrote it. Yes", ["J. R. R. Tolkien wrote it."], "Yes"),
        ("The U.S. is big. Yes", ["The U.S. is big."], "Yes"),
        ("The year was 1990. Then", ["The year was 1990."], "Then"),
        ("1. Go north.\n2. Turn left.\nDone", ["1. Go north.", "2. Turn left."], "Done"),
        ("A title\nSome text\n\n\nMore", ["A title", "Some text"], "More"),
        ("  \n  Padded.  \n", ["Padded."], ""),
        ("Trailing words  ", [], "Trailing words  "),  # the rest keeps its end: the next piece may be a word
        ("Ends here.\tTab", ["Ends here."], "Tab"),
    ],
)
def test_split_sentences(text: str, sentences: list[str], rest: str) -> None:
    assert split_sentences(text) == (sentences, rest)


_text = st.lists(st.sampled_from([*"ab3 .!?…\"')\n\t", "Dr", "e.g", "J", "12"]), max_size=30).map("".join)


def _non_space(text: str) -> str:
    return "".join(text.split())


@given(_text)
def test_split_sentences_keeps_every_character_in_order(text: str) -> None:
    sentences, rest = split_sentences(text)
    assert _non_space(" ".join([*sentences, rest])) == _non_space(text)
    assert all(s and s == s.strip() for s in sentences)
    assert rest == rest.lstrip()


@given(_text, st.lists(st.integers(0, 60), max_size=6))
def test_splitting_as_text_streams_in_matches_splitting_it_whole(text: str, cuts: list[int]) -> None:
    streamed: list[str] = []
    buffer, last = "", 0
    for cut in [*sorted(cuts), len(text)]:
        done, buffer = split_sentences(buffer + text[last:cut])
        streamed += done
        last = max(last, cut)
    assert (streamed, buffer) == split_sentences(text)


# ------------------------------------------------------------------------------------------------ cleaning


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("Just plain words.", "Just plain words."),
        ("**Bold**, __strong__, *it* and _em_ text.", "Bold, strong, it and em text."),
        ("Run `ls -l` now.", "Run ls -l now."),
        ("```python\nprint(1)\n```", "print(1)"),
        ("# A heading\n## Another", "A heading Another"),
        ("- one\n* two\n+ three\n• four", "one two three four"),
        ("1. First.", "1. First."),  # a spoken number is fine
        ("See https://example.com/a?b=1. Then", "See link. Then"),
        ("Visit www.example.org, or HTTP://X.Y/z!", "Visit link, or link!"),
        ("Read [the docs](https://docs.example.com) first.", "Read the docs first."),
        ("Great job 🎉!", "Great job!"),
        (
            "Thumbs 👍🏽 up, family 👨\u200d👩\u200d👧 here, flag 🇫🇷, key 1\ufe0f\u20e3.",
            "Thumbs up, family here, flag, key 1.",
        ),
        ("Hot ☀️ day ✨✨", "Hot day"),
        ("snake_case and __dunder__", "snake case and dunder"),
        ("a | b | c ~~gone~~ <br> x^2 \\n", "a b c gone br x 2 n"),
        ("It costs $5 + 10% = €5.50, isn't it?", "It costs $5 + 10% = €5.50, isn't it?"),
        ("Café naïve “quoted” — dash", "Café naïve “quoted” — dash"),
        ("  lots\t of\n\n space  ", "lots of space"),
        ("🎉🎉", ""),
    ],
)
def test_clean_for_speech(text: str, spoken: str) -> None:
    assert clean_for_speech(text) == spoken


@given(st.lists(st.sampled_from([*"ab1 .,!*_#-+`[]()|\n\t🎉\u200d\ufe0f:/", "http://", "www."])).map("".join))
def test_clean_for_speech_is_idempotent(text: str) -> None:
    once = clean_for_speech(text)
    assert clean_for_speech(once) == once
    assert once == " ".join(once.split())


# ------------------------------------------------------------------------------------------ typed replies


async def test_typed_responder_reads_a_line_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    prompts: list[str] = []

    def read_line(prompt: str) -> str:
        threads.append(threading.current_thread())
        prompts.append(prompt)
        return "Sure thing! I'll **do** it now. Bye 👋"

    monkeypatch.setattr("builtins.input", read_line)  # the default line source: the terminal
    responder: Responder = TypedResponder()
    assert [s async for s in responder.respond([Turn("user", "Hi")])] == ["Sure thing!", "I'll do it now.", "Bye"]
    assert threads and threads[0] is not threading.main_thread()
    assert prompts == ["csmd says> "]


@pytest.mark.parametrize("line", ["", "   ", "🎉"])
async def test_typed_responder_says_nothing_for_an_empty_line(line: str) -> None:
    async def read_line(prompt: str) -> str:
        return line

    assert [s async for s in TypedResponder(read_line).respond([])] == []


# ------------------------------------------------------------------------------------- the chat server


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[Request, trio.SocketStream], Awaitable[None]]


@dataclass
class Server:
    url: str
    requests: list[Request] = field(default_factory=list)


async def read_request(stream: trio.SocketStream) -> Request:
    async def more() -> bytes:
        if not (data := await stream.receive_some()):
            raise ConnectionError("the client left in the middle of its request")
        return data

    data = b""
    while b"\r\n\r\n" not in data:
        data += await more()
    head, body = data.split(b"\r\n\r\n", 1)
    start, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += await more()
    method, path, _ = start.split(" ")
    return Request(method, path, headers, body)


@asynccontextmanager
async def chat_server(handler: Handler) -> AsyncIterator[Server]:
    """A real HTTP/1.1 server on a free port of 127.0.0.1: each connection's request goes to `handler`."""
    server = Server("")

    async def on_connection(stream: trio.SocketStream) -> None:
        async with stream:
            request = await read_request(stream)
            server.requests.append(request)
            await handler(request, stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        server.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1"
        yield server
        nursery.cancel_scope.cancel()


def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "test-model",
            "system_fingerprint": "b1", "choices": [choice]}  # fmt: skip


class EventStream:
    """Writes a `text/event-stream` response: chunked (like llama.cpp, vLLM, OpenAI) or close-delimited."""

    def __init__(self, stream: trio.SocketStream, *, chunked: bool = True, newline: str = "\n") -> None:
        self.stream, self.chunked, self.newline = stream, chunked, newline

    async def start(self) -> None:
        framing = "Transfer-Encoding: chunked" if self.chunked else "Connection: close"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{framing}\r\n\r\n"
        await self.stream.send_all(head.encode())

    async def send(self, text: str) -> None:
        data = text.replace("\n", self.newline).encode()
        await self.stream.send_all(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    async def content(self, *pieces: str) -> None:
        for piece in pieces:
            await self.send(f"data: {json.dumps(chunk({'content': piece}))}\n\n")

    async def finish(self) -> None:
        await self.send(f"data: {json.dumps(chunk({}, 'stop'))}\n\ndata: [DONE]\n\n")
        if self.chunked:
            await self.stream.send_all(b"0\r\n\r\n")


async def wait_for_close(stream: trio.SocketStream) -> None:
    """Until the client closes the connection."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


HISTORY = [Turn("user", "Hi"), Turn("assistant", "Hello!"), Turn("user", "How are you?")]


@pytest.mark.parametrize(("chunked", "newline"), [(True, "\n"), (False, "\n"), (True, "\r\n")])
async def test_sentences_stream_out_as_soon_as_they_are_complete(chunked: bool, newline: str) -> None:
    go_on = trio.Event()
    sent_rest = False

    async def handler(request: Request, stream: trio.SocketStream) -> None:
        nonlocal sent_rest
        events = EventStream(stream, chunked=chunked, newline=newline)
        await events.start()
        await events.send(f"data: {json.dumps(chunk({'role': 'assistant', 'content': ''}))}\n\n")
        await events.send(": keep-alive\n\n")
        await events.content("I'm do", "ing gre", "at, than", "ks! How ab")
        await go_on.wait()
        sent_rest = True
        await events.content("out you", "? Tell me ", "everything")
        await events.finish()
        if not chunked:
            await stream.aclose()

    with trio.fail_after(10):
        async with chat_server(handler) as server:
            responder: Responder = OpenAIChatResponder(server.url, "test-model")
            sentences: list[str] = []
            async for sentence in responder.respond(HISTORY):
                if not sentences:
                    assert sentence == "I'm doing great, thanks!"
                    assert not sent_rest  # spoken before the server even wrote the rest
                    go_on.set()
                sentences.append(sentence)
    assert sentences == ["I'm doing great, thanks!", "How about you?", "Tell me everything"]
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "text/event-stream"
    assert "authorization" not in request.headers
    assert request.json() == {
        "model": "test-model",
        "stream": True,
        "messages": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
    }


async def reply_with(pieces: list[str], request: Request, stream: trio.SocketStream) -> None:
    events = EventStream(stream)
    await events.start()
    await events.content(*pieces)
    await events.finish()


async def test_api_key_system_prompt_and_temperature_are_sent() -> None:
    async with chat_server(partial(reply_with, ["**Sure.** 🎉 Here: https://example.com"])) as server:
        responder = OpenAIChatResponder(
            server.url + "/", api_key="sk-test", system_prompt="Be brief.", temperature=0.2, timeout=5
        )
        assert [s async for s in responder.respond([Turn("user", "Go")])] == ["Sure.", "Here: link"]
    [request] = server.requests
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.json() == {
        "model": "default",
        "stream": True,
        "temperature": 0.2,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go"}],
    }


async def test_no_system_prompt() -> None:
    async with chat_server(partial(reply_with, ["Ok."])) as server:
        responder = OpenAIChatResponder(server.url + "/chat/completions", system_prompt=None)
        assert [s async for s in responder.respond([Turn("user", "Go")])] == ["Ok."]
    assert server.requests[0].path == "/v1/chat/completions"
    assert server.requests[0].json()["messages"] == [{"role": "user", "content": "Go"}]


@pytest.mark.parametrize(
    ("status", "content_type", "body", "message"),
    [
        ("500 Internal Server Error", "application/json", '{"error": {"message": "model crashed", "code": 500}}',
         "HTTP 500: .*model crashed"),
        ("404 Not Found", "text/plain", "404 page not found", "HTTP 404: 404 page not found"),
        ("401 Unauthorized", "application/json", '{"error": {"message": "Incorrect API key provided"}}',
         "HTTP 401: .*Incorrect API key"),
    ],
)  # fmt: skip
async def test_http_error_status(status: str, content_type: str, body: str, message: str) -> None:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        await stream.send_all(head.encode() + body.encode())

    async with chat_server(handler) as server:
        with pytest.raises(ResponderError, match=message) as caught:
            _ = [s async for s in OpenAIChatResponder(server.url).respond(HISTORY)]
    assert server.url in str(caught.value)


async def test_connection_refused() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ResponderError, match="cannot connect") as caught:
        _ = [s async for s in OpenAIChatResponder(url).respond(HISTORY)]
    assert url in str(caught.value)


async def test_timeout() -> None:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        await wait_for_close(stream)  # never answers

    async with chat_server(handler) as server:
        with trio.fail_after(5), pytest.raises(ResponderError, match="timed out") as caught:
            _ = [s async for s in OpenAIChatResponder(server.url, timeout=0.2).respond(HISTORY)]
    assert server.url in str(caught.value)


async def test_proxy_settings_do_not_apply_to_a_local_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with chat_server(partial(reply_with, ["Direct."])) as server:
        assert [s async for s in OpenAIChatResponder(server.url).respond(HISTORY)] == ["Direct."]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("<html><body>Not found</body></html>\n", "not server-sent events"),
        ("data: {not json\n\n", "not JSON"),
        ('data: {"object": "something else"}\n\n', "not a chat chunk"),
        ('data: {"choices": [{"delta": "text"}]}\n\n', "not a chat chunk"),
        ('data: {"error": {"message": "context too long", "code": 400}}\n\n', "reported an error: context too long"),
        ('event: error\ndata: {"error": "overloaded"}\n\n', "reported an error: overloaded"),
    ],
)
async def test_malformed_streams(body: str, message: str) -> None:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        events = EventStream(stream, chunked=False)
        await events.start()
        await events.content("Fine so far. And")
        await events.send(body)

    async with chat_server(handler) as server:
        said: list[str] = []
        with trio.fail_after(5), pytest.raises(ResponderError, match=message) as caught:
            async for sentence in OpenAIChatResponder(server.url).respond(HISTORY):
                said.append(sentence)
    assert said == ["Fine so far."]
    assert server.url in str(caught.value)


async def test_a_stream_that_ends_without_done_still_gives_its_last_words() -> None:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        events = EventStream(stream, chunked=False)
        await events.start()
        await events.content("One. Two")

    async with chat_server(handler) as server:
        assert [s async for s in OpenAIChatResponder(server.url).respond(HISTORY)] == ["One.", "Two"]


async def interrupted_reply(closed: trio.Event, request: Request, stream: trio.SocketStream) -> None:
    events = EventStream(stream)
    await events.start()
    await events.content("First sentence. Sec")
    await wait_for_close(stream)  # the rest never comes: only the client can end this
    closed.set()


async def test_cancelling_mid_stream_closes_the_connection() -> None:
    closed = trio.Event()
    async with chat_server(partial(interrupted_reply, closed)) as server:
        said: list[str] = []
        with trio.CancelScope() as barge_in:
            async for sentence in OpenAIChatResponder(server.url).respond(HISTORY):
                said.append(sentence)
                barge_in.deadline = trio.current_time() + 0.1  # cancelled while it waits for the next sentence
        assert barge_in.cancelled_caught
        cancelled_at = trio.current_time()
        with trio.fail_after(2):
            await closed.wait()
        assert trio.current_time() - cancelled_at < 0.5
    assert said == ["First sentence."]


async def test_leaving_the_reply_early_closes_the_connection() -> None:
    closed = trio.Event()
    async with chat_server(partial(interrupted_reply, closed)) as server:
        async with aclosing(OpenAIChatResponder(server.url).respond(HISTORY)) as sentences:
            async for _ in sentences:
                break
        with trio.fail_after(2):
            await closed.wait()


@pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")
async def test_a_reply_let_go_of_is_closed_too() -> None:
    """Like `async for ... break` without aclosing: trio closes the generator (and warns that it had to)."""
    closed = trio.Event()
    async with chat_server(partial(interrupted_reply, closed)) as server:
        async for _ in OpenAIChatResponder(server.url).respond(HISTORY):
            break
        with trio.fail_after(2):
            await closed.wait()


def test_bad_url() -> None:
    with pytest.raises(ValueError, match="http"):
        OpenAIChatResponder("127.0.0.1:8080/v1")


async def test_runs_under_trio_run() -> None:
    """Outside pytest-trio too: httpx picks trio's networking by itself."""

    async def main() -> list[str]:
        async with chat_server(partial(reply_with, ["Hello from trio."])) as server:
            return [s async for s in OpenAIChatResponder(server.url).respond(HISTORY)]

    assert await trio.to_thread.run_sync(trio.run, main) == ["Hello from trio."]
