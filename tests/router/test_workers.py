"""`baton router --workers 2`: two router processes on one port (SO_REUSEPORT), both serving,
stopped together by one SIGTERM to their parent (real processes: Redis, a sim pod)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.stack import ServiceStack, free_port, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "workers"


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_two_workers_share_the_port_and_stop_together(tmp_path, tiny_qwen3):
    with ServiceStack(tmp_path) as st:
        rs = st.redis()
        st.pod("decode", tiny_qwen3, engine="sim", redis_url=rs.url, internal_token=TOKEN)
        router = st.router(tiny_qwen3, port=free_port(), workers=2, redis_url=rs.url, internal_token=TOKEN)
        parent = router.child.proc.pid
        workers = [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        assert len(workers) == 2
        before = {w: _cpu_ticks(w) for w in workers}
        model = router.client().models.list().data[0].id
        texts = set()
        for _ in range(16):  # a new connection each: the kernel spreads them over the workers
            r = httpx.post(router.url + "/v1/completions", timeout=30, trust_env=False,
                           headers={"Connection": "close"},
                           json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            texts.add(r.json()["choices"][0]["text"])
        assert len(texts) == 1  # the same answer from either worker
        assert all(_cpu_ticks(w) > before[w] for w in workers)  # both served
        os.kill(parent, signal.SIGTERM)
        assert router.child.proc.wait(30) == 0
        wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), "workers gone", 10)
