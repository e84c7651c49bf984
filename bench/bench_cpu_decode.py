"""CPU decode speed of SmolLM2 at batch 1 and 16: Baton's engine beside transformers' generate.

Run: python bench/bench_cpu_decode.py [--tokens 64] [--threads N]
Both sides: float32, greedy, the same prompts, prompt tokens excluded from the rate
(decode tokens / decode time, after a prefill timed separately).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, 49000, (length,), generator=g).tolist() for _ in range(n)]


def baton_rate(model_dir: str, batch: int, tokens: int, length: int) -> float:
    from baton import LLM, SamplingParams

    llm = LLM(model_dir, enable_prefix_caching=False)
    ps = prompts(batch, length)
    llm.generate(ps, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    llm.generate(ps, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(ps, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    return batch * (tokens - 1) / (time.perf_counter() - t - prefill)


def hf_rate(model_dir: str, batch: int, tokens: int, length: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts(batch, length))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, **kw)
    return batch * (tokens - 1) / (time.perf_counter() - t - prefill)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from baton.modelzoo.smollm2 import get_model

        args.model = str(get_model("smollm2"))
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        ours = baton_rate(args.model, b, args.tokens, args.prompt_len)
        theirs = hf_rate(args.model, b, args.tokens, args.prompt_len)
        rows.append(dict(batch=b, baton_tok_s=round(ours, 1), transformers_tok_s=round(theirs, 1),
                         ratio=round(ours / theirs, 2)))
    print(json.dumps(rows))
    print(f"\n{'batch':>5} {'baton tok/s':>12} {'transformers tok/s':>19} {'ratio':>6}   (threads {torch.get_num_threads()})")
    for r in rows:
        print(f"{r['batch']:>5} {r['baton_tok_s']:>12} {r['transformers_tok_s']:>19} {r['ratio']:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
