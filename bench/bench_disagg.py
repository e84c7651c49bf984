"""Disaggregated against colocated on one GPU: TTFT of a long prompt, and the decode pod's
inter-token latency while it receives another prompt's KV.

Starts real pods as processes (random weights of the model config given), talks to their
internal API:
  1. a colocated pod: TTFT of N distinct prompts of --prompt-len tokens (max_tokens 1);
  2. a prefill pod + a decode pod on the same GPU: the same through the decode pod, which
     has the prefill pod push the KV over UCX (CUDA IPC between the two processes);
  3. on the decode pod, one long decode stream; its inter-token gaps while other prompts'
     KV arrives, against its gaps when idle and (to tell the receive's own cost from the
     GPU's sharing) while the prefill pod computes as long a prompt that goes nowhere; and
     the colocated pod's own stream while it prefills as long a prompt itself.
Run: python bench/bench_disagg.py [--config bench/configs/qwen3-8b] [--device cuda]
     (--device cpu --config DIR rehearses it on a tiny model). JSON to $OUT/disagg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: str, model: str, device: str, extra: list[str], log: Path,
          env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "baton.cli", cmd, "--model", model, "--port", str(port), "--device", device,
            "--log-level", "warning",
            # a loopback bench that calls pods directly and pushes KV "to nowhere" (docs/SECURITY.md)
            "--insecure-internal"] + extra
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd} not ready: {log.read_text()[-3000:]}")


def stop(*procs) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


_local = threading.local()


def client() -> httpx.Client:
    """This thread's pooled client. A fresh one per request (httpx.stream) builds an SSL context
    and a connection each time: ~20 ms that would count in every TTFT, both setups alike."""
    c = getattr(_local, "client", None)
    if c is None:
        c = _local.client = httpx.Client(trust_env=False, timeout=300)
    return c


def ttft(url: str, prompt: list[int], prefill: str | None, max_tokens: int = 1, times: list | None = None) -> float:
    body = {"request_id": f"b{random.getrandbits(48)}", "prompt_token_ids": prompt,
            "sampling": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    if prefill:
        body["prefill"] = {"url": prefill}
    t = time.perf_counter()
    first = None
    with client().stream("POST", url + "/internal/generate", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(msg["error"])
            now = time.perf_counter()
            first = first or now - t
            if times is not None:
                times.append(now)
    return first


def stream_gaps(url: str, vocab: int, work: list[tuple[str, Callable[[], None]]]) -> dict:
    """Gaps between the tokens of one long greedy stream on `url` while each piece of `work`
    runs in turn (0.3 s apart): per label, the median and max gap inside its windows and the
    windows' lengths; "idle", the gaps outside every window."""
    times: list[float] = []
    stream = threading.Thread(target=ttft, args=(url, prompts(1, 64, vocab, 3)[0], None, 400, times))
    stream.start()
    while len(times) < 100:
        time.sleep(0.01)
    windows: dict[str, list] = {}
    for label, fn in work:
        t0 = time.perf_counter()
        fn()
        windows.setdefault(label, []).append((t0, time.perf_counter()))
        time.sleep(0.3)
    stream.join()
    gaps = [(b, b - a) for a, b in zip(times, times[1:])][20:]
    everywhere = [w for ws in windows.values() for w in ws]
    out = {"idle": {"gaps": [g for t, g in gaps if not any(w0 - 0.05 <= t <= w1 + 0.05 for w0, w1 in everywhere)]}}
    for label, ws in windows.items():
        out[label] = {"gaps": [g for t, g in gaps if any(w0 <= t <= w1 for w0, w1 in ws)],
                      "windows_ms": [round((b - a) * 1e3, 1) for a, b in ws]}
    for v in out.values():
        g = v.pop("gaps")
        v["median_ms"] = round(statistics.median(g) * 1e3, 3) if g else None
        v["max_ms"] = round(max(g) * 1e3, 3) if g else None
    return out


def metrics(url: str) -> dict[str, float]:
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in
            client().get(url + "/metrics").text.splitlines() if ln and not ln.startswith("#")}


