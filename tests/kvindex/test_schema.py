"""The heartbeat record: what a pod publishes about itself, read back as the router reads it."""

from __future__ import annotations

import json

from baton.kvindex.publisher import PodInfo, PodPublisher
from baton.kvindex.schema import PodRecord


def test_record_carries_block_size_and_max_model_len():
    rec = PodRecord(pod_id="p", role="decode", url="http://p", model="m", block_size=32, max_model_len=8192)
    back = PodRecord.from_json(rec.to_json())
    assert back == rec and (back.block_size, back.max_model_len) == (32, 8192)


def test_a_record_without_max_model_len_reads_as_unknown():
    old = {"pod_id": "p", "role": "colocated", "url": "http://p", "model": "m", "block_size": 16,
           "running": 2, "a_newer_field": 1}
    assert PodRecord.from_json(json.dumps(old)).max_model_len == 0


def test_publisher_heartbeat_has_what_the_pod_takes():
    info = PodInfo(pod_id="p", role="colocated", url="http://p", model="m", block_size=8, max_model_len=1024)
    pub = PodPublisher("redis://127.0.0.1:9/0", info, lambda: {"running": 3}, lambda: ([], [], False), list)
    rec = PodRecord.from_json(pub._record())
    assert (rec.block_size, rec.max_model_len, rec.running) == (8, 1024, 3)
