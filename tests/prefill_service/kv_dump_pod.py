"""A decode pod as `baton decode` makes it, plus one test-only route that reads back the KV
the pod holds for a prompt: `POST /test/prompt_kv {"prompt_token_ids": [...]}` answers the
float32 bytes of `[num_layers, 2, n, Hkv, D]` for the prompt's full blocks in this pod's
prefix cache (n = whole blocks of the prompt), shape in the `x-shape` header; 404 if a block
is not cached. Run: python tests/prefill_service/kv_dump_pod.py --role decode ... (pod flags).
"""

from __future__ import annotations

import sys

from fastapi import FastAPI
from fastapi.responses import Response


def read_prompt_kv(engine, tokens: list[int]):
    """On the engine thread: KV of tokens' full blocks, or None if one is not cached."""
    import torch

    from baton.kernels import ops
    from baton.kvindex.hashing import block_hashes

    bm, cache = engine.block_manager, engine.runner.kv_cache
    bs = bm.block_size
    blocks = [bm.hash_to_block.get(h) for h in block_hashes(tokens, bs, engine.seed)]
    if not blocks or None in blocks:
        return None
    slots = torch.tensor([b * bs + i for b in blocks for i in range(bs)], dtype=torch.int64)
    return torch.stack([ops.gather_kv(cache[layer], slots) for layer in range(cache.shape[0])])


def add_kv_route(app: FastAPI) -> None:
    @app.post("/test/prompt_kv")
    async def prompt_kv(body: dict):
        kv = await app.state.pod.loop.run(read_prompt_kv, body["prompt_token_ids"])
        if kv is None:
            return Response(status_code=404)
        return Response(kv.float().contiguous().numpy().tobytes(), media_type="application/octet-stream",
                        headers={"x-shape": ",".join(map(str, kv.shape))})


def main(argv: list[str]) -> None:
    from baton.decode_service.app import create_app
    from baton.decode_service.settings import DecodeSettings
    from baton.pod.http import serve
    from baton.settings import parse_settings

    settings = parse_settings(DecodeSettings, argv, "kv_dump_pod", __doc__.splitlines()[0])
    app = create_app(settings)
    add_kv_route(app)
    serve(app, settings)


if __name__ == "__main__":
    main(sys.argv[1:])
