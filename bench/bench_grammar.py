"""Structured outputs' cost per decode step: a batch whose every row is held to a JSON schema
(xgrammar matcher per row, the bitmask filled on the host while the device runs the forward,
applied in the sampler) against the same batch unconstrained. Target: <= 5% slower.

Headline: what users send, no temperature (the API's default, T = 1.0). Extra rows: greedy;
and "outside graph", an unconstrained batch whose every row carries a no-op logit_bias
({0: 0.0}), which samples outside the decode CUDA graph as grammar rows do: the difference
to "free" is the cost of sampling outside the graph, the rest is the grammar's own. Host
columns: per step, the time the engine thread spent in the grammar's bitmask (syncing the
matchers with the last tokens and filling what the grammar worker did not), and in xgrammar's
fill alone, on either thread (under async scheduling most rows are filled by the engine's
grammar worker while the engine thread schedules the next step).

GPU: Qwen3-8B shapes (random weights, bench/configs/qwen3-8b), batch 64 x context 1024 (and
8, 256 beside it); the grammar's tokenizer is --tokenizer's tokenizer.json (default: the
pip-shipped SmolLM2's, 49k tokens; ids past it are padding the bitmask never allows).
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
JSON_SCHEMA = {"type": "json_schema", "schema": SCHEMA, "strict": True}


def variants(temperature: float | None) -> dict[str, SamplingParams]:
    """free / outside graph / json_schema at one temperature (None: the default, 1.0)."""
    t = {} if temperature is None else {"temperature": temperature}
    return {
        "free": SamplingParams(max_tokens=4096, ignore_eos=True, **t),
        "outside_graph": SamplingParams(max_tokens=4096, ignore_eos=True, logit_bias={0: 0.0}, **t),
        "json_schema": SamplingParams(max_tokens=4096, ignore_eos=True, structured_output=JSON_SCHEMA, **t),
    }


class HostTimer:
    """Seconds the engine thread spends in LLMEngine._bitmask and Grammars.fill (wrapped here,
    in the bench only)."""

    def __init__(self, engine: LLMEngine):
        self.bitmask = self.fill = 0.0
        bitmask, fill = engine._bitmask, engine.grammars.fill

        def timed_bitmask(*a):
            t = time.perf_counter()
            try:
                return bitmask(*a)
            finally:
                self.bitmask += time.perf_counter() - t

        def timed_fill(*a):
            t = time.perf_counter()
            try:
                return fill(*a)
            finally:
                self.fill += time.perf_counter() - t

        engine._bitmask, engine.grammars.fill = timed_bitmask, timed_fill

    def reset(self) -> None:
        self.bitmask = self.fill = 0.0


def sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def fill_probe(engine: LLMEngine) -> dict:
    """xgrammar's fill on the running rows' live matchers, timed apart from the engine: one
    matcher after another, and batched on 1..8 threads and on xgrammar's own default; plus
    the start of one row's output, to see what states the rows are in."""
    from tokenizers import Tokenizer
    import xgrammar as xgr

    from baton.engine.grammar import bitmask_words

    engine._join_grammar_job()  # the engine's grammar worker may still be on these matchers
    seqs = [q for q in engine.scheduler.running if q.grammar is not None]
    states = [q.grammar for q in seqs]
    mask = torch.full((len(states), bitmask_words(engine.model_cfg.vocab_size)), -1, dtype=torch.int32)
    rows = list(range(len(states)))

    def best(f, reps=5) -> float:
        f()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return round(min(times) * 1e3, 3)

    out = dict(rows=len(states), cpus=os.cpu_count(), affinity=len(os.sched_getaffinity(0)),
               serial_ms=best(lambda: [g.fill(mask, i) for i, g in enumerate(states)]))
    for threads in (1, 2, 4, 8, 12, 14, "auto"):
        bm = xgr.BatchGrammarMatcher(threads)
        out[f"batch_{threads}_ms"] = best(lambda: bm.batch_fill_next_token_bitmask([g.matcher for g in states], mask, rows))
    per_row = []
    for i, g in enumerate(states):
        t = time.perf_counter()
        g.fill(mask, i)
        per_row.append((time.perf_counter() - t) * 1e3)
    out["row_ms_max"] = round(max(per_row), 3)
    out["row_ms_median"] = round(sorted(per_row)[len(per_row) // 2], 3)
    tok = Tokenizer.from_file(str(Path(engine.model_dir) / "tokenizer.json"))
    q = seqs[0]
    out["sample_output"] = tok.decode([t for t in q.token_ids[q.num_prompt_tokens:][:60] if t >= 0])[:300]
    return out


def step_time(engine: LLMEngine, batch: int, ctx: int, params: SamplingParams, steps: int, warmup: int = 3,
              timer: HostTimer | None = None, probe: list | None = None) -> float:
    """Seconds per engine step of `batch` requests of `ctx` prompt tokens, all decoding."""
    inject(engine, batch, ctx, params)
    for _ in range(warmup):
        engine.step()
    sync(engine)
    if timer is not None:
        timer.reset()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine)
    dt = (time.perf_counter() - t) / steps
    if probe is not None and params.structured_output is not None:
        probe.append(fill_probe(engine))
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
        timer = HostTimer(engine)
        rows = []
        for temperature, name in ((None, "default T (1.0)"), (0.0, "greedy")):
            v = variants(temperature)
            for batch, ctx in points:
                probe = []
                ms = {k: step_time(engine, batch, ctx, p, steps, timer=timer, probe=probe) * 1e3 for k, p in v.items()}
                row = dict(sampling=name, batch=batch, ctx=ctx, **{f"{k}_ms": round(x, 3) for k, x in ms.items()},
                           slower=round(ms["json_schema"] / ms["free"] - 1, 4),
                           slower_than_outside_graph=round(ms["json_schema"] / ms["outside_graph"] - 1, 4),
                           # the json_schema run was the last one timed: the timer holds its steps
                           host_bitmask_ms=round(timer.bitmask / steps * 1e3, 3),
                           host_fill_ms=round(timer.fill / steps * 1e3, 3), fill_probe=probe[0])
                rows.append(row)
                print("grammar", row, flush=True)
        print(f"\n{'sampling':16} {'batch':>5} {'free ms':>8} {'outside':>8} {'schema':>8} {'slower':>7} "
              f"{'host mask':>9} {'fill':>6}")
        for r in rows:
            print(f"{r['sampling']:16} {r['batch']:5} {r['free_ms']:8.2f} {r['outside_graph_ms']:8.2f} "
                  f"{r['json_schema_ms']:8.2f} {r['slower']:+7.1%} {r['host_bitmask_ms']:9.2f} {r['host_fill_ms']:6.2f}")
    result = dict(device=str(engine.device), model="tiny" if args.quick else "qwen3-8b shapes", rows=rows)
    out = os.environ.get("OUT")
    if out:
        Path(out, "grammar.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
