"""Reply text for `csmd talk`: a responder turns the conversation so far into the sentences CSM speaks.

Responders yield each sentence as soon as it is complete, so speech can start while the rest is written, and
yield it already cleaned for speech (`clean_for_speech`). Closing the iterator, or cancelling the task that
reads it, drops the reply (barge-in): for `OpenAIChatResponder` that closes the HTTP stream at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import ssl
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import trio

from csmd.talk.terminal import read_stdin_line

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant in a spoken conversation. Reply conversationally, in a few short "
    "sentences that sound natural when spoken aloud. Use plain words only: no markdown, emoji, lists, code or links."
)


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant", "system"]
    text: str


class ResponderError(Exception):
    """The reply could not be had: the message says from where and why."""


class Responder(Protocol):
    # A plain `def`: implementations are async generator functions (`async def ... yield`), which return the
    # generator itself rather than a coroutine. A generator, so callers can `async with aclosing(...)` it.
    def respond(self, history: list[Turn]) -> AsyncGenerator[str, None]:
        """The reply to `history`, one sentence at a time, each as soon as it is complete."""
        ...


# A sentence ends at a run of . ! ? … (with any closing quotes, brackets or emphasis marks after it) that is
# followed by whitespace, or at a newline. Text at the very end never ends a sentence here: more may follow.
_END = re.compile(r"""[.!?…]+["'”\u2019»)\]}*_]*(?=\s)|\n""")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "approx", "fig"})
_INITIALS = re.compile(r"[^\W\d_](?:\.[^\W\d_])*")  # "J", "e.g", "U.S" (the word before a final ".")


def split_sentences(buffer: str) -> tuple[list[str], str]:
    """The complete sentences in `buffer` (stripped, none empty) and the unfinished rest (its start stripped).

    A single "." does not end a sentence after a known abbreviation (Mr. Dr. vs. etc.), after initials or
    dotted abbreviations (J. R. R., e.g., i.e., U.S.), or after a lone list number at a sentence start ("1.").
    Decimals (3.5) never split, since the "." is not followed by whitespace.
    """
    sentences: list[str] = []
    start = 0
    for match in _END.finditer(buffer):
        if match.group() == "." and _no_end_after(buffer[start : match.start()]):
            continue
        if piece := buffer[start : match.end()].strip():
            sentences.append(piece)
        start = match.end()
    return sentences, buffer[start:].lstrip()


def _no_end_after(before: str) -> bool:
    words = before.split()
    if not words:
        return True
    word = words[-1].lstrip("\"'“\u2018«([{*_")
    return (
        word.lower() in _ABBREVIATIONS
        or _INITIALS.fullmatch(word) is not None
        or (len(words) == 1 and word.isdigit() and len(word) <= 2)
    )


_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_FENCE = re.compile(r"```[\w+-]*")
_INNER_UNDERSCORE = re.compile(r"(?<=[^\W_])_+(?=[^\W_])")
_LINE_MARKERS = re.compile(r"^[^\S\n]*(?:(?:#{1,6}|[-+•])(?:[^\S\n]+|$))+", re.MULTILINE)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[.,!?;:…])")
_URL = re.compile(r"\b(?:https?://|www\.)\S+?(?=[.,;:!?'\")]*(?:\s|$))", re.IGNORECASE)
_MARKUP = frozenset("*_~^|\\<>[]{}`")


def clean_for_speech(text: str) -> str:
    """Plain words for CSM: no markdown markers, links as "link", no emoji or symbols, single spaces.

    Markdown links keep their text; code keeps its content without backticks; heading and bullet markers at
    line starts go; "snake_case" reads as "snake case"; currency, math and ordinary punctuation stay.
    Idempotent: cleaning clean text changes nothing.
    """
    text = _FENCE.sub(" ", _MD_LINK.sub(r"\1", text))
    text = "".join(map(_sayable, _INNER_UNDERSCORE.sub(" ", text)))
    text = " ".join(_LINE_MARKERS.sub("", text).split())
    return _URL.sub("link", _SPACE_BEFORE_PUNCT.sub("", text))


def _sayable(c: str) -> str:
    """A character as CSM should see it: itself, a space (markup, emoji, symbols), or nothing (joiners)."""
    category = unicodedata.category(c)
    if c in _MARKUP or category in ("So", "Sk", "Co", "Cs", "Cn") or (category == "Cc" and not c.isspace()):
        return " "
    return "" if category in ("Cf", "Me") or "\ufe00" <= c <= "\ufe0f" else c


