"""The traffic ``tracewire demo`` drives through the example app: the script of chat turns and
feedback, sent over HTTP, one progress line per step."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from tracewire.cli import CLIError

T = TypeVar("T")


@dataclass(frozen=True)
class Turn:
    """One chat turn the demo sends to the app."""

    session: str  # the run's id is appended: each run has conversations of its own
    user: str
    message: str
    stream: bool = False
    # Thumbs up (True) or down (False) on this turn's reply, through the /feedback route.
    feedback: bool | None = None
    rationale: str | None = None
    # The weather tool has no data for it: with the bundled model the request fails (HTTP 500);
    # a real model may answer without calling the tool.
    fails: bool = False


# The bundled model calls the weather tool on every turn, with the whole question as the city:
# each question names a city the tool knows, except the one meant to fail.
SCRIPT = (
    Turn("paris", "ada", "What is the weather in Paris today?", feedback=True),
    Turn("paris", "ada", "Is the Louvre in Paris open on Tuesdays?"),
    Turn("paris", "ada", "Plan a rainy afternoon in London for me.", stream=True),
    Turn("london", "grace", "Do I need an umbrella in London?"),
    Turn(
        "london",
        "grace",
        "And in Tokyo next week?",
        feedback=False,
        rationale="asked about next week, got today's weather",
    ),
    Turn("atlantis", "linus", "What is the weather in Atlantis?", fails=True),
)
STEPS = len(SCRIPT) + sum(t.feedback is not None for t in SCRIPT)


# --------------------------------------------------------------------------- progress


class Progress:
    """One line per step: rewritten in place with \\r on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = total
        self._tty = _isatty(out)
        self.index = 0

    def step(self, label: str, session: str, fn: Callable[[], T], outcome: Callable[[T], str]) -> T:
        self.index += 1
        head = f"  [{self.index}/{self._total}] {label:<11} {session:<18}"
        if self._tty:
            self._out.write(f"\r\033[K{head} ...")
            self._out.flush()
        started = time.perf_counter()
        try:
            result = fn()
        except BaseException:
            if self._tty:
                self._out.write("\n")
                self._out.flush()
            raise
        ms = (time.perf_counter() - started) * 1000
        line = f"{head} {ms:6.0f} ms  {shorten(outcome(result), 52)}"
        self._out.write(("\r\033[K" if self._tty else "") + line + "\n")
        self._out.flush()
        return result


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, OSError, ValueError):  # not a real file, or a closed one
        return False


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Reply:
    status: int
    request_id: str
    text: str


class RequestFailed(Exception):
    """A turn got an answer the script does not expect."""

    def __init__(self, index: int, reply: Reply) -> None:
        super().__init__(
            f"request {index} of the demo failed: HTTP {reply.status} {shorten(reply.text, 200)}"
        )
        self.reply = reply


def _send(http: Any, turn: Turn, session: str) -> Reply:
    # Our own request id: a 500 sent for an unhandled exception does not echo the app's.
    request_id = uuid.uuid4().hex
    headers = {"X-Session-ID": session, "X-User-ID": turn.user, "X-Request-ID": request_id}
    body = {"message": turn.message}
    if turn.stream:
        with http.stream("POST", "/chat/stream", json=body, headers=headers) as response:
            tokens = [
                json.loads(line[len("data: ") :])["token"]
                for line in response.iter_lines()
                if line.startswith("data: {")
            ]
        text = "".join(tokens)
    else:
        response = http.post("/chat", json=body, headers=headers)
        text = response.json()["reply"] if response.status_code == 200 else response.text
    return Reply(response.status_code, request_id, text)


def _outcome(turn: Turn, reply: Reply) -> str:
    if turn.fails and reply.status == 500:
        return "HTTP 500 the weather tool failed, as planned"
    return f"HTTP {reply.status} {reply.text}"


def _feedback_outcome(request_id: str, response: Any) -> str:
    return f"HTTP {response.status_code} on request {request_id}"


def drive(http: Any, progress: Progress, run_id: str) -> None:
    """Send the SCRIPT's turns and feedback; an unexpected answer stops the demo."""
    for turn in SCRIPT:
        session = f"{turn.session}-{run_id[:8]}"
        reply = progress.step(
            "stream" if turn.stream else "chat",
            session,
            functools.partial(_send, http, turn, session),
            functools.partial(_outcome, turn),
        )
        if not (reply.status == 200 or (turn.fails and reply.status == 500)):
            raise RequestFailed(progress.index, reply)
        if turn.feedback is None:
            continue
        feedback = {
            "request_id": reply.request_id,
            "name": "thumbs",
            "value": turn.feedback,
            "rationale": turn.rationale,
        }
        answer = progress.step(
            "thumbs " + ("up" if turn.feedback else "down"),
            session,
            functools.partial(
                http.post, "/feedback", json=feedback, headers={"X-User-ID": turn.user}
            ),
            functools.partial(_feedback_outcome, reply.request_id),
        )
        if answer.status_code != 202:
            raise CLIError(
                f"the feedback route answered HTTP {answer.status_code}: "
                f"{shorten(answer.text, 200)}"
            )
