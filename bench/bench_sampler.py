"""Times the batched sampler against a torch.sort-based one, per sampling mix and batch size.

    python bench/bench_sampler.py --out sampler.json                      # GPU (CUDA events)
    python bench/bench_sampler.py --device cpu --vocab 2000 --batch 8 --iters 2 --out /tmp/s.json

Rows: greedy; all sampled (T=1.0, top_p=0.95, what OpenAI clients send); top_k=50; min_p=0.1;
Qwen3's generation_config (T=0.6, top_k=20, top_p=0.95).
Logits are random normal times --scale: nearly flat, as random weights give, so top_p=0.95
keeps most of the vocabulary. `baton` is sample_batch (Triton on CUDA); `torch_sort` sorts
every row, masks top-k/top-p/min-p on the sorted values and draws by the exponential race;
`argmax` is the floor any sampler is measured against. SamplingTensors are built outside the
timed loop (host work the engine overlaps); their build time is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from baton.engine.sampler import SamplingTensors, sample_batch
from baton.engine.sampling_params import SamplingParams

MIXES = {
    "greedy": SamplingParams(temperature=0.0),
    "sampled T=1 top_p=0.95": SamplingParams(temperature=1.0, top_p=0.95),
    "top_k=50": SamplingParams(temperature=1.0, top_k=50),
    "min_p=0.1": SamplingParams(temperature=1.0, min_p=0.1),
    "T=0.6 top_k=20 top_p=0.95": SamplingParams(temperature=0.6, top_k=20, top_p=0.95),  # Qwen3's
}


def torch_sort_sample(logits: torch.Tensor, t: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                      mp: torch.Tensor) -> torch.Tensor:
    """The usual batched sampler: sort each row, cut on the sorted values, exponential race."""
    greedy = t < 1e-5
    s = logits.float() / torch.where(greedy, 1.0, t)[:, None]
    sv, order = torch.sort(s, dim=-1, descending=True)
    V = s.shape[-1]
    ranks = torch.arange(V, device=s.device)[None, :]
    drop = (k[:, None] > 0) & (ranks >= k[:, None])
    drop |= sv < sv[:, :1] + torch.log(mp.clamp_min(1e-30))[:, None]
    sv = sv.masked_fill(drop, float("-inf"))
    probs = sv.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p[:, None]
    probs = probs.masked_fill(drop, 0.0)
    q = torch.empty_like(probs).exponential_()
    pick = order.gather(1, (probs / q).argmax(-1, keepdim=True))[:, 0]
    return torch.where(greedy, s.argmax(-1), pick)


def timer(device: str, fn, warmup: int, iters: int) -> float:
    """Milliseconds per call."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--scale", type=float, default=1.0, help="logits = randn * scale")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", required=True, help="JSON results")
    args = ap.parse_args()
    dev, V = args.device, args.vocab
    gen = torch.Generator(device=dev).manual_seed(0)
    results = []
    for B in args.batch:
        logits = (torch.randn(B, V, device=dev, generator=gen) * args.scale).to(getattr(torch, args.dtype))
        argmax_ms = timer(dev, lambda: logits.argmax(-1), args.warmup, args.iters)
        for name, p in MIXES.items():
            t_build = time.perf_counter()
            st = SamplingTensors.build([p] * B, list(range(B)), [100] * B, dev)
            build_ms = (time.perf_counter() - t_build) * 1e3
            baton_ms = timer(dev, lambda: sample_batch(logits, st), args.warmup, args.iters)
            sort_ms = timer(dev, lambda: torch_sort_sample(logits, st.temperature, st.top_k, st.top_p, st.min_p),
                            args.warmup, args.iters)
            tokens = sample_batch(logits, st).tokens
            if p.greedy:
                assert torch.equal(tokens, logits.float().argmax(-1)), "greedy rows must be the argmax"
            results.append(dict(batch=B, vocab=V, mix=name, baton_ms=baton_ms, torch_sort_ms=sort_ms,
                                argmax_ms=argmax_ms, build_ms=build_ms,
                                distinct_tokens=len(set(tokens.tolist()))))
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"sampler, V={V}, {args.dtype} logits (randn x {args.scale}), {dev_name}")
    print(f"{'B':>4} {'mix':<27} {'baton ms':>9} {'sort ms':>9} {'argmax ms':>9} {'speedup':>8} {'build ms':>9}")
    for r in results:
        print(f"{r['batch']:>4} {r['mix']:<27} {r['baton_ms']:>9.3f} {r['torch_sort_ms']:>9.3f} "
              f"{r['argmax_ms']:>9.3f} {r['torch_sort_ms'] / r['baton_ms']:>7.2f}x {r['build_ms']:>9.3f}")
    with open(args.out, "w") as f:
        json.dump(dict(device=dev_name, dtype=args.dtype, scale=args.scale, results=results), f, indent=1)


if __name__ == "__main__":
    main()
