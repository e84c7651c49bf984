"""The one function that turns a prompt's tokens into its chain of KV-block hashes.

Router and engine both call `block_hashes`; nothing else may compute block hashes.

Encoding (fixed, versioned by SEED_TAG):
    seed      = blake2b(SEED_TAG + model_id, digest_size=16)
    h[i]      = blake2b(h[i-1] + tokens of block i as little-endian uint32, digest_size=16)
blake2b is in the standard library (no extra dependency) and 128 bits make an accidental
collision, which would silently serve another prompt's KV, practically impossible.
Only full blocks are hashed. A request with a cache salt starts its chain from
salted_seed(seed, salt) instead: its blocks never match another salt's.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SEED_TAG = b"baton-kv-v1\x00"
DIGEST_SIZE = 16

BlockHash = bytes


def model_seed(model_id: str) -> BlockHash:
    """h[-1]: distinct per model identity, so two models never share index entries."""
    return hashlib.blake2b(SEED_TAG + model_id.encode(), digest_size=DIGEST_SIZE).digest()


def salted_seed(seed: BlockHash, salt: str | None) -> BlockHash:
    """The chain's seed for requests with this cache salt (vLLM's cache_salt): a salted
    prompt's every block hash differs from the unsalted one's and from other salts'."""
    if not salt:
        return seed
    return hashlib.blake2b(seed + b"salt\x00" + salt.encode("utf-8", "surrogatepass"), digest_size=DIGEST_SIZE).digest()


def block_hashes(
    token_ids: list[int], block_size: int, seed: BlockHash, start: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids`, from block index `start` on.

    `parent` is h[start-1] when `start > 0` (so a growing sequence extends its chain
    without rehashing), else the seed.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start > 0 and parent is None:
        raise ValueError("parent hash is required when start > 0")
    prev = seed if start == 0 else parent
    out: list[BlockHash] = []
    for i in range(start, len(token_ids) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        prev = hashlib.blake2b(
            prev + struct.pack(f"<{block_size}I", *block), digest_size=DIGEST_SIZE
        ).digest()
        out.append(prev)
    return out


def model_identity(model_dir: str | Path) -> str:
    """A model's identity for hashing: its architecture config and weight files.

    Two directories holding the same checkpoint agree; a different checkpoint (other
    config, other weight files) gets another identity. Read from files only, so the
    torch-free router and the engine compute the same value.
    """
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    keep = {k: v for k, v in sorted(config.items()) if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.blake2b(json.dumps(keep, sort_keys=True).encode(), digest_size=DIGEST_SIZE)
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()
