"""The OpenAI response of one request, for chat and completions alike: the whole JSON body,
or the same as SSE chunks.

One path for both endpoints: `Endpoint` holds what differs between them (ids, object names,
where the text goes, the shape of logprobs). Job events come from serving.py:
("delta", job, Delta), ("done", job, None), ("error", job, APIError).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from baton.engine.tokenizer import Tokenizer
from baton.router.output import chat_logprobs, completion_logprobs
from baton.router.serving import Job
from baton.router.tools import ToolCallParser, ToolPlan

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Endpoint:
    name: str  # "chat" or "completions": the metrics' label
    prompt_param: str  # the request field errors about the prompt name
    id_prefix: str
    object: str
    chunk_object: str

    @property
    def chat(self) -> bool:
        return self.name == "chat"

    def text(self, text: str | None, streamed: bool) -> dict:
        """Where a choice's text goes; None: a stream's closing chunk (no text)."""
        if not self.chat:
            return {"text": text or ""}
        if not streamed:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": {} if text is None else {"content": text}}

    def logprobs(self, tok: Tokenizer, entries: list, text_offset: int) -> dict:
        if self.chat:
            return chat_logprobs(tok, entries)
        return completion_logprobs(tok, entries, text_offset)


CHAT = Endpoint("chat", "messages", "chatcmpl-", "chat.completion", "chat.completion.chunk")
COMPLETIONS = Endpoint("completions", "prompt", "cmpl-", "text_completion", "text_completion")


def _choice(index: int, part: dict, logprobs: dict | None, finish: str | None) -> dict:
    return {"index": index, **part, "logprobs": logprobs, "finish_reason": finish}


_MAX_EVENTS_PER_WRITE = 64
# The event a request's client watcher puts on its queue when the client disconnects.
GONE = ("gone", None, None)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class Reply:
    """One request's response, built from its jobs (one per choice) as they finish or stream."""

    def __init__(self, endpoint: Endpoint, model: str, tok: Tokenizer, jobs: list[Job],
                 prompts: list[list[int]], include_usage: bool = False,
                 tools: ToolPlan | None = None):
        self.ep, self.model, self.tok = endpoint, model, tok
        self.jobs, self.prompts, self.include_usage = jobs, prompts, include_usage
        # chat with tools: each choice's text goes through its own tool-call parser
        self.tools = tools
        self.id = endpoint.id_prefix + uuid.uuid4().hex
        self.status = "200"  # a stream's status, for the metrics: its error's, or 499

    def usage(self) -> dict:
        cached: dict[int, int] = {}
        for j in self.jobs:  # the n choices of one prompt share its cached tokens
            cached[j.prompt_index] = max(cached.get(j.prompt_index, 0), j.out.num_cached_tokens)
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(j.out.num_tokens for j in self.jobs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
        }

    def body(self) -> dict:
        """The whole response, once every job is done."""
        choices = []
        for j in sorted(self.jobs, key=lambda j: j.index):
            part, finish = self.ep.text(j.out.text, streamed=False), j.out.finish_reason
            if self.tools is not None:
                parser = self.tools.parser()
                parser.feed(j.out.text, final=True)
                part = {"message": _tool_message(parser)}
                finish = _tool_finish(parser, finish)
            lp = self.ep.logprobs(self.tok, j.out.logprobs, 0) if j.out.want_logprobs else None
            choices.append(_choice(j.index, part, lp, finish))
        return {
            "id": self.id,
            "object": self.ep.object,
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    async def stream(self, first, queue: asyncio.Queue) -> AsyncIterator[str]:
        """SSE chunks from `first` and the queue's later events until every job is done, an
        error (its body, then the end), and `data: [DONE]`. Events already waiting go out
        together (one write, one HTTP chunk, several SSE events)."""
        created = int(time.time())
        usage_field = {"usage": None} if self.include_usage else {}
        offsets = {j.index: 0 for j in self.jobs}  # completions' logprobs text_offset
        parsers: dict[int, ToolCallParser] = (
            {j.index: self.tools.parser() for j in self.jobs} if self.tools else {})
        text_chunk = _TextChunk(self.ep, self.id, created, self.model, self.include_usage)

        def chunk(choices: list[dict], **extra) -> str:
            return sse({"id": self.id, "object": self.ep.chunk_object, "created": created,
                        "model": self.model, "choices": choices, **usage_field, **extra})

        out: list[str] = []
        if self.ep.chat:  # the assistant's role first, once per choice
            for j in self.jobs:
                out.append(chunk([_choice(j.index, {"delta": {"role": "assistant", "content": ""}}, None, None)]))
        event, remaining = first, len(self.jobs)
        while True:
            kind, job, payload = event
            if kind == "delta" and parsers:
                for c in _tool_chunks(self.tok, job.index, parsers[job.index], payload):
                    out.append(chunk([c]))
            elif kind == "delta" and payload.logprobs:
                lp = self.ep.logprobs(self.tok, payload.logprobs, offsets[job.index])
                offsets[job.index] += len(payload.text)
                out.append(chunk([_choice(job.index, self.ep.text(payload.text, streamed=True), lp, None)]))
            elif kind == "delta" and payload.text:
                offsets[job.index] += len(payload.text)
                out.append(text_chunk(job.index, payload.text))
            elif kind == "done":
                finish = job.out.finish_reason
                if parsers:
                    for c in _tool_chunks(self.tok, job.index, parsers[job.index], None):
                        out.append(chunk([c]))
                    finish = _tool_finish(parsers[job.index], finish)
                out.append(chunk([_choice(job.index, self.ep.text(None, streamed=True), None, finish)]))
                remaining -= 1
                if remaining == 0:
                    break
            elif kind == "gone":  # the client went away: nothing more to write
                self.status = "499"
                return
            elif kind == "error":
                self.status = str(payload.status)
                log.warning("request %s: %s", self.id, payload.message)
                out.append(sse(payload.body()))
                break
            if out and (queue.empty() or len(out) >= _MAX_EVENTS_PER_WRITE):
                yield "".join(out)
                out = []
            event = await queue.get()
        if self.include_usage and self.status == "200":
            out.append(chunk([], usage=self.usage()))
        out.append("data: [DONE]\n\n")
        yield "".join(out)


class _TextChunk:
    """The SSE chunk of a text delta (no logprobs, no tools: nearly every chunk of a stream),
    built around the text from parts fixed for the stream: the same bytes as sse() of the
    whole dict, without encoding the id, model and every other field again per token."""

    def __init__(self, ep: Endpoint, rid: str, created: int, model: str, include_usage: bool):
        d = lambda v: json.dumps(v, ensure_ascii=False)
        self.head = (f'data: {{"id": {d(rid)}, "object": {d(ep.chunk_object)}, "created": {created}, '
                     f'"model": {d(model)}, "choices": [{{"index": ')
        self.key = ', "delta": {"content": ' if ep.chat else ', "text": '
        self.tail = ('}' if ep.chat else '') + ', "logprobs": null, "finish_reason": null}]' + (
            ', "usage": null' if include_usage else '') + '}\n\n'

    def __call__(self, index: int, text: str) -> str:
        return f"{self.head}{index}{self.key}{json.dumps(text, ensure_ascii=False)}{self.tail}"


def _tool_message(parser: ToolCallParser) -> dict:
    msg = {"role": "assistant", "content": parser.content or None}
    if parser.calls:
        msg["tool_calls"] = [c.message() for c in parser.calls]
    return msg


def _tool_finish(parser: ToolCallParser, finish: str | None) -> str | None:
    # a choice that called a tool and ended by itself (not cut at max_tokens) says so
    return "tool_calls" if parser.calls and finish == "stop" else finish


def _tool_chunks(tok: Tokenizer, index: int, parser: ToolCallParser, delta) -> list[dict]:
    """A chat choice's stream chunks for one delta through its tool-call parser (None: the
    end of the choice's text): content as the parser releases it, then each completed call's
    deltas. Logprobs ride with the content chunk of their delta."""
    content, calls = parser.feed(delta.text if delta else "", final=delta is None)
    lps = delta.logprobs if delta else None
    out = []
    if content or lps:
        lp = chat_logprobs(tok, lps) if lps else None
        out.append(_choice(index, {"delta": {"content": content}}, lp, None))
    out += [_choice(index, {"delta": {"tool_calls": [d]}}, None, None) for d in calls]
    return out
