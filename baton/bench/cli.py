"""`baton bench`: flags -> workload -> sweep points -> JSON, plots and a table; `compare` for files."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys

from baton.bench import workloads as wl
from baton.gc_pauses import freeze_startup
from baton.settings import DefaultsHelpFormatter

_EXAMPLES = """examples:
  baton bench --base-url http://127.0.0.1:8000 --workload shared-prefix --tenants 8 \\
      --request-rate 1,2,4,8 --num-requests 200 --slo-ttft-ms 500 --slo-tpot-ms 50 \\
      --label prefix-aware --out prefix.json --plot plots/prefix
  baton bench --workload random --input-len 128:1024 --output-len 64:256 --concurrency 1,8,32
  baton bench compare prefix.json round-robin.json --plot plots/compare
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench", epilog=_EXAMPLES,
                                description="Load-test an OpenAI-compatible endpoint (streaming). "
                                            "Reads no environment variables: flags only.",
                                formatter_class=DefaultsHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    t.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/v1/chat/completions or /v1/completions (default: chat)")
    t.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    t.add_argument("--api-key", default=None, help="sent as a Bearer token (never written to --out)")
    t.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="HF model dir: exact prompt token counts "
                        "(token-id prompts with --endpoint completions)")
    t.add_argument("--temperature", type=float, default=None,
                   help="sent with every request (default: none sent, so the server's default "
                        "applies, as for most users' requests; 0: greedy)")
    t.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (for servers that reject it; answers may end early)")
    t.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                   help="fields merged into every request body")
    t.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    t.add_argument("--http-client", choices=("asyncio", "httpx"), default="asyncio",
                   help="the load generator's HTTP client for http:// URLs: asyncio (ours, ~3.5x less CPU "
                        "per streamed token) or httpx (https:// always uses httpx)")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=wl.WORKLOADS, default="random", help="what the requests look like")
    w.add_argument("--num-requests", type=int, default=200, help="requests per sweep point")
    w.add_argument("--seed", type=int, default=0, help="point i draws prompts and arrivals with seed+i")
    w.add_argument("--input-len", default="256", metavar="N|LO:HI",
                   help="prompt tokens (random) or new user tokens per turn (multi-turn)")
    w.add_argument("--output-len", default="128", metavar="N|LO:HI",
                   help="max_tokens (random, shared-prefix, multi-turn)")
    w.add_argument("--tenants", type=int, default=8, help="shared-prefix: distinct system prompts")
    w.add_argument("--system-tokens", type=int, default=None,
                   help="system prompt tokens (shared-prefix default 1024; multi-turn default 0)")
    w.add_argument("--question-len", default="64", metavar="N|LO:HI", help="shared-prefix: question tokens")
    w.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    w.add_argument("--long-input", default="2048", metavar="N|LO:HI", help="mixed: prefill-heavy prompt")
    w.add_argument("--short-output", default="16", metavar="N|LO:HI", help="mixed: prefill-heavy answer")
    w.add_argument("--short-input", default="64", metavar="N|LO:HI", help="mixed: decode-heavy prompt")
    w.add_argument("--long-output", default="512", metavar="N|LO:HI", help="mixed: decode-heavy answer")
    w.add_argument("--long-share", type=float, default=0.5, help="mixed: share of prefill-heavy requests")

    ld = p.add_argument_group("load (one of)")
    m = ld.add_mutually_exclusive_group()
    m.add_argument("--request-rate", default=None, metavar="R[,R...]",
                   help="Poisson arrivals per second, a sweep as a list; inf = all at once "
                        "(multi-turn: conversations per second) (default: inf, without --concurrency)")
    m.add_argument("--concurrency", default=None, metavar="N[,N...]", help="sessions in flight, or a sweep")
    ld.add_argument("--max-duration", type=float, default=600.0,
                    help="seconds per point after which no request starts")

    r = p.add_argument_group("report")
    r.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request's TTFT limit in ms (unset: no goodput)")
    r.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: a request's TPOT limit in ms (unset: no goodput)")
    r.add_argument("--label", default=None, help="name of this run in tables and plots")
    r.add_argument("--out", default=None, metavar="FILE", help="JSON results with every request's record")
    r.add_argument("--plot", default=None, metavar="DIR", help="write latency.png and throughput.png here")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench compare", formatter_class=DefaultsHelpFormatter,
                                description="Table and plots of several results files together.")
    p.add_argument("files", nargs="+", help="JSON files written by `baton bench --out`")
    p.add_argument("--labels", default=None, help="comma-separated names replacing the files' labels")
    p.add_argument("--plot", default=None, metavar="DIR", help="write latency.png and throughput.png here")
    return p


