"""The pod's engine loop with the simulated engine (in-process, no sockets): a request that
waits for room in the batch counts as queued (the pod's token_timeout_s does not run then),
and a stream nobody reads is aborted after stall_timeout_s, freeing its slot for the next."""

from __future__ import annotations

import asyncio
import time

from baton.engine.config import EngineConfig
from baton.engine.sampling_params import SamplingParams
from baton.pod.engine_loop import STALL_BACKLOG, EngineFailure, EngineLoop
from baton.sim.config import SimConfig
from baton.sim.engine import SimEngine


async def _until(cond, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.01)


def test_queued_requests_and_unread_streams(tiny_qwen3):
    async def run():
        sim = SimConfig(engine="sim", sim_decode_step_s=0.005)
        engine = SimEngine(tiny_qwen3, EngineConfig(max_num_seqs=1), sim=sim)  # one sequence at a time
        loop = EngineLoop(engine, asyncio.get_running_loop(), stall_timeout_s=0.5)
        loop.start()
        try:
            unread = loop.submit("unread", [1, 2, 3], SamplingParams(max_tokens=2000, temperature=0))
            q = loop.submit("next", [4, 5, 6], SamplingParams(max_tokens=5, temperature=0))
            await _until(lambda: loop.queued("next"), "the second request queued behind the first")
            assert not loop.queued("unread")
            got = []
            while not got or got[-1].finish_reason is None:  # it runs once the unread one is cut off
                got.append(await asyncio.wait_for(q.get(), 30))
            assert len([t for o in got for t in o.new_token_ids]) == 5 and got[-1].finish_reason == "length"
            assert not loop.queued("next")
            loop.release("next")  # as the pod's stream does after the last output
            items = [unread.get_nowait() for _ in range(unread.qsize())]
            assert isinstance(items[-1], EngineFailure) and "not read" in items[-1].message
            outputs = items[:-1]
            assert STALL_BACKLOG < len(outputs) < 2000  # cut off, long before its end
            assert loop.num_open_requests == 0
            await _until(lambda: loop.stats().running == 0 and loop.stats().free_blocks == loop.stats().total_blocks,
                         "every block free")
        finally:
            loop.stop()

    asyncio.run(run())