def phases(before: dict, after: dict, name: str) -> dict[str, float]:
    """Mean ms per phase of the histogram `name` between two /metrics snapshots."""
    out = {}
    for key, total in after.items():
        if key.startswith(name + "_sum{"):
            phase = key.split('phase="')[1].split('"')[0]
            count = after[key.replace("_sum{", "_count{")] - before.get(key.replace("_sum{", "_count{"), 0)
            if count:
                out[phase] = round((total - before.get(key, 0.0)) / count * 1e3, 3)
    return out


def prefill_nowhere(purl: str, prompt: list[int]) -> None:
    """The prefill pod computes `prompt` and pushes it to a port where nobody listens: the
    GPU work of a disaggregated request without its transfer (the push fails: 502)."""
    body = {"request_id": f"n{random.getrandbits(48)}", "prompt_token_ids": prompt, "kv_start": 0,
            "reservation_id": "none", "ucx_address": f"127.0.0.1:{free_port()}"}
    r = client().post(purl + "/internal/prefill", json=body)
    if r.status_code != 502:
        raise RuntimeError(f"a push to nowhere answered {r.status_code}: {r.text[:300]}")


def layer_copy(config: str, tokens: int, src: str, dst: str) -> float:
    """GB/s of a plain tensor.to(dst) of one layer's KV for `tokens` tokens (bf16)."""
    import torch

    c = json.loads(Path(config, "config.json").read_text())
    shape = (2, tokens, c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    a = torch.randn(shape, device=src).to(torch.bfloat16)
    b = torch.empty_like(a, device=dst)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
    return round(a.numel() * a.element_size() * 20 / (time.perf_counter() - t) / 1e9, 1)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(Path(__file__).with_name("configs") / "qwen3-8b"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kv-blocks", type=int, default=4000)
    ap.add_argument("--prefill-device", default=None, help="default: --device (e.g. cuda:0)")
    ap.add_argument("--decode-device", default=None, help="default: --device (e.g. cuda:1)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--prefill-env", action="append", default=[], metavar="K=V",
                    help="environment of the prefill pod (e.g. CUDA_MPS_CLIENT_PRIORITY=1 under MPS)")
    ap.add_argument("--prefill-args", default="", help="more flags of the prefill pod, one string")
    ap.add_argument("--decode-args", default="", help="more flags of the decode (and colocated) pod, one string")
    args = ap.parse_args(argv)
    pdev, ddev = args.prefill_device or args.device, args.decode_device or args.device
    vocab = json.loads(Path(args.config, "config.json").read_text())["vocab_size"]
    logs = Path(os.environ.get("OUT", "/tmp"))
    common = ["--load-format", "random", "--num-kv-blocks", str(args.kv_blocks), "--max-num-batched-tokens",
              str(max(8192, args.prompt_len)), "--no-enable-prefix-caching"]
    res: dict = dict(config=Path(args.config).name, prompt_len=args.prompt_len, device=args.device,
                     prefill_env=args.prefill_env, prefill_args=args.prefill_args, decode_args=args.decode_args)

    colo, url = start("decode", args.config, ddev, common + ["--role", "colocated"] + args.decode_args.split(),
                      logs / "colo.log")
    try:
        ttft(url, prompts(1, args.prompt_len, vocab, 99)[0], None)  # warm-up
        m0 = metrics(url)
        res["colocated_ttft_ms"] = [round(ttft(url, p, None) * 1e3, 2) for p in prompts(args.runs, args.prompt_len, vocab, 1)]
        m1 = metrics(url)
        k = "baton_pod_time_to_first_token_seconds"  # the pod's own: response start to first token
        res["colocated_pod_ttft_ms"] = round((m1[k + "_sum"] - m0[k + "_sum"]) / args.runs * 1e3, 2)
        # the colocated pod's own decode stream while it prefills as long prompts itself
        itl = stream_gaps(url, vocab, [("prefill", lambda q=q: ttft(url, q, None))
                                       for q in prompts(3, args.prompt_len, vocab, 4)])
        res["colocated_itl_idle_ms"], res["colocated_itl_prefill_ms"] = itl["idle"]["median_ms"], itl["prefill"]["median_ms"]
        res["colocated_itl_prefill_max_ms"] = itl["prefill"]["max_ms"]
    finally:
        stop(colo)

    penv = dict(kv.split("=", 1) for kv in args.prefill_env)
    p, purl = start("prefill", args.config, pdev, common + args.prefill_args.split(), logs / "prefill.log", penv)
    try:
        d, durl = start("decode", args.config, ddev, common + ["--role", "decode", "--ucx-port", "0"] + args.decode_args.split(),
                        logs / "decode.log")
    except RuntimeError:
        stop(p)
        raise
    try:
        ttft(durl, prompts(1, args.prompt_len, vocab, 98)[0], purl)  # warm-up (connection, kernels)
        m0d, m0p = metrics(durl), metrics(purl)
        res["disagg_ttft_ms"] = [round(ttft(durl, q, purl) * 1e3, 2) for q in prompts(args.runs, args.prompt_len, vocab, 2)]
        m1d, m1p = metrics(durl), metrics(purl)
        # where the time goes: mean ms per phase on each side (see baton/pod/metrics.py)
        res["decode_phase_ms"] = phases(m0d, m1d, "baton_pod_kv_transfer_phase_seconds")
        res["prefill_phase_ms"] = phases(m0p, m1p, "baton_pod_prefill_phase_seconds")
        stats = httpx.get(durl + "/internal/transfer_stats", trust_env=False).json()
        res["decode_transfer_stats"] = stats
        m = m1d
        secs = m.get("baton_pod_kv_transfer_seconds_sum", 0.0)
        # reservation to last layer in: includes waiting for the prefill's compute
        res["transfer_GBps_incl_compute"] = round(m.get("baton_pod_kv_bytes_received_total", 0) / secs / 1e9, 1) if secs else None
        if stats.get("outcome_ok", 0) < args.runs:
            raise RuntimeError(f"transfers fell back to local prefill: {stats}")
        # interference: a long decode stream on D while other prompts' KV arrives, and while the
        # prefill pod computes as long prompts for nobody (the same GPU work, nothing received)
        work = [w for q, r in zip(prompts(3, args.prompt_len, vocab, 4), prompts(3, args.prompt_len, vocab, 5))
                for w in (("receiving", lambda q=q: ttft(durl, q, purl)), ("prefill_elsewhere", lambda r=r: prefill_nowhere(purl, r)))]
        itl = stream_gaps(durl, vocab, work)
        res["decode_itl_idle_ms"] = itl["idle"]["median_ms"]
        res["decode_itl_receiving_ms"] = itl["receiving"]["median_ms"]
        res["decode_itl_receiving_max_ms"] = itl["receiving"]["max_ms"]
        res["decode_itl_prefill_elsewhere_ms"] = itl["prefill_elsewhere"]["median_ms"]
        res["receiving_window_ms"] = itl["receiving"]["windows_ms"]
        res["prefill_nowhere_window_ms"] = itl["prefill_elsewhere"]["windows_ms"]
        res["prefill_transfer_stats"] = httpx.get(purl + "/internal/transfer_stats", trust_env=False).json()
    finally:
        stop(d, p)
    if pdev != ddev and pdev.startswith("cuda") and ddev.startswith("cuda"):
        res["layer_copy_GBps"] = layer_copy(args.config, args.prompt_len, pdev, ddev)
    res["prefill_device"], res["decode_device"] = pdev, ddev
    c, dd = statistics.median(res["colocated_ttft_ms"]), statistics.median(res["disagg_ttft_ms"])
    res["ttft_ratio"] = round(dd / c, 3)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"disagg{args.tag}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    print(f"\n{res['config']} prompt {args.prompt_len} on {args.device}: TTFT colocated {c:.1f} ms, "
          f"disaggregated {dd:.1f} ms ({res['ttft_ratio']}x)")
    print(f"phases (mean ms): decode pod {res['decode_phase_ms']}, prefill pod {res['prefill_phase_ms']}")
    print(f"decode ITL idle {res['decode_itl_idle_ms']} ms, while receiving {res['decode_itl_receiving_ms']} ms "
          f"(max {res['decode_itl_receiving_max_ms']} ms), while the prefill pod computes for nobody "
          f"{res['decode_itl_prefill_elsewhere_ms']} ms")
    print(f"colocated pod: ITL idle {res['colocated_itl_idle_ms']} ms, while it prefills a prompt as long "
          f"{res['colocated_itl_prefill_ms']} ms (max {res['colocated_itl_prefill_max_ms']} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
