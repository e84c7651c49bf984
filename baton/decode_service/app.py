"""The decode pod's HTTP service: the internal generate API the router calls.

Colocated (role `colocated`): the pod prefills and decodes. Disaggregated (role `decode`):
when the router names a prefill pod, this pod first matches its own prefix cache, reserves
blocks for the rest of the prompt, and asks the prefill pod to push that KV over UCX. The
prefill pod samples the first token and sends it last: once every layer has arrived, that
token goes to the client and the request joins the running batch. If the transfer fails or
runs late, whatever arrived is dropped and the pod prefills the request itself. The engine
runs on its own thread (EngineLoop); handlers only enqueue and stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from baton import internal_auth
from baton.decode_service.settings import PodSettings
from baton.engine.engine import FirstToken
from baton.engine.loop import EngineFailure, EngineLoop
from baton.engine.pod import PodRuntime, Sampling, add_common_routes, error, gpu_uuid, serve
from baton.engine.pod_metrics import PodMetrics
from baton.engine.sampling_params import SamplingParams

log = logging.getLogger("baton.decode")


class PrefillTarget(BaseModel):
    url: str  # the prefill pod's base URL


class GenerateRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)
    prompt_token_ids: list[int]
    sampling: Sampling = Field(default_factory=Sampling)
    prefill: PrefillTarget | None = None  # disaggregated: who computes the prompt's KV


def create_app(settings: PodSettings) -> FastAPI:
    settings.resolve(settings.role)
    pod = PodRuntime(settings, settings.role)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pod.start()
        receiver = None
        if settings.role == "decode":
            from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings

            receiver = KVReceiver(ReceiverSettings(
                port=settings.ucx_port, advertise_host=settings.advertise_host, pod_id=settings.pod_id,
                setup_timeout_s=settings.kv_setup_timeout_s, transfer_timeout_s=settings.kv_transfer_timeout_s,
            ), device=pod.loop.engine.device)
            await receiver.start()
            pod.ucx_address = receiver.address
            pod.transfer = receiver
            state["receiver"] = receiver
            state["gpu"] = gpu_uuid(pod.loop.engine.device)
            state["http"] = httpx.AsyncClient(timeout=httpx.Timeout(settings.kv_transfer_timeout_s, connect=2.0),
                                              trust_env=False, headers=internal_auth.headers(settings.internal_token))
        pod.register()
        try:
            yield
        finally:
            await pod.stop()
            if receiver is not None:
                await receiver.close()
                await state["http"].aclose()

    app = FastAPI(title="baton decode pod", lifespan=lifespan)
    add_common_routes(app, pod)
    app.state.pod = pod
    app.state.baton = state

    @app.post("/internal/generate")
    async def generate(req: GenerateRequest):
        arrival = time.perf_counter()
        loop: EngineLoop | None = pod.loop
        if loop is None or not loop.alive:
            return error(503, "the pod is not ready", type_="service_unavailable")
        try:
            params = SamplingParams(**req.sampling.model_dump())
            loop.engine.validate(req.prompt_token_ids, params)
        except ValueError as e:
            return error(400, str(e))
        work = None
        try:
            if req.prefill is not None and "receiver" in state:
                q = loop.attach(req.request_id)
                work = lambda: _remote_prefill(pod, state, settings, req, params, arrival)
            else:
                q = loop.submit(req.request_id, req.prompt_token_ids, params)
        except ValueError as e:
            return error(400, str(e))
        return StreamingResponse(_stream(loop, pod.metrics, req.request_id, q, settings.token_timeout_s, work),
                                 media_type="application/x-ndjson")

    return app


async def _remote_prefill(pod: PodRuntime, state: dict, settings: PodSettings, req: GenerateRequest,
                          params: SamplingParams, arrival: float) -> None:
    """Reserve, receive the prompt's KV from the prefill pod, then hand the request to the
    engine, whose outputs arrive on the request's queue (attached by the caller).

    Any failure before every layer is in falls back to prefilling here; what arrived is
    never read (the reservation's blocks are freed first, and only then recomputed).
    """
    loop, m = pod.loop, pod.metrics
    rid, prompt = req.request_id, req.prompt_token_ids
    engine = loop.engine
    res = await loop.call(type(engine).reserve_remote, rid, prompt, params)
    reserved = time.perf_counter()
    if res is None:  # no room to reserve now: queue it here like any request
        m.transfers.labels("no_room").inc()
        await loop.call(type(engine).add_request, rid, prompt, params)
    elif res.end - res.start == 1:  # this pod holds all but the last token: nothing travels
        m.transfers.labels("local_hit").inc()
        await loop.call(type(engine).complete_remote, rid)
    else:
        times: list[float] = []  # perf_counter when the first layer, then every layer and DONE, were in
        first = await _receive(pod, state, settings, req, res, times)
        # the first token reaches the client from complete_remote, ahead of every later one
        if first is not None and await loop.call_outputs(type(engine).complete_remote, rid, first) is not None:
            m.transfers.labels("ok").inc()
            first_in, all_in = times
            for phase, seconds in (("reserve", reserved - arrival), ("first_layer", first_in - reserved),
                                   ("layers", all_in - first_in), ("admit", time.perf_counter() - all_in)):
                m.transfer_phase.labels(phase).observe(seconds)
        else:
            m.transfers.labels("failed").inc()
            await loop.call(type(engine).fallback_local, rid)


async def _receive(pod: PodRuntime, state: dict, settings: PodSettings, req: GenerateRequest,
                   res, times: list[float]) -> FirstToken | None:
    """The prefill pod's first token, once every layer of the reservation is scattered into
    this pod's cache; None if the transfer failed. Appends to `times` when the first layer
    arrived and when the last did (with DONE)."""
    from baton.kernels import ops

    engine, receiver, m = pod.loop.engine, state["receiver"], pod.metrics
    cfg, cache = engine.model_cfg, engine.runner.kv_cache
    n = res.end - res.start
    reservation_id = uuid.uuid4().hex
    side = _scatter_stream(state, cache)
    last = [None]  # the CUDA event after this request's latest scatter (side is FIFO)

    def on_layer(layer: int, kv):
        """Scatter one received layer into this pod's blocks, without waiting for it.

        On CUDA the scatter goes on the pod's scatter stream, and the receiver gets an event
        back: its waiter thread waits for it (no GIL, no spinning) before the staging buffer
        is reused and before the layer counts as received. So wait() returning means every
        scatter has finished, and the request is admitted only then.
        """
        if not times:
            times.append(time.perf_counter())
        if side is None:
            ops.scatter_kv(kv, cache[layer], res.slots)
            return None
        import torch

        from baton.kvtransfer.event_waiter import cuda_event

        with torch.cuda.device(cache.device):  # the loop thread's device may differ
            if last[0] is None:
                # Blocks just reserved may still be read or written by kernels that the
                # engine queued for their previous owner: scatter only after those.
                side.wait_stream(torch.cuda.current_stream(cache.device))
            with torch.cuda.stream(side):
                ops.scatter_kv(kv, cache[layer], res.slots)
            ev = cuda_event()
            ev.record(side)
        last[0] = ev
        return ev

    t0 = time.perf_counter()
    transfer = receiver.expect(req.request_id, reservation_id, cfg.num_layers,
                               (2, n, cfg.num_kv_heads, cfg.head_dim), engine.runner.dtype, on_layer)
    body = {"request_id": req.request_id, "prompt_token_ids": req.prompt_token_ids, "kv_start": res.start,
            "reservation_id": reservation_id, "ucx_address": receiver.address, "sampling": req.sampling.model_dump(),
            "decode_gpu": state["gpu"]}
    http = asyncio.create_task(state["http"].post(req.prefill.url.rstrip("/") + "/internal/prefill", json=body))
    wait = asyncio.create_task(transfer.wait())
    try:
        done, _ = await asyncio.wait({http, wait}, timeout=settings.kv_transfer_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if http in done and wait not in done:
            r = http.exception() or (None if http.result().status_code == 200 else http.result())
            if r is not None:
                reason = repr(r) if isinstance(r, BaseException) else f"HTTP {r.status_code}: {r.text[:200]}"
                raise RuntimeError(f"prefill pod refused or failed: {reason}")
            await asyncio.wait_for(asyncio.shield(wait), settings.kv_transfer_timeout_s)
        elif not done:
            raise TimeoutError(f"no KV within {settings.kv_transfer_timeout_s} s")
        msg = wait.result()  # DONE; raises TransferFailed when the transfer failed
        times.append(time.perf_counter())
        m.kv_bytes_received.inc(transfer.layer_nbytes * cfg.num_layers)
        m.transfer_seconds.observe(time.perf_counter() - t0)
        logprobs = None
        if msg.first_logprob is not None:
            logprobs = [(msg.first_token, msg.first_logprob)] + [(int(t), float(lp)) for t, lp in msg.top_logprobs or []]
        return FirstToken(msg.first_token, logprobs, msg.generator_state)
    except Exception as e:  # every failure ends in local prefill, logged once
        log.warning("request %s: KV transfer failed (%s); prefilling locally", req.request_id, e)
        transfer.cancel(str(e))
        return None
    finally:
        # also when cancelled (client gone): the receiver must drop the reservation before
        # its blocks are freed, or later layers land in blocks other requests then own
        transfer.cancel("the request ended")  # no-op once the transfer is complete
        if last[0] is not None:  # no scatter may still write once the blocks are freed or reused
            last[0].synchronize()  # (after cancel() no further scatter of this request starts)
        for task in (http, wait):
            if not task.done():
                task.cancel()
        await asyncio.gather(http, wait, return_exceptions=True)


def _scatter_stream(state: dict, cache):
    """The pod's one stream for scattering received KV (None on CPU).

    Priority 0 is CUDA's lowest, the default stream's own: decode steps never wait behind a
    scatter, and block-level scheduling shares the GPU between them. Each scatter is small
    (one layer of one request), so a decode step's kernels interleave with them.
    """
    if not cache.is_cuda:
        return None
    if "scatter_stream" not in state:
        import torch

        state["scatter_stream"] = torch.cuda.Stream(cache.device, priority=0)
    return state["scatter_stream"]


async def _stream(loop: EngineLoop, m: PodMetrics, rid: str, q: asyncio.Queue, timeout_s: float, work=None):
    """NDJSON lines of token ids until the request finishes; abort on any early exit.

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
            try:
                item = await asyncio.wait_for(q.get(), timeout_s)
            except TimeoutError:
                status = "timeout"
                log.warning("request %s: no token for %.0f s, aborted", rid, timeout_s)
                yield json.dumps({"error": {"message": f"no token within {timeout_s} s", "type": "timeout"}}) + "\n"
                return
            if isinstance(item, EngineFailure):
                status = "error"
                yield json.dumps({"error": {"message": item.message, "type": "engine_error"}}) + "\n"
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
            yield json.dumps({
                "token_ids": item.new_token_ids, "logprobs": item.new_logprobs,
                "finish_reason": item.finish_reason, "num_cached_tokens": item.num_cached_tokens,
                "num_prompt_tokens": item.num_prompt_tokens,
            }) + "\n"
            if item.finish_reason:
                status = item.finish_reason
                m.e2e.observe(now - start)
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

    settings = parse_settings(PodSettings, argv, "baton decode", "Start a decode (or colocated) pod.")
    serve(create_app(settings), settings)
    return 0
