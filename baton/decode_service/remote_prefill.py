"""A decode pod's side of the prefill→decode hand-off: reserve blocks, have a prefill pod push
the prompt's KV into them, then complete the request or fall back to prefilling here.

The scheduler side runs on the engine thread through EngineLoop's named calls (reserve,
complete, fall_back); the worker side (each received layer written into the reservation's
blocks) too: the receiver hands every landed layer to the engine thread, the only thread
that writes the KV cache, and its staging buffer is reused only once that write is done.
Any failure before every layer is in falls back to prefilling here; what arrived is never
read (the reservation ends first: later writes into it are dropped, and only then are its
blocks freed and recomputed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import httpx

from baton import internal_auth
from baton.decode_service.settings import DecodeSettings
from baton.engine.engine import FirstToken, Reservation
from baton.engine.sampling_params import SamplingParams
from baton.kvtransfer.event_waiter import EventWaiter
from baton.pod.engine_loop import EngineLoop
from baton.pod.metrics import PodMetrics
from baton.pod.runtime import gpu_uuid

log = logging.getLogger("baton.decode")


class RemotePrefill:
    def __init__(self, settings: DecodeSettings, loop: EngineLoop, receiver, metrics: PodMetrics):
        self.settings, self.loop, self.receiver, self.metrics = settings, loop, receiver, metrics
        self.gpu = gpu_uuid(loop.engine.device)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(settings.kv_transfer_timeout_s, connect=2.0),
                                      trust_env=False, headers=internal_auth.headers(settings.internal_token))
        # waits, off the event loop, for the GPU writes of received layers (CUDA events)
        self.writes = EventWaiter(asyncio.get_running_loop(), "kv-writes")

    async def close(self) -> None:
        await self.http.aclose()
        self.writes.close()

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams, prefill_url: str,
                  arrival: float) -> None:
        """Reserve, receive the prompt's KV from the prefill pod at `prefill_url`, then hand
        the request to the engine, whose outputs arrive on the request's queue (attached by
        the caller)."""
        loop, m = self.loop, self.metrics
        res = await loop.reserve(request_id, prompt, params)
        reserved = time.perf_counter()
        if res is None:  # no room to reserve now: queue it here like any request
            m.transfers.labels("no_room").inc()
            await loop.add(request_id, prompt, params)
        elif res.end - res.start == 1:  # this pod holds all but the last token: nothing travels
            m.transfers.labels("local_hit").inc()
            await loop.complete(request_id)
        else:
            times: list[float] = []  # perf_counter when the first layer, then every layer and DONE, were in
            first = await self._receive(prompt, params, prefill_url, res, times)
            # the first token reaches the client from complete, ahead of every later one
            if first is not None and await loop.complete(request_id, first) is not None:
                m.transfers.labels("ok").inc()
                first_in, all_in = times
                for phase, seconds in (("reserve", reserved - arrival), ("first_layer", first_in - reserved),
                                       ("layers", all_in - first_in), ("admit", time.perf_counter() - all_in)):
                    m.transfer_phase.labels(phase).observe(seconds)
            else:
                m.transfers.labels("failed").inc()
                await loop.fall_back(request_id)

    async def _write(self, request_id: str, layer: int, kv) -> None:
        ev = await self.loop.receive_layer(request_id, layer, kv)
        if ev is not None:
            await self.writes.wait([ev])

    async def _receive(self, prompt: list[int], params: SamplingParams, prefill_url: str, res: Reservation,
                       times: list[float]) -> FirstToken | None:
        """The prefill pod's first token, once every layer of the reservation is written into
        this pod's cache; None if the transfer failed. Appends to `times` when the first layer
        arrived and when the last did (with DONE)."""
        s, m = self.settings, self.metrics
        engine = self.loop.engine
        cfg = engine.model_cfg
        rid = res.request_id

        def on_layer(layer: int, kv):
            if not times:
                times.append(time.perf_counter())
            return self._write(rid, layer, kv)

        t0 = time.perf_counter()
        transfer = self.receiver.expect(rid, uuid.uuid4().hex, cfg.num_layers,
                                        cfg.kv_layer_shape(res.end - res.start),
                                        engine.runner.kv_dtype, on_layer)
        body = {"request_id": rid, "prompt_token_ids": prompt, "kv_start": res.start,
                "reservation_id": transfer.reservation_id, "ucx_address": self.receiver.address,
                "sampling": dataclasses.asdict(params), "decode_gpu": self.gpu}
        http = asyncio.create_task(self.http.post(prefill_url.rstrip("/") + "/internal/prefill", json=body))
        wait = asyncio.create_task(transfer.wait())
        try:
            done, _ = await asyncio.wait({http, wait}, timeout=s.kv_transfer_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if http in done and wait not in done:
                r = http.exception() or (None if http.result().status_code == 200 else http.result())
                if r is not None:
                    reason = repr(r) if isinstance(r, BaseException) else f"HTTP {r.status_code}: {r.text[:200]}"
                    raise RuntimeError(f"prefill pod refused or failed: {reason}")
                await asyncio.wait_for(asyncio.shield(wait), s.kv_transfer_timeout_s)
            elif not done:
                raise TimeoutError(f"no KV within {s.kv_transfer_timeout_s} s")
            msg = wait.result()  # DONE; raises TransferFailed when the transfer failed
            times.append(time.perf_counter())
            m.kv_bytes_received.inc(transfer.layer_nbytes * cfg.num_layers)
            m.transfer_seconds.observe(time.perf_counter() - t0)
            logprobs = None
            if msg.first_logprob is not None:
                logprobs = [(msg.first_token, msg.first_logprob)] + [
                    (int(t), float(lp)) for t, lp in msg.top_logprobs or []]
            return FirstToken(msg.first_token, logprobs)
        except Exception as e:  # every failure ends in local prefill, logged once
            log.warning("request %s: KV transfer failed (%s); prefilling locally", rid, e)
            transfer.cancel(str(e))
            return None
        finally:
            # also when cancelled (client gone): the receiver drops the reservation before its
            # blocks are freed (no later layer is handed on), and the engine drops any write
            # that reaches it after the reservation ended
            transfer.cancel("the request ended")  # no-op once the transfer is complete
            for task in (http, wait):
                if not task.done():
                    task.cancel()
            await asyncio.gather(http, wait, return_exceptions=True)
