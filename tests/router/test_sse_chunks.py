"""The router's SSE chunks (baton/router/responses.py): a text delta's chunk built around the
text is byte for byte the JSON of the whole chunk dict, and events that wait together go out
in one write with the same SSE events, in order, as one write each."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from baton.router.output import Delta
from baton.router.responses import CHAT, COMPLETIONS, Reply, _choice, _TextChunk, sse

TEXTS = ["", "hi", ' "quoted" \\ back\nslash\ttab\r', "ünïcödé 漢字 🙂", "\x00\x1f\x7f control", "</script>"]


@pytest.mark.parametrize("ep", [CHAT, COMPLETIONS], ids=["chat", "completions"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_text_chunk_is_the_json_of_the_whole_chunk(ep, include_usage):
    rid, model = ep.id_prefix + "abc123", 'mödel "x"'
    make = _TextChunk(ep, rid, 1700000000, model, include_usage)
    for index in (0, 7, 123):
        for text in TEXTS:
            whole = {"id": rid, "object": ep.chunk_object, "created": 1700000000, "model": model,
                     "choices": [_choice(index, ep.text(text, streamed=True), None, None)],
                     **({"usage": None} if include_usage else {})}
            got = make(index, text)
            assert got == sse(whole)
            assert json.loads(got.removeprefix("data: ")) == whole


def _job(index: int, finish: str = "length"):
    out = SimpleNamespace(finish_reason=finish, num_tokens=3, num_cached_tokens=0, want_logprobs=False)
    return SimpleNamespace(index=index, prompt_index=0, out=out)


def _events(reply_of, queued: list, first) -> list[str]:
    """Reply.stream's writes with `queued` events already waiting behind `first`."""
    async def go():
        reply = reply_of()
        q: asyncio.Queue = asyncio.Queue()
        for e in queued:
            q.put_nowait(e)
        return [w async for w in reply.stream(first, q)]

    return asyncio.run(go())


@pytest.mark.parametrize("ep", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_waiting_events_go_out_in_one_write(ep):
    jobs = [_job(0), _job(1)]
    reply_of = lambda: Reply(ep, "m", None, jobs, [[1, 2]], include_usage=True)
    deltas = [("delta", jobs[i % 2], Delta(t, None)) for i, t in enumerate(["a", "b", "c", "d"])]
    done = [("done", jobs[0], None), ("done", jobs[1], None)]
    together = _events(reply_of, deltas[1:] + done, deltas[0])
    assert len(together) == 1  # everything was there: one write

    # the same events arriving one at a time: one write each, the same SSE events in order
    async def one_by_one():
        reply = reply_of()
        q: asyncio.Queue = asyncio.Queue()
        stream = reply.stream(deltas[0], q)
        writes = [await anext(stream)]
        for e in deltas[1:] + done:
            q.put_nowait(e)
            writes.append(await anext(stream))
        assert [w async for w in stream] == []
        return writes

    apart = asyncio.run(one_by_one())
    events = lambda writes: [e for w in writes for e in w.split("\n\n") if e]
    strip = lambda es: [json.loads(e[6:]) | {"id": None} if e.startswith("data: {") else e for e in es]
    assert strip(events(together)) == strip(events(apart))  # the ids differ: two replies
    texts = [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content"))
             for c in strip(events(together)) if isinstance(c, dict) and c["choices"]]
    roles = 2 if ep is CHAT else 0  # chat: the assistant's role first, content ""
    assert texts[roles:] == ["a", "b", "c", "d", None if ep is CHAT else "", None if ep is CHAT else ""]
    assert events(together)[-1] == "data: [DONE]"
    assert '"usage": {"prompt_tokens": 2' in events(together)[-2]
