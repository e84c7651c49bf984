"""The decode pod's HTTP service: the internal generate API the router calls.

Colocated (role `colocated`): the pod prefills and decodes. Disaggregated (role `decode`):
when the router names a prefill pod, this pod first matches its own prefix cache, reserves
blocks for the rest of the prompt, and asks the prefill pod to push that KV over UCX
(remote_prefill.py). The prefill pod samples the first token and sends it last: once every
layer has arrived, that token goes to the client and the request joins the running batch. If
the transfer fails or runs late, whatever arrived is dropped and the pod prefills the request
itself. The engine runs on its own thread (EngineLoop); handlers only enqueue and stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from baton.decode_service.settings import DecodeSettings
from baton.drain import StreamingResponse
from baton.pod.engine_loop import EngineFailure, EngineLoop
from baton.pod.http import add_common_routes, error, sampling_params, serve, stream_format
from baton.pod.metrics import PodMetrics
from baton.pod.runtime import PodRuntime, validate

log = logging.getLogger("baton.decode")


class PrefillTarget(BaseModel):
    url: str  # the prefill pod's base URL


class GenerateRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)
    prompt_token_ids: list[int]
    sampling: dict = Field(default_factory=dict)  # SamplingParams' fields (dataclasses.asdict)
    prefill: PrefillTarget | None = None  # disaggregated: who computes the prompt's KV


def create_app(settings: DecodeSettings) -> FastAPI:
    settings.resolve(settings.role)
    pod = PodRuntime(settings, settings.role)
    state: dict = {}  # "remote": the RemotePrefill of a decode pod

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pod.start()
        remote = None
        if settings.role == "decode":
            from baton.decode_service.remote_prefill import RemotePrefill
            from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings
            from baton.pod.peers import Peers

            receiver = KVReceiver(ReceiverSettings(
                port=settings.ucx_port, advertise_host=settings.advertise_host, pod_id=settings.pod_id,
                setup_timeout_s=settings.kv_setup_timeout_s, transfer_timeout_s=settings.kv_transfer_timeout_s,
                secret=settings.internal_token,
            ), device=pod.loop.engine.device)
            state["peers"] = Peers(settings.redis_url, settings.internal_token, settings.prefill_urls)
            await receiver.start()
            pod.ucx_address = receiver.address
            pod.transfer = receiver
            remote = state["remote"] = RemotePrefill(settings, pod.loop, receiver, pod.metrics)
        pod.register()
        try:
            yield
        finally:
            await pod.stop()
            if remote is not None:
                await remote.receiver.close()
                await remote.close()
                await state["peers"].close()

    app = FastAPI(title="baton decode pod", lifespan=lifespan)
    add_common_routes(app, pod)
    app.state.pod = pod
    app.state.baton = state

    @app.post("/internal/generate")
    async def generate(req: GenerateRequest, request: Request):
        arrival = time.perf_counter()
        loop: EngineLoop | None = pod.loop
        if loop is None or not loop.alive:
            return error(503, "the pod is not ready", type_="service_unavailable")
        try:
            params = sampling_params(req.sampling)
            await validate(loop.engine, req.prompt_token_ids, params)
        except ValueError as e:
            return error(400, str(e))
        work = None
        if req.prefill is not None and "remote" in state and not await state["peers"].url_allowed(
                req.prefill.url, "prefill"):
            # never send a prompt to a URL that did not prove it is one of ours: prefill here
            log.warning("request %s: prefill.url %r is not a verified prefill pod; prefilling locally",
                        req.request_id, req.prefill.url[:200])
            pod.metrics.transfers.labels("refused_peer").inc()
            req.prefill = None
        try:
            if req.prefill is not None and "remote" in state:
                q = loop.attach(req.request_id)
                work = lambda: state["remote"].run(req.request_id, req.prompt_token_ids, params,
                                                   req.prefill.url, arrival)
            else:
                q = loop.submit(req.request_id, req.prompt_token_ids, params)
        except ValueError as e:
            return error(400, str(e))
        media_type, encode = stream_format(request.headers.get("accept"))
        return StreamingResponse(_stream(loop, pod.metrics, req.request_id, q, settings.token_timeout_s, encode, work),
                                 media_type=media_type)

    return app


async def _stream(loop: EngineLoop, m: PodMetrics, rid: str, q: asyncio.Queue, timeout_s: float, encode,
                  work=None):
    """Frames of token ids (`encode`: NDJSON lines or msgpack, pod/http.py's stream_format)
    until the request finishes; abort on any early exit.

    `work` (disaggregated): makes the coroutine that receives the prompt's KV and then hands
    the request to the engine; it runs as a task of its own, so that it can be cancelled and
    cleaned up after without awaiting it here.
    """
    start = last = time.perf_counter()
    first = True
    status = "abort"
    task = None
    if work is not None:
        task = asyncio.ensure_future(work())
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or q.put_nowait(
            EngineFailure(f"receiving the prompt's KV failed: {t.exception()!r}")))
    try:
        while True:
            if q.empty():
                try:  # a timer, not wait_for's task per token
                    async with asyncio.timeout(timeout_s):
                        item = await q.get()
                except TimeoutError:
                    if loop.queued(rid):
                        continue  # waiting for room in the batch: only time running counts
                    status = "timeout"
                    log.warning("request %s: no token for %.0f s, aborted", rid, timeout_s)
                    yield encode({"error": {"message": f"no token within {timeout_s} s", "type": "timeout"}})
                    return
            else:
                item = q.get_nowait()
            # Steps that came while the last line was written go out as ONE line (one write,
            # one parse in the router): under load a per-token write is what falls behind.
            line = None
            while True:
                if isinstance(item, EngineFailure) or item.error:  # the engine failed it (it alone)
                    if line is not None:
                        yield encode(line)
                    status = "error"
                    message = item.message if isinstance(item, EngineFailure) else item.error
                    yield encode({"error": {"message": message, "type": "engine_error"}})
                    return
                now = time.perf_counter()
                if first:
                    m.ttft.observe(now - start)
                    m.prompt_tokens.inc(item.num_prompt_tokens)
                    m.cached_tokens.inc(item.num_cached_tokens)
                    first = False
                else:
                    m.itl.observe(now - last)
                last = now
                m.generation_tokens.inc(len(item.new_token_ids))
                if line is None:
                    line = {"token_ids": list(item.new_token_ids),
                            "logprobs": None if item.new_logprobs is None else list(item.new_logprobs),
                            "finish_reason": item.finish_reason, "num_cached_tokens": item.num_cached_tokens,
                            "num_prompt_tokens": item.num_prompt_tokens}
                else:
                    line["token_ids"] += item.new_token_ids
                    if item.new_logprobs is not None:
                        line["logprobs"] = (line["logprobs"] or []) + item.new_logprobs
                    line["finish_reason"] = item.finish_reason
                if item.finish_reason or q.empty():
                    break
                item = q.get_nowait()
            yield encode(line)
            if line["finish_reason"]:
                status = line["finish_reason"]
                m.e2e.observe(last - start)
                return
    finally:
        m.requests.labels(status=status).inc()
        # No await in here: once the client is gone, Starlette (anyio) cancels this generator
        # again at every await, which left the abort below unreached and the request's
        # blocks and queue held for good.
        if status in ("stop", "length"):
            loop.release(rid)
        elif task is not None and not task.done():
            # free the blocks only once the transfer is cancelled and no scatter still writes
            task.cancel()
            task.add_done_callback(lambda _: loop.abort(rid))
        else:  # client gone, timeout or error: free the request's blocks now
            loop.abort(rid)


def main(argv: list[str] | None = None) -> int:
    from baton.settings import parse_settings

    settings = parse_settings(DecodeSettings, argv, "baton decode", "Start a decode (or colocated) pod.")
    serve(create_app(settings), settings)
    return 0
