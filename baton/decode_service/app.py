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

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.routing import Route

from baton.decode_service.settings import DecodeSettings
from baton.decode_service.streams import Channel, Feed, Refused, run_work, stream
from baton.drain import StreamingResponse
from baton.pod.http import add_common_routes, error, sampling_params, serve, stream_format
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

    async def start(body: GenerateRequest | dict, make_sink=None) -> tuple[Feed, object]:
        """Validate a generate call and put it on the engine: (its Feed, where its outputs
        arrive). `make_sink(feed)`: a channel's; else an asyncio.Queue. Raises Refused."""
        arrival = time.perf_counter()
        if not isinstance(body, GenerateRequest):
            try:
                body = GenerateRequest.model_validate(body)
            except ValidationError as e:
                first = e.errors()[0]
                raise Refused(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        req, loop = body, pod.loop
        if loop is None or not loop.alive:
            raise Refused(503, "the pod is not ready", "service_unavailable")
        try:
            params = sampling_params(req.sampling)
            await validate(loop.engine, req.prompt_token_ids, params)
        except ValueError as e:
            raise Refused(400, str(e)) from None
        if req.prefill is not None and "remote" in state and not await state["peers"].url_allowed(
                req.prefill.url, "prefill"):
            # never send a prompt to a URL that did not prove it is one of ours: prefill here
            log.warning("request %s: prefill.url %r is not a verified prefill pod; prefilling locally",
                        req.request_id, req.prefill.url[:200])
            pod.metrics.transfers.labels("refused_peer").inc()
            req.prefill = None
        feed = Feed(loop, pod.metrics, req.request_id)
        sink = None if make_sink is None else make_sink(feed)
        try:
            if req.prefill is not None and "remote" in state:
                q = loop.attach(req.request_id, sink)
                run_work(feed, q, lambda: state["remote"].run(req.request_id, req.prompt_token_ids, params,
                                                              req.prefill.url, arrival))
            else:
                q = loop.submit(req.request_id, req.prompt_token_ids, params, sink=sink)
        except ValueError as e:
            raise Refused(400, str(e)) from None
        return feed, q

    @app.post("/internal/generate")
    async def generate(req: GenerateRequest, request: Request):
        try:
            feed, q = await start(req)
        except Refused as e:
            return JSONResponse(e.body, e.status)
        media_type, encode = stream_format(request.headers.get("accept"))
        return StreamingResponse(stream(feed, q, settings.token_timeout_s, encode), media_type=media_type)

    class ChannelRoute:  # an ASGI app (not a function: Starlette would make it a request handler)
        async def __call__(self, scope, receive, send) -> None:
            loop = pod.loop
            if loop is None or not loop.alive:
                await error(503, "the pod is not ready", type_="service_unavailable")(scope, receive, send)
                return
            await Channel(loop, pod.drain, start, settings.token_timeout_s)(scope, receive, send)

    app.router.routes.append(Route("/internal/channel", ChannelRoute(), methods=["POST"]))
    return app


def main(argv: list[str] | None = None) -> int:
    from baton.settings import parse_settings

    settings = parse_settings(DecodeSettings, argv, "baton decode", "Start a decode (or colocated) pod.")
    serve(create_app(settings), settings)
    return 0
