"""Per-request records and the summary of one sweep point: percentiles, throughputs, goodput.

Definitions (vLLM's `benchmark_serving` and DistServe's):
- TTFT: send -> first chunk carrying output text. ITL: gaps between consecutive such chunks.
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined for a one-token answer.
- Output tokens come from the final `usage` chunk; a server that sends none is counted by
  content chunks instead (`usage_missing` says so).
- Goodput: requests per second that meet every SLO given (TTFT <= slo_ttft_ms and
  TPOT <= slo_tpot_ms; a request without a TPOT meets the TPOT SLO). None without an SLO.
- Throughputs divide by the point's wall time: first send to last answer.
- Prefix-cache hit rate: cached prompt tokens / prompt tokens, over successful requests.
Latencies in records are seconds (`*_s`), in summaries milliseconds (`*_ms`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    session: int
    turn: int
    start_s: float = 0.0  # send time, seconds after the point began
    tenant: int | None = None
    turn_input_tokens: int = 0  # the workload's draw for this turn's new input (no system prompt, history)
    max_tokens: int = 0
    ok: bool = False
    status: int | None = None  # HTTP status; None when no response came (timeout, refused)
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    usage_missing: bool = False

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or not self.output_tokens:
            return None
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"tpot_s": self.tpot_s}

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        return cls(**{k: v for k, v in d.items() if k != "tpot_s"})


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values_s: list[float]) -> dict:
    """mean and percentiles, in milliseconds (None for no values)."""
    out: dict = {"mean": sum(values_s) * 1000.0 / len(values_s) if values_s else None}
    for q in PERCENTILES:
        p = percentile(values_s, q)
        out[f"p{q}"] = None if p is None else p * 1000.0
    return out


def meets_slo(r: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not r.ok:
        return False
    if slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000.0 > slo_ttft_ms):
        return False
    tpot = r.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1000.0 <= slo_tpot_ms


def summarize(records: list[RequestRecord], duration_s: float,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    ok = [r for r in records if r.ok]
    errors = [r for r in records if not r.ok]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    output = sum(r.output_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    has_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in records)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(errors),
        "error_statuses": {str(k): v for k, v in sorted(Counter(
            "none" if r.status is None else r.status for r in errors).items(), key=str)},
        "duration_s": duration_s,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "cached_tokens": cached,
        "prefix_cache_hit_rate": cached / prompt if prompt else None,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output),
        "total_token_throughput": per_s(prompt + output),
        "goodput": per_s(good) if has_slo else None,
        "slo_attainment": good / len(records) if has_slo and records else None,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "usage_missing": sum(r.usage_missing for r in ok),
        "ttft_ms": stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