def _speakable(sentences: list[str]) -> list[str]:
    cleaned = (clean_for_speech(s) for s in sentences)
    return [s for s in cleaned if any(c.isalnum() for c in s)]


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # made once: building one takes tens of ms, which would stall the loop


async def _unwind(lines: AsyncIterator[str]) -> None:
    """End httpx's line iterator by cancelling its next read, so the exception runs through every async
    generator httpx nests inside it: closing the outer one instead leaves the inner ones suspended, and trio
    warns about each (ResourceWarning) as it is garbage collected. A no-op once the iterator has ended."""
    with trio.CancelScope() as scope, contextlib.suppress(httpx.HTTPError):
        scope.cancel()
        async for _ in lines:
            pass


class OpenAIChatResponder:
    """Any OpenAI-compatible chat server (llama.cpp, Ollama, vLLM, LM Studio, OpenAI), streamed.

    `url` is the API base, e.g. http://127.0.0.1:8080/v1; `timeout` bounds connecting and each wait for more
    of the reply (not the whole reply). Each reply uses its own connection.
    """

    def __init__(
        self,
        url: str,
        model: str = "default",
        *,
        api_key: str | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        temperature: float | None = None,
        timeout: float = 60.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"responder URL must start with http:// or https://, not {url!r}")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model, self.system_prompt, self.temperature, self.timeout = model, system_prompt, temperature, timeout
        self._headers = {"Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Proxy settings (HTTP_PROXY...) are for the outside world: a server on this machine is reached directly.
        self._trust_env = httpx.URL(self.endpoint).host not in ("localhost", "127.0.0.1", "::1")
        _ssl_context()  # now rather than in the middle of a conversation

    def request_body(self, history: list[Turn]) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages = system + [{"role": turn.role, "content": turn.text} for turn in history]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    async def respond(self, history: list[Turn]) -> AsyncGenerator[str, None]:
        buffer = ""
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout, verify=_ssl_context(), trust_env=self._trust_env) as client,
                client.stream("POST", self.endpoint, json=self.request_body(history), headers=self._headers) as reply,
            ):
                if not reply.is_success:
                    body = " ".join((await reply.aread())[:300].decode(errors="replace").split())
                    raise ResponderError(f"{self.endpoint} answered HTTP {reply.status_code}: {body}")
                lines = reply.aiter_lines()
                try:
                    async for line in lines:
                        piece = self._content(line)
                        if piece is None:
                            break
                        sentences, buffer = split_sentences(buffer + piece)
                        for sentence in _speakable(sentences):
                            yield sentence
                finally:
                    await _unwind(lines)
        except httpx.TimeoutException as exc:
            raise ResponderError(f"{self.endpoint} timed out ({self.timeout:g} s without an answer)") from exc
        except httpx.ConnectError as exc:
            raise ResponderError(f"cannot connect to {self.endpoint}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ResponderError(f"{self.endpoint} failed: {type(exc).__name__}: {exc}") from exc
        for sentence in _speakable([buffer]):
            yield sentence

    def _content(self, line: str) -> str | None:
        """One line of the event stream: the text it adds ("" for none), or None at its end ([DONE])."""
        field, colon, value = line.partition(":")
        if not line or field in ("", "event", "id", "retry"):  # event separator, comment/keep-alive, metadata
            return ""
        if field != "data" or not colon:
            raise ResponderError(f"{self.endpoint} sent a line that is not server-sent events: {line[:200]!r}")
        value = value.removeprefix(" ")
        if value.strip() == "[DONE]":
            return None
        try:
            chunk = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ResponderError(f"{self.endpoint} sent an event that is not JSON: {value[:200]!r}") from exc
        if isinstance(chunk, dict) and "error" in chunk:
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise ResponderError(f"{self.endpoint} reported an error: {message}")
        try:
            choices = chunk["choices"]
            content = (choices[0].get("delta") or {}).get("content") if choices else None
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ResponderError(f"{self.endpoint} sent an event that is not a chat chunk: {value[:200]!r}") from exc
        return content if isinstance(content, str) else ""


class TypedResponder:
    """The user types the reply (for trying `csmd talk` without a language model); an empty line says nothing.

    `read_line(prompt)` is any async line source (the terminal by default, read in a thread), so tests can
    inject one.
    """

    def __init__(
        self, read_line: Callable[[str], Awaitable[str]] = read_stdin_line, prompt: str = "csmd says> "
    ) -> None:
        self.read_line = read_line
        self.prompt = prompt

    async def respond(self, history: list[Turn]) -> AsyncGenerator[str, None]:
        sentences, rest = split_sentences(await self.read_line(self.prompt))
        for sentence in _speakable([*sentences, rest]):
            yield sentence
