"""OpenAI request bodies for one turn of a session: chat messages or a completion prompt.

Pure: the answers of earlier turns come in as text (what the server streamed back), so a
multi-turn conversation grows by exactly what the model said.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from baton.bench.workloads import Content, Session


@dataclass(frozen=True)
class RequestOptions:
    endpoint: str  # "chat" or "completions"
    model: str
    temperature: float | None = None  # None: send none (the server's default applies, as for users)
    ignore_eos: bool = True  # every request generates its full max_tokens, as benchmarks need
    extra_body: dict = field(default_factory=dict)  # merged last: vendor fields, overrides


def chat_messages(session: Session, turn: int, answers: list[str]) -> list[dict]:
    msgs = []
    if session.system is not None:
        msgs.append({"role": "system", "content": _text(session.system)})
    for k in range(turn):
        msgs.append({"role": "user", "content": _text(session.turns[k].content)})
        msgs.append({"role": "assistant", "content": answers[k]})
    msgs.append({"role": "user", "content": _text(session.turns[turn].content)})
    return msgs


def completion_prompt(session: Session, turn: int, answers: list[str],
                      encode: Callable[[str], list[int]] | None = None) -> str | list[int]:
    """The conversation so far as one prompt: token ids when the turns are ids (answers are
    then encoded with `encode`), else text joined by newlines."""
    parts: list[Content] = [] if session.system is None else [session.system]
    for k in range(turn):
        parts += [session.turns[k].content, answers[k]]
    parts.append(session.turns[turn].content)
    if isinstance(session.turns[turn].content, tuple):
        if turn and encode is None:
            raise ValueError("a multi-turn token-id prompt needs `encode` for the answers")
        return [t for p in parts for t in (encode(p) if isinstance(p, str) else p)]
    return "\n".join(_text(p) for p in parts)


def request_body(opts: RequestOptions, session: Session, turn: int, answers: list[str],
                 encode: Callable[[str], list[int]] | None = None) -> dict:
    body: dict = {"model": opts.model}
    if opts.endpoint == "chat":
        body["messages"] = chat_messages(session, turn, answers)
    else:
        body["prompt"] = completion_prompt(session, turn, answers, encode)
    body |= {
        "max_tokens": session.turns[turn].output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if opts.temperature is not None:
        body["temperature"] = opts.temperature
    if opts.ignore_eos:
        body["ignore_eos"] = True
    return body | opts.extra_body


def _text(c: Content) -> str:
    if not isinstance(c, str):
        raise TypeError("chat requests need text prompts; token ids go to /v1/completions")
    return c
