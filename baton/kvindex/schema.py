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
    P lookup:scratch  SET    LOOKUP's candidates while it runs (deleted before it returns)

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
  * LOOKUP, one round trip per request: for a prompt's hash chain, the number of leading
    blocks each live pod (heartbeat present) holds, and the records of those pods only.
    Dead pods' leftovers are never reported, purged or not;
  * REGISTRY, one round trip per router refresh: every live pod's record.

Sharding by pod (Redis Cluster; connection.py says how a URL names one): the index is split
into `shards` parts, each with the whole layout above under its own prefix `P{tag}`, e.g.
`baton:{s7.12}blk:H`. Redis hashes only the `{tag}` of a key, so each shard is one hash slot,
on one node, and every script call touches one slot. Pod p writes only to shard
shard_of(p): its heartbeat, its entry in the shard's pod set, its blk/podblk entries. Readers
run LOOKUP and REGISTRY on every shard at once and merge the answers (a pod is in one shard
only, so merging is a union). The tags are chosen so that shard k's slot falls in the k-th of
`shards` equal slices of the 16,384 slots, which spreads shards evenly over masters that own
equal slot ranges (what `redis-cli --cluster create` makes). One Redis (no cluster) has one
shard whose prefix is P itself: the layout above, unchanged. Scripts name keys from ARGV[1]
(the shard's prefix); KEYS[1], the shard's pod set, only tells a cluster client which node to
send the call to (every key a script touches shares its hash tag).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from baton import internal_auth

DEFAULT_PREFIX = "baton:"
ROLES = ("prefill", "decode", "colocated")


def shard_prefixes(prefix: str, shards: int | None) -> list[str]:
    """Each shard's key prefix: [prefix] for one Redis (None), else prefix + "{tag}" per shard."""
    if shards is None:
        return [prefix]
    return [f"{prefix}{{{_tag(k, shards)}}}" for k in range(shards)]


def _tag(k: int, shards: int) -> str:
    # the first of s{k}.0, s{k}.1, ... whose slot lies in the k-th equal slice of the slots
    lo, hi = k * REDIS_CLUSTER_HASH_SLOTS // shards, (k + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    n = 0
    while not lo <= key_slot(f"s{k}.{n}".encode()) < hi:
        n += 1
    return f"s{k}.{n}"


def shard_of(pod_id: str, shards: int) -> int:
    """The shard a pod writes to: a hash of its id (the same in every process, unlike hash())."""
    digest = hashlib.blake2b(pod_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


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
        for name, kind in _FIELD_KINDS:  # records come from Redis, which anyone with access can write
            v = getattr(self, name)
            ok = isinstance(v, str) if kind == "str" else (
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                if kind == "float" else isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            if not ok:
                raise ValueError(f"{name} must be a {kind}, got {v!r}"[:200])
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
    def from_json(cls, text: str | bytes, secret: str | None = None) -> PodRecord:
        """The record in `text`; ValueError says why it is unusable (not a JSON object, a field
        of the wrong type, and with `secret`: a signature that does not verify). Whether a
        signed record has expired is the reader's check (internal_auth.expired), every read."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"not a JSON object: {str(raw)[:80]}")
        if secret:
            problem = internal_auth.check_record(secret, raw)
            if problem is not None:
                raise ValueError(problem)
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})  # newer pods may add fields
        except TypeError as e:  # a required field missing
            raise ValueError(str(e)) from None


_FIELD_KINDS = tuple((f.name, f.type) for f in fields(PodRecord))  # "str", "int" or "float"


# KEYS[1] of every script: the shard's pod set (routing only; see the top of this file).
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

# ARGV: prefix. Returns {id1, record1, id2, record2, ...}: every live pod (heartbeat present).
# The router's periodic refresh reads this (one call per refresh, not one per request).
# A Lua function both scripts below start with: of pod ids, the ones whose heartbeat record
# exists ({id, ...}) and {id1, record1, ...} (MGET in batches of 500: unpack's limit).
_LIVE = """
local function live(p, ids)
  local alive, recs = {}, {}
  for j = 1, #ids, 500 do
    local keys, part = {}, {}
    for k = j, math.min(j + 499, #ids) do
      part[#part + 1] = ids[k]
      keys[#keys + 1] = p .. 'pod:' .. ids[k]
    end
    local got = redis.call('MGET', unpack(keys))
    for k = 1, #part do
      if got[k] then
        alive[#alive + 1] = part[k]
        recs[#recs + 1] = part[k]
        recs[#recs + 1] = got[k]
      end
    end
  end
  return alive, recs
end
"""

REGISTRY = _LIVE + """
local p = ARGV[1]
local _, recs = live(p, redis.call('SMEMBERS', p .. 'pods'))
return recs
"""

# ARGV: prefix, then the prompt's chain of hex hashes in order.
# Returns {{id1, record1, ...} of the pods hit, {id, leading blocks held, ...}}: only live pods
# that hold the chain's first block, and their records (fresh loads of the pods whose load the
# prefix cost weighs most; the other pods' loads come from the router's periodic REGISTRY read).
# It once returned every live pod's record: 266 KB and ~14 ms of Redis time per lookup at 1,000
# pods before any block was read, and the router's time to read that reply on top.
# Liveness: the first block's holders whose heartbeat exists (one MGET, which also fetches
# their records). The candidates (live pods holding every block so far) live in a scratch set.
# One SINTERCARD (in C) asks whether all of them hold a whole span of blocks; spans double
# while they do and halve to find where a pod drops out, so a chain costs about log2(chain)
# calls per depth at which pods drop out, and Lua touches a pod only once (when its depth is
# known). Walking the chain with SMEMBERS in Lua, block by block, cost 150-400 ms of Redis time
# per 8k-token lookup with 1,000 pods holding a hot prefix (bench/bench_index.py; PERFORMANCE.md).
LOOKUP = _LIVE + """
local p = ARGV[1]
local tmp = p .. 'lookup:scratch'
local out = {}
if #ARGV < 2 then return {{}, out} end
local first, recs = live(p, redis.call('SMEMBERS', p .. 'blk:' .. ARGV[2]))
local n = #first
if n == 0 then return {recs, out} end
redis.call('DEL', tmp)
for j = 1, n, 500 do
  redis.call('SADD', tmp, unpack(first, j, math.min(j + 499, n)))
end
local i, step = 3, 1
while i <= #ARGV do
  -- do all candidates hold blocks i..j? one SINTERCARD; the span doubles while they do
  local j = math.min(i + step - 1, #ARGV)
  local keys = {tmp}
  for x = i, j do keys[#keys + 1] = p .. 'blk:' .. ARGV[x] end
  if redis.call('SINTERCARD', #keys, unpack(keys)) == n then
    i, step = j + 1, math.min(step * 2, 256)
  elseif step > 1 then
    step = math.floor(step / 2)  -- someone drops out within i..j: narrow down on it
  else
    local b = keys[2]
    for _, m in ipairs(redis.call('SDIFF', tmp, b)) do
      out[#out + 1] = m
      out[#out + 1] = i - 2
    end
    n = redis.call('SINTERSTORE', tmp, tmp, b)
    if n == 0 then break end
    i = i + 1
  end
end
if n > 0 then
  for _, m in ipairs(redis.call('SMEMBERS', tmp)) do
    out[#out + 1] = m
    out[#out + 1] = #ARGV - 1
  end
end
redis.call('DEL', tmp)
return {recs, out}
"""
