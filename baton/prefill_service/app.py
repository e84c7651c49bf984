"""The prefill pod: computes prompts' KV and pushes it, layer by layer, to decode pods.

`POST /internal/prefill` comes from the decode pod that reserved blocks for the request. The
engine computes the prompt (batched with others, chunked when long, skipping what this
pod's prefix cache holds); right after each layer, that layer's KV of tokens
[kv_start, end) is gathered into one buffer and handed to the UCX sender, which sends it
while the next layer computes. The step then samples the first token with the request's
own sampling parameters, and DONE carries it (with its logprobs; its randomness is a
function of the request's seed and the token's position alone), so the decode pod answers
it as soon as the bytes land and goes on exactly as a colocated pod would. DONE goes out from the engine thread,
without waiting for this pod's event loop to run the handler (the event loop shares the
GIL with the model thread). The response comes once every layer is on
the wire: 200, or an OpenAI-shaped error that tells the decode pod to prefill itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import BaseModel, Field

from baton.engine.engine import FirstToken
from baton.pod.engine_loop import EngineFailure
from baton.pod.http import add_common_routes, error, sampling_params, serve
from baton.pod.runtime import PodRuntime, gpu_uuid, validate
from baton.prefill_service.settings import PrefillSettings

log = logging.getLogger("baton.prefill")


class PrefillRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)
    prompt_token_ids: list[int]  # the whole prompt
    kv_start: int = Field(ge=0)  # first token the decode pod lacks
    reservation_id: str = Field(min_length=1)
    ucx_address: str = Field(min_length=3)  # the decode pod's receiver, host:port
    decode_gpu: str | None = None  # the decode pod's GPU UUID, if it has one
    # how to sample the first token: SamplingParams' fields (max_tokens, stop ids and
    # ignore_eos are the decode pod's); none given: greedy
    sampling: dict = Field(default_factory=lambda: {"temperature": 0})


class PushToDecode:
    """The prefill engine's side of the hand-off (engine.KVPush), given to it at construction:
    each finished layer and then the first token go to the request's outgoing transfer.
    Both calls come on the engine thread."""

    def __init__(self):
        self.transfers: dict = {}  # engine request id -> the kvtransfer push
        self.sampled_at: dict[str, float] = {}  # engine request id -> when its first token was sampled

    def push_layer(self, request_id: str, layer: int, kv) -> None:
        t = self.transfers.get(request_id)
        if t is not None:
            t.push_layer(layer, kv)

    def first_token(self, request_id: str, first: FirstToken) -> None:
        t = self.transfers.get(request_id)
        if t is not None and t.all_pushed:  # DONE goes out from here, after the last layer
            self.sampled_at[request_id] = time.perf_counter()
            lp = first.logprobs
            t.finish(first.token, None if lp is None else lp[0][1], None if lp is None else lp[1:])


def create_app(settings: PrefillSettings) -> FastAPI:
    settings.resolve("prefill")
    pod = PodRuntime(settings, "prefill")
    state: dict = {}
    push = PushToDecode()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from baton.kvtransfer.sender import KVSender, SenderSettings
        from baton.pod.peers import Peers

        await pod.start(kv_push=push)
        min_message = settings.min_message_bytes
        if min_message is None:  # on a CPU the coalescing copy runs on the model thread: keep it small
            min_message = 16 << 20 if pod.loop.engine.device.type == "cuda" else 1 << 20
        sender = KVSender(SenderSettings(
            pod_id=settings.pod_id, connect_timeout_s=settings.ucx_connect_timeout_s,
            transfer_timeout_s=settings.transfer_timeout_s, max_inflight_bytes=settings.max_inflight_bytes,
            max_inflight_messages=settings.max_inflight_messages, min_message_bytes=min_message,
            secret=settings.internal_token))
        await sender.start()
        state["sender"] = sender
        state["peers"] = Peers(settings.redis_url, settings.internal_token)
        state["gpu"] = gpu_uuid(pod.loop.engine.device)
        pod.transfer = sender
        pod.register()
        try:
            yield
        finally:
            await pod.stop()
            await sender.close()
            await state["peers"].close()

    app = FastAPI(title="baton prefill pod", lifespan=lifespan)
    add_common_routes(app, pod)
    app.state.pod = pod
    app.state.baton = state

    @app.post("/internal/prefill")
    async def prefill(req: PrefillRequest):
        arrival = time.perf_counter()
        if not pod.ready:
            return error(503, "the prefill pod is not ready", type_="service_unavailable")
        engine = pod.loop.engine
        n = len(req.prompt_token_ids)
        try:
            params = sampling_params({**req.sampling, "max_tokens": 1})
            await validate(engine, req.prompt_token_ids, params)
            if req.kv_start >= n:
                raise ValueError(f"kv_start {req.kv_start} leaves no token to send ({n} tokens)")
        except ValueError as e:
            return error(400, str(e))
        if not await state["peers"].ucx_allowed(req.ucx_address):
            log.warning("request %s: ucx_address %r is not a verified decode pod's; refused",
                        req.request_id, req.ucx_address[:200])
            return error(403, "ucx_address is not the address of a verified decode pod", "ucx_address",
                         type_="permission_denied")
        cfg, runner = engine.model_cfg, engine.runner
        rid = f"{req.request_id}/{uuid.uuid4().hex[:8]}"  # the decode pod may retry the same request
        transfer = state["sender"].begin(
            req.request_id, req.reservation_id, req.ucx_address, cfg.num_layers,
            cfg.kv_layer_shape(n - req.kv_start), runner.kv_dtype,
            settings.same_gpu_min_message_bytes if req.decode_gpu and req.decode_gpu == state["gpu"] else None)
        push.transfers[rid] = transfer
        q = pod.loop.submit(rid, req.prompt_token_ids, params, prefill_only=True, kv_start=req.kv_start)
        ok = False
        try:
            item = await asyncio.wait_for(q.get(), settings.transfer_timeout_s)
            if isinstance(item, EngineFailure) or item.error:
                message = item.message if isinstance(item, EngineFailure) else item.error
                transfer.cancel(message)
                return error(500, message, type_="engine_error")
            pod.metrics.prompt_tokens.inc(n)  # what this pod's prefix cache saved, as on other pods
            pod.metrics.cached_tokens.inc(item.num_cached_tokens)
            if not transfer.finish_called:  # push.first_token sends DONE after the last layer
                transfer.cancel("the prefill ended without every layer pushed")
            await asyncio.wait_for(transfer.wait(), settings.transfer_timeout_s)
            ok = True
            sampled = push.sampled_at.get(rid)
            if sampled is not None:
                pod.metrics.prefill_phase.labels("compute").observe(sampled - arrival)
                pod.metrics.prefill_phase.labels("send").observe(time.perf_counter() - sampled)
            return {"request_id": req.request_id, "num_cached_tokens": item.num_cached_tokens,
                    "tokens_sent": n - req.kv_start}
        except TimeoutError:
            transfer.cancel("prefill timed out")
            return error(504, f"prefill and push did not finish within {settings.transfer_timeout_s} s",
                         type_="timeout")
        except Exception as e:  # TransferFailed and its kin: the decode pod falls back
            transfer.cancel(str(e))
            log.warning("request %s: push failed: %s", req.request_id, e)
            return error(502, f"KV push failed: {e}", type_="transfer_error")
        finally:
            if not ok:
                pod.loop.abort(rid)
            else:
                pod.loop.release(rid)
            push.transfers.pop(rid, None)
            push.sampled_at.pop(rid, None)

    return app


def main(argv: list[str] | None = None) -> int:
    from baton.settings import parse_settings

    settings = parse_settings(PrefillSettings, argv, "baton prefill", "Start a prefill pod.")
    serve(create_app(settings), settings)
    return 0
