"""The results file (JSON) and the table printed at the end of a run.

Schema `baton.bench/1`:
    {"schema": "baton.bench/1", "label": str, "created": ISO-8601 UTC time,
     "config": {every CLI setting of the run: base_url, endpoint, model, workload, lengths, ...},
     "points": [{"mode": "rate"|"concurrency", "value": float (rate inf as the string "inf"),
                 "seed": int, "planned_requests": int,
                 "summary": metrics.summarize(...),
                 "requests": [RequestRecord.to_dict(), ...]}, ...]}
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = "baton.bench/1"


def point_doc(mode: str, value: float, seed: int, planned: int, summary: dict, records: list) -> dict:
    return {"mode": mode, "value": "inf" if math.isinf(value) else value, "seed": seed,
            "planned_requests": planned, "summary": summary, "requests": [r.to_dict() for r in records]}


def results_doc(label: str, config: dict, points: list[dict]) -> dict:
    return {"schema": SCHEMA, "label": label,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": config, "points": points}


def point_value(point: dict) -> float:
    return math.inf if point["value"] == "inf" else float(point["value"])


def save(doc: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def load(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a baton bench results file (schema {doc.get('schema')!r})")
    return doc


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# Every number's unit in its header: a load is a request rate (req/s) or a concurrency (conc).
COLUMNS = ("label", "load", "ok/err", "req/s", "out tok/s", "tot tok/s", "TTFT p50 ms", "TTFT p99 ms",
           "TPOT p50 ms", "TPOT p99 ms", "ITL p50 ms", "ITL p99 ms", "E2E p50 ms", "E2E p99 ms", "hit %",
           "goodput req/s")


def table(docs: list[dict]) -> str:
    """One row per sweep point of every document."""
    rows = []
    for doc in docs:
        for p in doc["points"]:
            s = p["summary"]
            load = f"rate {p['value']:g} req/s" if p["mode"] == "rate" and p["value"] != "inf" \
                else "rate inf" if p["mode"] == "rate" else f"conc {p['value']:g}"
            hit = s["prefix_cache_hit_rate"]
            rows.append((doc["label"], load, f"{s['completed']}/{s['errors']}",
                         _f(s["request_throughput"], 2), _f(s["output_throughput"]),
                         _f(s["total_token_throughput"]),
                         _f(s["ttft_ms"]["p50"]), _f(s["ttft_ms"]["p99"]),
                         _f(s["tpot_ms"]["p50"]), _f(s["tpot_ms"]["p99"]),
                         _f(s["itl_ms"]["p50"]), _f(s["itl_ms"]["p99"]),
                         _f(s["e2e_ms"]["p50"]), _f(s["e2e_ms"]["p99"]),
                         _f(None if hit is None else 100 * hit), _f(s["goodput"], 2)))
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(COLUMNS), *(line(r) for r in rows)])
