"""Signed registry records on a real Redis with a password (the one `baton up` starts): what a
reader with the secret accepts, what it skips (and says so once), and Redis refusing strangers."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import redis

from baton import internal_auth
from baton.kvindex import schema
from baton.kvindex.index import KVIndex
from baton.kvindex.publisher import PodInfo, PodPublisher
from baton.launcher import Stack, start_redis

SECRET = "s3cret-token"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("redis"))
    try:
        yield start_redis(stack)
    finally:
        stack.stop(grace_s=5)


def test_redis_from_baton_up_refuses_clients_without_its_password(redis_url):
    host_port = redis_url.rsplit("@", 1)[1]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://{host_port}").ping()
    assert redis.Redis.from_url(redis_url).ping()


def _publish(redis_url: str, pod_id: str, secret: str | None) -> None:
    async def go():
        pub = PodPublisher(redis_url, PodInfo(pod_id, "decode", "http://10.0.0.1:8100", "m", "10.0.0.1:13337"),
                           lambda: {"running": 1}, lambda: ([], [], False), lambda: [], secret=secret)
        await pub.publish_once()
        await pub.stop(deregister=False)

    asyncio.run(go())


def _live(redis_url: str, secret: str | None) -> tuple[dict, dict]:
    async def go():
        index = KVIndex(redis_url, timeout_s=2, secret=secret)
        try:
            return await index.live_pods(), index.skipped
        finally:
            await index.close()

    return asyncio.run(go())


def test_only_records_signed_with_the_secret_count(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    _publish(redis_url, "signed", SECRET)
    _publish(redis_url, "unsigned", None)
    _publish(redis_url, "other-secret", "another")
    raw = json.loads(r.get(schema.pod_key("baton:", "signed")))
    assert raw["expires"] == pytest.approx(raw["ts"] + 3.0) and len(raw["sig"]) == 64
    # the signed record, re-pointed, expired (and re-signed: only the secret could), moved
    r.set(schema.pod_key("baton:", "repointed"), json.dumps({**raw, "pod_id": "repointed", "url": "http://evil"}))
    old = {k: v for k, v in raw.items() if k != "sig"} | {"pod_id": "old", "expires": time.time() - 60}
    r.set(schema.pod_key("baton:", "old"), json.dumps({**old, "sig": internal_auth.sign_record(SECRET, old)}))
    r.set(schema.pod_key("baton:", "moved"), json.dumps(raw))
    r.sadd("baton:pods", "repointed", "old", "moved")
    pods, skipped = _live(redis_url, SECRET)
    assert list(pods) == ["signed"] and pods["signed"].url == "http://10.0.0.1:8100"
    assert pods["signed"].ucx_address == "10.0.0.1:13337"
    assert skipped == {"unsigned": "unsigned", "other-secret": "bad signature", "repointed": "bad signature",
                       "old": "expired", "moved": "record names pod 'signed'"}
    # without a secret (--insecure-internal) nothing can be verified: every well-formed record counts
    assert set(_live(redis_url, None)[0]) == {"signed", "unsigned", "other-secret", "repointed", "old"}


@pytest.mark.parametrize("bad", ["[1,2]", "null", "{", '{"pod_id": "bad"}', '{"pod_id": "bad", "role": "decode", '
                                 '"url": "u", "model": "m", "running": "lots"}', "\xff"])
def test_a_malformed_record_is_skipped_and_logged_once(redis_url, bad, caplog):
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    _publish(redis_url, "good", None)
    r.set(schema.pod_key("baton:", "bad"), bad)
    r.sadd("baton:pods", "bad")

    async def go():
        index = KVIndex(redis_url, timeout_s=2)
        try:
            return [list((await index.live_pods())) for _ in range(3)]
        finally:
            await index.close()

    with caplog.at_level(logging.WARNING, logger="baton.kvindex.index"):
        assert asyncio.run(go()) == [["good"]] * 3
    assert [m for m in caplog.messages if "'bad'" in m] == [caplog.messages[0]] and len(caplog.messages) == 1


def test_pods_call_only_verified_peers(redis_url):
    """A decode pod's prefill.url and a prefill pod's ucx_address must be a verified pod's."""
    from baton.pod.peers import Peers

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    _publish(redis_url, "signed", SECRET)  # a decode pod at http://10.0.0.1:8100, UCX 10.0.0.1:13337
    _publish(redis_url, "unsigned", None)

    async def go():
        peers = Peers(redis_url, SECRET, static_urls=["http://static:8200/"])
        open_ = Peers(redis_url, "")  # --insecure-internal: nothing to verify with
        try:
            return [await peers.url_allowed("http://10.0.0.1:8100", "decode"),
                    await peers.url_allowed("http://10.0.0.1:8100/", "decode"),
                    await peers.url_allowed("http://10.0.0.1:8100", "prefill"),  # not its role
                    await peers.url_allowed("http://static:8200", "prefill"),
                    await peers.url_allowed("http://evil:1", "prefill"),
                    await peers.ucx_allowed("10.0.0.1:13337"),
                    await peers.ucx_allowed("evil:13337"),
                    await open_.url_allowed("http://evil:1", "prefill")], peers.refused
        finally:
            await peers.close()
            await open_.close()

    assert asyncio.run(go()) == ([True, True, False, True, False, True, False, True], 3)
