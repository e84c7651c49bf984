"""The offline engine on exactly the requests a serving run sends (issue 23's yardstick).

bench_serving.py's `served` mode writes the requests (token ids, output length) to a JSON file
and runs this in its own process (its GPU memory is gone before the pod starts). The engine gets
the pod's own options (random weights, the same --num-kv-blocks, everything else default) and the
same load shape: at most `--concurrency` requests in flight, a new one added as one finishes
(all at once would let the offline engine run larger batches than the server ever sees). Each
run has its own requests, as the served runs do (a second run of the same prompts would find
them in the prefix cache). Per request it records the time from add_request to the
first token: the engine's own queueing and prefill time, beside which the served TTFT stands.

    python bench/offline_requests.py --model DIR --runs runs.json --concurrency 128 \
        --num-kv-blocks 20000 --out offline.json
where runs.json is [{"label": ..., "temperature": null (none sent) or a number,
"requests": [[prompt ids, max_tokens], ...], "timed": true|false}, ...] in order (untimed runs
warm up: kernels compiled, shapes seen).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import engine_options  # bench/, this script's directory
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.sampling_params import SamplingParams


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run(engine: LLMEngine, reqs: list[tuple[list[int], int]], temperature: float | None, concurrency: int,
        device: str, tag: str) -> dict:
    """Feed reqs keeping `concurrency` in flight; output tok/s and per-request time to first token."""
    params = {} if temperature is None else {"temperature": temperature}
    pending = list(enumerate(reqs))[::-1]
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    live = 0
    produced = 0
    sync(device)
    t0 = time.perf_counter()

    def top_up() -> None:
        nonlocal live
        while pending and live < concurrency:
            i, (prompt, out) = pending.pop()
            rid = f"{tag}{i}"
            engine.add_request(rid, list(prompt), SamplingParams(max_tokens=out, ignore_eos=True, **params))
            added[rid] = time.perf_counter()
            live += 1

    top_up()
    while engine.has_unfinished_requests():
        for o in engine.step():
            now = time.perf_counter()
            produced += len(o.new_token_ids)
            first.setdefault(o.request_id, now)
            if o.finish_reason is not None:
                live -= 1
        top_up()
    sync(device)
    dt = time.perf_counter() - t0
    ttft = sorted(1000 * (first[r] - added[r]) for r in first)
    return {"output_tokens": produced, "seconds": round(dt, 3), "out_tok_s": round(produced / dt, 1),
            "ttft_p50_ms": round(statistics.median(ttft), 1) if ttft else None,
            "ttft_p99_ms": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1) if ttft else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--runs", required=True, help="JSON file of the runs (see above)")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engine-options", default=None, help="NAME=VALUE,... (bench/engine_options.py)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    runs = json.loads(Path(a.runs).read_text())
    engine = LLMEngine(a.model, EngineConfig(load_format="random", device=a.device, num_kv_blocks=a.num_kv_blocks,
                                             **engine_options.parse(a.engine_options)))
    doc: dict = {"concurrency": a.concurrency, "runs": {}}
    for r in runs:
        reqs = [(list(x), int(n)) for x, n in r["requests"]]
        res = run(engine, reqs, r["temperature"], a.concurrency, a.device, r["label"] + "-")
        if r.get("timed", True):
            doc["runs"][r["label"]] = res | {"requests": len(reqs)}
        print(r["label"], res, flush=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