def _json_object(s: str) -> dict:
    import json

    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_loads(args) -> list:
    from baton.bench.runner import Load

    if args.concurrency is not None:
        loads = [Load("concurrency", float(int(v))) for v in args.concurrency.split(",")]
        if any(x.value < 1 for x in loads):
            raise ValueError("--concurrency values must be at least 1")
        return loads
    values = [math.inf if v.strip() == "inf" else float(v) for v in (args.request_rate or "inf").split(",")]
    if any(v <= 0 for v in values):
        raise ValueError("--request-rate values must be positive")
    return [Load("rate", v) for v in values]


def make_workload(args, seed: int, maker: wl.PromptMaker) -> list[wl.Session]:
    n, r = args.num_requests, wl.parse_range
    if args.workload == "random":
        return wl.random_workload(n, seed, maker, r(args.input_len), r(args.output_len))
    if args.workload == "shared-prefix":
        system = 1024 if args.system_tokens is None else args.system_tokens
        return wl.shared_prefix_workload(n, seed, maker, args.tenants, system, r(args.question_len),
                                         r(args.output_len))
    if args.workload == "multi-turn":
        return wl.multi_turn_workload(n, seed, maker, args.turns, r(args.input_len), r(args.output_len),
                                      args.system_tokens or 0)
    return wl.mixed_workload(n, seed, maker, r(args.long_input), r(args.short_output),
                             r(args.short_input), r(args.long_output), args.long_share)


def _model_name(base_url: str, headers: dict, timeout_s: float) -> str:
    import httpx

    try:
        resp = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=min(timeout_s, 30.0),
                         trust_env=False)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(f"cannot list the models at {base_url}/v1/models ({e}); pass --model") from e
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def run(argv: list[str]) -> int:
    from baton.bench import results
    from baton.bench.metrics import summarize
    from baton.bench.payload import RequestOptions
    from baton.bench.progress import Progress
    from baton.bench.runner import Target, run_point

    args = build_parser().parse_args(argv)
    if args.num_requests < 1:
        raise ValueError("--num-requests must be at least 1")
    loads = parse_loads(args)
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    tokenizer = None
    if args.tokenizer:
        from baton.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer(args.tokenizer)
    maker = wl.PromptMaker(tokenizer, as_ids=tokenizer is not None and args.endpoint == "completions")
    # listing the models is not a measured request: it gets time even under a tiny --timeout
    model = args.model or _model_name(base_url, headers, max(args.timeout, 10.0))
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    options = RequestOptions(args.endpoint, model, args.temperature, args.ignore_eos, args.extra_body)
    sent = "none (the server's default)" if args.temperature is None else f"{args.temperature:g}"
    print(f"baton bench: temperature {sent}, ignore_eos {args.ignore_eos}, extra body {args.extra_body or '{}'}",
          file=sys.stderr)
    target = Target(base_url + path, options, headers, args.timeout, args.http_client)
    label = args.label or args.workload
    config = {k: v for k, v in vars(args).items() if k != "api_key"} | {"model": model, "base_url": base_url}

    points = []
    for i, load in enumerate(loads):
        seed = args.seed + i  # fresh prompts per point: a later point never hits an earlier one's cache
        sessions = make_workload(args, seed, maker)
        planned = wl.request_count(sessions)
        progress = Progress(planned, f"{label} {load}", args.progress)
        # the client's own garbage collections stall every stream it reads: what start-up and
        # the workload made is frozen out of them (the gaps measured are the server's)
        freeze_startup()
        try:
            encode = maker.encode if maker.as_ids else None
            records, duration = asyncio.run(
                run_point(target, sessions, load, seed, args.max_duration, progress, encode))
        finally:
            progress.close()
        summary = summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
        points.append(results.point_doc(load.mode, load.value, seed, planned, summary, records))
    doc = results.results_doc(label, config, points)
    if args.out:
        results.save(doc, args.out)
    if args.plot:
        from baton.bench.plot import plot

        for p in plot([doc], args.plot):
            print(f"wrote {p}", file=sys.stderr)
    print(results.table([doc]))
    failed = [p for p in points if p["summary"]["completed"] == 0]
    for p in failed:
        first = next((r["error"] for r in p["requests"] if r["error"]), "no request was sent")
        print(f"baton bench: every request of {p['mode']}={p['value']} failed: {first}", file=sys.stderr)
    return 1 if failed else 0


def compare(argv: list[str]) -> int:
    from baton.bench import results

    args = build_compare_parser().parse_args(argv)
    docs = [results.load(f) for f in args.files]
    if args.labels:
        names = args.labels.split(",")
        if len(names) != len(docs):
            raise ValueError(f"--labels names {len(names)} runs for {len(docs)} files")
        for d, n in zip(docs, names):
            d["label"] = n
    if args.plot:
        from baton.bench.plot import plot

        for p in plot(docs, args.plot):
            print(f"wrote {p}", file=sys.stderr)
    print(results.table(docs))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            return compare(argv[1:])
        return run(argv[1:] if argv[:1] == ["run"] else argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"baton bench: error: {e}", file=sys.stderr)
        return 2
