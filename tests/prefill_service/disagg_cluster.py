"""A disaggregated cluster of real processes for these tests, and what the tests read from it.

Redis, a router, one prefill pod and one decode pod, started as `baton up --prefill 1 --decode 1`
starts them (tests/stack.py), on loopback, with real UCX between the pods. Pods that a test
kills are started again by the next test that needs them (`prefill()`, `decode()`).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from baton.engine.sampling_params import SamplingParams
from tests.stack import Service, ServiceStack, free_port, wait_for, wait_idle, warm

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def kv_bytes_per_token(model: Path) -> int:
    """KV bytes of one token, all layers, K and V, float32 (what a CPU pod holds)."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4


class Cluster:
    def __init__(self, st: ServiceStack, model: Path, prefill_block_size: int = 16, decode_block_size: int = 8):
        self.st, self.model = st, Path(model)
        self.prefill_block_size, self.decode_block_size = prefill_block_size, decode_block_size
        self.redis = st.redis()
        self._prefill: Service | None = None
        self._decode: Service | None = None
        # both pods (at once: a start is mostly the model's load) before the router, so that
        # its first pick already sees them
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda start: start(), (self.prefill, self.decode)))
        self.router = st.router(model, redis_url=self.redis.url, refresh_interval_s=0.2)
        self.client = self.router.client(timeout_s=90)
        self.wait_routable()

    # -- pods (started again after a test killed one) ------------------------------------------
    def prefill(self) -> Service:
        if self._prefill is None or self._prefill.child.proc.poll() is not None:
            self._prefill = self.st.pod("prefill", self.model, redis_url=self.redis.url,
                                        block_size=self.prefill_block_size)
        return self._prefill

    def decode(self) -> Service:
        if self._decode is None or self._decode.child.proc.poll() is not None:
            self._decode = self.st.pod("decode", self.model, role="decode", redis_url=self.redis.url,
                                       block_size=self.decode_block_size)
        return self._decode

    def kill(self, svc: Service) -> None:
        self.st.kill(svc)

    def registered(self, svc: Service) -> bool:
        """Whether svc's heartbeat is in Redis (what the router reads)."""
        import redis

        from baton.kvindex import schema

        r = redis.Redis.from_url(self.redis.url)
        try:
            return any(json.loads(r.get(k) or b"{}").get("url") == svc.url
                       for k in r.scan_iter(schema.pod_key(schema.DEFAULT_PREFIX, "*")))
        finally:
            r.close()

    def wait_routable(self) -> None:
        """The router sees both pods (its pick would name the prefill pod)."""
        p, d = self.prefill(), self.decode()
        wait_for(lambda: self.registered(p) and self.registered(d), "both pods registered")
        wait_for(lambda: self.router.get("/ready").status_code == 200, "router ready")
        time.sleep(0.5)  # > two refreshes of the router's pod table

    # -- requests ---------------------------------------------------------------------------------
    def complete(self, prompt: list[int], params: SamplingParams):
        """(text, usage) of one /v1/completions call through the router."""
        r = self.client.completions.create(
            model=self.model.name, prompt=prompt, max_tokens=params.max_tokens,
            temperature=params.temperature, seed=params.seed, extra_body={"ignore_eos": params.ignore_eos})
        return r.choices[0].text, r.usage

    def complete_many(self, prompts: list[list[int]], params: list[SamplingParams]) -> list:
        with ThreadPoolExecutor(len(prompts)) as ex:
            return list(ex.map(self.complete, prompts, params))

    def warm_decode(self, prefix: list[int]) -> None:
        """Cache `prefix` on the decode pod alone: it prefills prefix + one token itself."""
        warm(self.decode(), prefix)

    def warm_prefill(self, prefix: list[int]) -> None:
        """Cache `prefix` on the prefill pod alone: it computes the prompt, then its push to a port
        where nobody listens fails (502), so no decode pod learns anything."""
        body = {"request_id": f"warm-p-{time.monotonic_ns()}", "prompt_token_ids": prefix, "kv_start": 0,
                "reservation_id": "none", "ucx_address": f"127.0.0.1:{free_port()}"}
        r = httpx.post(self.prefill().url + "/internal/prefill", json=body, timeout=60, trust_env=False)
        assert r.status_code == 502 and "KV push failed" in r.text, r.text
        wait_idle(self.prefill(), timeout_s=20)


class RawStream:
    """A streaming /v1/completions call on a bare socket, so that the test decides when the
    client goes away (httpx would block until the router's first byte)."""

    def __init__(self, router: Service, model: str, prompt: list[int], max_tokens: int):
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True}).encode()
        self.sock = socket.create_connection(("127.0.0.1", router.port), timeout=90)
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def received_anything(self) -> bool:
        self.sock.setblocking(False)
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def stop_prefill_mid_push(decode: Service, prefill: Service, num_layers: int, start) -> dict:
    """Run start(), wait until the decode pod has received the request's first layer(s), then
    freeze the prefill pod (SIGSTOP): a push cut off halfway, deterministically. Returns the
    decode pod's transfer stats at that point; asserts that layers are still missing."""
    before = decode.transfer_stats()
    start()
    wait_for(lambda: decode.transfer_stats()["layers_received"] > before["layers_received"],
             "first layers at the decode pod", timeout_s=60, interval_s=0.005)
    prefill.child.proc.send_signal(signal.SIGSTOP)
    now = decode.transfer_stats()
    got = now["layers_received"] - before["layers_received"]
    assert 0 < got < num_layers, f"{got} of {num_layers} layers arrived before the stop: use a longer prompt"
    assert now["active_reservations"] == 1
    return now


def resume(svc: Service) -> None:
    svc.child.proc.send_signal(signal.SIGCONT)
