"""Structured outputs' cost per decode step: a batch whose every row is held to a JSON schema
(xgrammar matcher per row, the bitmask filled on the host while the device runs the forward,
applied in the sampler) against the same batch unconstrained. Target: <= 5% slower.

GPU: Qwen3-8B shapes (random weights, bench/configs/qwen3-8b), batch 64 x context 1024 (and
8, 256 beside it), greedy; the grammar's tokenizer is --tokenizer's tokenizer.json (default:
the pip-shipped SmolLM2's, 49k tokens; ids past it are padding the bitmask never allows).
--quick: a tiny random model on whatever device there is (CPU too), to check that it runs.
Run: python bench/bench_grammar.py [--quick]; JSON goes to $OUT/grammar.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from bench.bench_engine import inject

CONFIGS = Path(__file__).with_name("configs")
# it cannot end within the timed steps (50 items at least): every row stays in the batch
SCHEMA = {
    "type": "array",
    "items": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]},
    "minItems": 50,
}
FREE = SamplingParams(max_tokens=4096, temperature=0, ignore_eos=True)
CONSTRAINED = SamplingParams(max_tokens=4096, temperature=0, ignore_eos=True,
                             structured_output={"type": "json_schema", "schema": SCHEMA, "strict": True})


def sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def step_time(engine: LLMEngine, batch: int, ctx: int, params: SamplingParams, steps: int, warmup: int = 3) -> float:
    """Seconds per engine step of `batch` requests of `ctx` prompt tokens, all decoding."""
    inject(engine, batch, ctx, params)
    for _ in range(warmup):
        engine.step()
    sync(engine)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine)
    dt = (time.perf_counter() - t) / steps
    running = len(engine.scheduler.running)
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    assert running == batch, f"{batch - running} rows ended during the timed steps"
    return dt


def model_dir(quick: bool, tokenizer: str | None, tmp: Path) -> Path:
    if quick:
        from baton.modelzoo.tiny import make_tiny_model

        return make_tiny_model(tmp / "tiny")
    if tokenizer is None:
        from baton.modelzoo.smollm2 import get_model

        tokenizer = get_model("smollm2")
    d = tmp / "qwen3-8b"
    shutil.copytree(CONFIGS / "qwen3-8b", d)
    shutil.copy(Path(tokenizer) / "tokenizer.json", d / "tokenizer.json")
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokenizer", help="a model directory whose tokenizer.json the grammars use")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = model_dir(args.quick, args.tokenizer, Path(tmp))
        points = [(8, 64)] if args.quick else [(8, 1024), (64, 1024), (256, 1024)]
        steps = 5 if args.quick else 30
        engine = LLMEngine(d, EngineConfig(
            load_format="random" if not args.quick else "safetensors", max_num_seqs=max(b for b, _ in points),
            max_model_len=max(c for _, c in points) + 256, enable_prefix_caching=False))
        rows = []
        for batch, ctx in points:
            free = step_time(engine, batch, ctx, FREE, steps)
            constrained = step_time(engine, batch, ctx, CONSTRAINED, steps)
            rows.append(dict(batch=batch, ctx=ctx, free_ms=round(free * 1e3, 3),
                             json_schema_ms=round(constrained * 1e3, 3), slower=round(constrained / free - 1, 4)))
            print("grammar", rows[-1], flush=True)
    result = dict(device=str(engine.device), model="tiny" if args.quick else "qwen3-8b shapes", rows=rows)
    out = os.environ.get("OUT")
    if out:
        Path(out, "grammar.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
