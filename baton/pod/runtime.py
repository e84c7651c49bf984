"""A pod's runtime: the engine on its thread, metrics, the UCX side's handle and the
registry heartbeat, started and stopped in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from pathlib import Path

from baton.drain import Drain
from baton.pod.settings import PodSettings

log = logging.getLogger("baton.pod")


def gpu_uuid(device) -> str | None:
    """The UUID of the GPU a pod runs on (two pods sharing a GPU see the same); None on CPU."""
    if device.type != "cuda":
        return None
    import torch

    return str(torch.cuda.get_device_properties(device).uuid)


async def validate(engine, prompt_token_ids: list[int], params) -> None:
    """engine.validate off the event loop when the request has a grammar: compiling it (and,
    the first time, importing xgrammar and reading the tokenizer: seconds) would stall every
    stream of the pod. ValueError as engine.validate."""
    if params.structured_output is None:
        engine.validate(prompt_token_ids, params)
    else:
        await asyncio.to_thread(engine.validate, prompt_token_ids, params)


class PodRuntime:
    """The engine loop, metrics and index publisher of one pod, started in the app's lifespan."""

    def __init__(self, settings: PodSettings, role: str):
        self.settings, self.role = settings, role
        self.loop = None
        self.metrics = None
        self.publisher = None
        self.ucx_address = ""
        self.transfer = None  # the KVSender (prefill) or KVReceiver (decode), for metrics
        self.drain = Drain(settings.drain_timeout_s, on_start=self._leave_registry)

    async def _leave_registry(self) -> None:
        # draining: routers stop picking this pod now, not only once its heartbeat runs out
        if self.publisher is not None:
            await self.publisher.stop(deregister=True)

    async def start(self, kv_push=None) -> None:
        """Load the engine (off the event loop) and start its thread. `kv_push`: a prefill
        pod's side of the hand-off (engine.KVPush), given to the engine at construction."""
        from baton.engine.engine import LLMEngine
        from baton.pod.engine_loop import EngineLoop
        from baton.pod.metrics import PodMetrics

        # The engine thread and the event loop (HTTP, UCX sends and receives) share the GIL;
        # Python's default 5 ms switch interval would hold a layer's push, or a received
        # layer's scatter, behind a whole model step. 0.5 ms keeps the network moving.
        sys.setswitchinterval(0.0005)
        s = self.settings
        if s.engine == "sim":  # the model replaced by a timing model (load tests without a GPU)
            from baton.sim.engine import SimEngine

            engine = await asyncio.to_thread(SimEngine, s.model, s.engine_config(), kv_push, s.sim_config())
        else:
            engine = await asyncio.to_thread(LLMEngine, s.model, s.engine_config(), kv_push)
        self.loop = EngineLoop(engine, asyncio.get_running_loop(), s.stream_stall_timeout_s)
        self.metrics = PodMetrics(weakref.ref(self.loop), lambda: self.publisher, lambda: self.transfer)
        step_time = {kind: self.metrics.step_time.labels(kind) for kind in ("decode", "mixed", "prefill")}
        self.loop.on_step = lambda kind, seconds: step_time[kind].observe(seconds)
        self.loop.start()

    @property
    def limits(self) -> dict:
        """What the router must know to hash prompts and check their length as this pod does."""
        return {"block_size": self.settings.block_size, "max_model_len": self.loop.engine.max_model_len}

    def register(self) -> None:
        """Start publishing heartbeat and KV events (after the UCX address is known)."""
        s = self.settings
        if not s.redis_url:
            return
        from baton.kvindex.publisher import PodInfo, PodPublisher

        self.publisher = PodPublisher(
            s.redis_url,
            PodInfo(s.pod_id, self.role, s.advertise_url, s.model_name or Path(s.model).name,
                    ucx_address=self.ucx_address, **self.limits),
            self.loop.state, self.loop.drain_events, self.loop.all_cached,
            interval_s=s.heartbeat_interval_s, ttl_s=s.heartbeat_ttl_s, secret=s.internal_token,
        )
        self.publisher.start()
        log.info("%s pod %s registered at %s", self.role, s.pod_id, s.advertise_url)

    async def stop(self) -> None:
        if self.publisher is not None:
            await self.publisher.stop(deregister=True)
        if self.loop is not None:
            await asyncio.to_thread(self.loop.stop)

    @property
    def ready(self) -> bool:
        return self.loop is not None and self.loop.alive


