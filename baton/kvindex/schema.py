"""The Redis layout of the pod registry and the KV-block index, and the Lua scripts over it.

Keys (P = key prefix, default "baton:"; a hash H is written as 32 hex characters):

    P pods            SET    every pod id that registered and is not yet purged
    P pod:{id}        STRING the pod's heartbeat: a JSON PodRecord, SET with PX ttl and
                             refreshed every publish interval; gone = the pod is dead. With
                             a shared secret it is signed (`sig`, valid until `expires`:
                             baton/internal_auth.py); readers skip records that do not verify
    P blk:{H}         SET    ids of the pods that hold block H in their prefix cache
    P podblk:{id}     SET    the hashes pod {id} holds (the reverse map; lets a clear or a
                             purge find its entries without scanning the keyspace)

Writers:
  * each pod writes its own heartbeat and its own blk/podblk entries (PodPublisher): per
    publish tick one pipeline of APPLY calls (removed, then stored) plus the heartbeat;
    on start and after any Redis error it announces "cleared" (CLEAR until empty) and
    re-publishes every cached hash, because a Redis that restarted lost everything;
  * whoever notices a dead pod (the router's sweep; several routers may run it at once)
    purges it with CLEAR in dead-only mode: each chunk first checks that the heartbeat is
    still gone (a pod that came back owns its entries again) and the last chunk removes
    the id from P pods. Every step is idempotent, so racing purgers are harmless.
Readers:
  * LOOKUP, one round trip per request: the live pods' records (those whose heartbeat
    exists) and, for a prompt's hash chain, the number of leading blocks each live pod
    holds. Dead pods' leftovers are never reported, purged or not.

Scripts build key names from ARGV, so this layout assumes a single Redis (or a primary
with replicas), not Redis Cluster.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace

from baton import internal_auth

DEFAULT_PREFIX = "baton:"
ROLES = ("prefill", "decode", "colocated")


def pods_key(prefix: str) -> str:
    return prefix + "pods"


def pod_key(prefix: str, pod_id: str) -> str:
    return f"{prefix}pod:{pod_id}"


def podblk_key(prefix: str, pod_id: str) -> str:
    return f"{prefix}podblk:{pod_id}"


def blk_key(prefix: str, block_hash: bytes) -> str:
    return f"{prefix}blk:{block_hash.hex()}"


@dataclass
class PodRecord:
    """What a heartbeat carries: who the pod is and how loaded it is right now."""

    pod_id: str
    role: str  # prefill | decode | colocated
    url: str  # the pod's HTTP base URL (internal API)
    model: str  # the served model name
    ucx_address: str = ""
    block_size: int = 16  # tokens per KV block: routers hash prompts with the pod's own
    max_model_len: int = 0  # longest sequence the pod takes (prompt + output); 0: unknown
    running: int = 0
    waiting: int = 0
    waiting_prefill_tokens: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    cached_blocks: int = 0
    ts: float = 0.0  # the pod's clock when it wrote the record (for logs, not liveness)
    expires: float = 0.0  # the pod's clock: ts + heartbeat TTL (bounds a replayed record)
    sig: str = ""  # HMAC of every other field with the shared secret; "": unsigned

    def __post_init__(self) -> None:
        for f in fields(self):  # records come from Redis, which anyone with access can write
            v = getattr(self, f.name)
            ok = isinstance(v, str) if f.type == "str" else (
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                if f.type == "float" else isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            if not ok:
                raise ValueError(f"{f.name} must be a {f.type}, got {v!r}"[:200])
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def signed(self, secret: str) -> PodRecord:
        """This record with its signature (over every field but sig; expires set by the caller)."""
        fields_ = asdict(self)
        fields_.pop("sig")
        return replace(self, sig=internal_auth.sign_record(secret, fields_))

    @classmethod
    def from_json(cls, text: str | bytes, secret: str | None = None, now: float = 0.0) -> PodRecord:
        """The record in `text`; ValueError says why it is unusable (not a JSON object, a field
        of the wrong type, and with `secret`: a signature that does not verify, or expired)."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"not a JSON object: {str(raw)[:80]}")
        if secret:
            problem = internal_auth.check_record(secret, raw, now)
            if problem is not None:
                raise ValueError(problem)
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})  # newer pods may add fields
        except TypeError as e:  # a required field missing
            raise ValueError(str(e)) from None


# ARGV: prefix, pod id, number of removed hashes R, R removed hex hashes, then stored ones.
# Removed first: a block evicted and cached again within one batch ends up present.
APPLY = """
local p, id, nrem = ARGV[1], ARGV[2], tonumber(ARGV[3])
local pb = p .. 'podblk:' .. id
for i = 4, 3 + nrem do
  redis.call('SREM', p .. 'blk:' .. ARGV[i], id)
  redis.call('SREM', pb, ARGV[i])
end
for i = 4 + nrem, #ARGV do
  redis.call('SADD', p .. 'blk:' .. ARGV[i], id)
  redis.call('SADD', pb, ARGV[i])
end
return #ARGV - 3
"""

# ARGV: prefix, pod id, chunk size, dead_only ("1": purge a dead pod, "0": the pod clears itself).
# Returns how many hashes are left, or -1 when dead_only and the pod's heartbeat exists.
CLEAR = """
local p, id, n, dead = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
if dead and redis.call('EXISTS', p .. 'pod:' .. id) == 1 then return -1 end
local pb = p .. 'podblk:' .. id
local hs = redis.call('SPOP', pb, n)
for _, h in ipairs(hs) do redis.call('SREM', p .. 'blk:' .. h, id) end
local left = redis.call('SCARD', pb)
if left == 0 and dead then redis.call('SREM', p .. 'pods', id) end
return left
"""

# ARGV: prefix, then the prompt's chain of hex hashes in order.
# Returns {{id1, record1, id2, record2, ...} of live pods, {id, leading blocks held, ...}}.
LOOKUP = """
local p = ARGV[1]
local recs, cand, ncand = {}, {}, 0
for _, id in ipairs(redis.call('SMEMBERS', p .. 'pods')) do
  local rec = redis.call('GET', p .. 'pod:' .. id)
  if rec then
    recs[#recs + 1] = id
    recs[#recs + 1] = rec
    cand[id] = true
    ncand = ncand + 1
  end
end
local hits = {}
for i = 2, #ARGV do
  if ncand == 0 then break end
  local nxt, n = {}, 0
  for _, m in ipairs(redis.call('SMEMBERS', p .. 'blk:' .. ARGV[i])) do
    if cand[m] then
      nxt[m] = true
      n = n + 1
      hits[m] = i - 1
    end
  end
  cand, ncand = nxt, n
end
local out = {}
for id, k in pairs(hits) do
  out[#out + 1] = id
  out[#out + 1] = k
end
return {recs, out}
"""
