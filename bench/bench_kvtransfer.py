"""Push rate of baton.kvtransfer at Qwen3-8B's per-layer KV sizes, beside a device copy and
beside raw ucxx with 16 messages in flight, in one run.

Run: python bench/bench_kvtransfer.py [--device cuda|cpu] [--tokens 1024,4096,16384]
                                      [--requests 4] [--layers 36] [--window 16]
                                      [--min-message-mib 16] [--pace-us 2000]

Two spawned processes on one device (two on one GPU, or two CPU processes): a KVSender
pushes each request's 36 layers, [2, tokens, 8 KV heads, 128] bf16 (4 KiB per token per
layer: 4/16/64 MiB per layer at 1k/4k/16k tokens), into a KVReceiver, which receives them
into its staging pool; on_layer does nothing. Four figures per size:

- push GB/s: the producer pushes layers back to back from its own thread, as a prefill
  model loop would, several requests one after another under the sender's settings
  (coalescing below --min-message-mib, --window messages in flight). All requests' bytes /
  (receiver's last wait() return - sender's first push). Both are time.monotonic(), one
  clock for the whole host.
- ucxx16 GB/s: the same bytes as plain ucxx tag messages of one layer each, 16 sends and 16
  recvs posted at a time, on an endpoint of their own between the same two processes: what
  ucxx itself does at this size (UCXX.md's "16 in flight"), the ceiling for a push that
  sends one layer per message.
- copy GB/s: the same layer tensors copied with Tensor.copy_ on that device, in the same
  run: the device's own copy bandwidth; with --rx-device (e.g. --device cuda:0 --rx-device
  cuda:1: the sender on GPU 0, the receiver on GPU 1) a plain copy from one GPU to the other.
- tail ms (paced): one request whose layers come --pace-us apart, each after GPU work of
  that length (torch.cuda._sleep) on the producer's stream, as layers come out of a real
  prefill; tail = receiver's wait() return - the moment the GPU finished the last layer.
  That is what the push adds to a disaggregated TTFT. On CPU the pace is a sleep.

The first request of each size is a warm-up (connection, staging pools, CUDA IPC handles)
whose bytes are checked against the sender's and which is not timed.

Prints a table last; writes $OUT/kvtransfer.json when OUT is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import threading
import time

KV_HEADS, HEAD_DIM = 8, 128  # Qwen3-8B
DISTINCT = 4  # distinct source tensors per size, pushed in turn (keeps 16k tokens in memory)
RAW_WINDOW = 16


def layer_shape(tokens: int) -> tuple[int, int, int, int]:
    return (2, tokens, KV_HEADS, HEAD_DIM)


def sources(tokens: int, device: str):
    import torch

    out = []
    for i in range(DISTINCT):
        g = torch.Generator(device=device).manual_seed(1000 * tokens + i)
        out.append(torch.randn(layer_shape(tokens), generator=g, device=device).to(torch.bfloat16))
    return out


def ucx_view(t):
    """What ucxx sends from or receives into: CUDA tensors as they are, CPU ones as numpy."""
    import torch

    flat = t.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


def receiver_main(conn, device: str, staging_idle_bytes: int) -> None:
    asyncio.run(_receiver(conn, device, staging_idle_bytes))


async def _receiver(conn, device, staging_idle_bytes):
    import torch

    from baton.kvtransfer.errors import TransferFailed
    from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings

    if torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # CUDA IPC lands on this GPU
    loop = asyncio.get_running_loop()
    rx = KVReceiver(
        ReceiverSettings(
            pod_id="bench-decode",
            setup_timeout_s=60,
            transfer_timeout_s=600,
            staging_idle_bytes=staging_idle_bytes,
        ),
        device=device,
    )
    await rx.start()
    import ucxx  # only now: baton.kvtransfer sets UCX's environment before ucxx reads it

    raw_ep: asyncio.Future = loop.create_future()
    raw_listener = ucxx.create_listener(lambda ep: raw_ep.done() or raw_ep.set_result(ep))
    conn.send(("address", rx.address, raw_listener.port, sorted(ucxx.get_active_transports())))
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "stop":
            break
        if cmd[0] == "raw":
            _, nbytes, count = cmd
            ep = await raw_ep
            conn.send(("ready",))
            conn.send(("raw_done", await _raw_recv(ep, nbytes, count, device)))
            continue
        _, tokens, layers, tags = cmd
        expected = sources(tokens, device) if len(tags) == 1 else None  # warm-up: check bytes
        bad = []

        def on_layer(i, kv, expected=expected, bad=bad):
            if expected is not None and not torch.equal(kv, expected[i % DISTINCT]):
                bad.append(i)

        transfers = [
            rx.expect(t, "res-" + t, layers, layer_shape(tokens), torch.bfloat16, on_layer)
            for t in tags
        ]
        conn.send(("ready",))
        cpu0 = time.process_time()
        error = None
        for t in transfers:
            try:
                await t.wait()
            except TransferFailed as e:  # reported to the parent, which stops the run
                error = str(e)
        t_end = time.monotonic()
        stats = dict(rx.stats(), cpu_s=time.process_time() - cpu0)
        conn.send(("done", t_end, error, bad, stats))
    raw_listener.close()
    if raw_ep.done():
        raw_ep.result().abort()
    await rx.close()


async def _raw_recv(ep, nbytes: int, count: int, device: str) -> float:
    """Receive `count` messages of `nbytes` (tags 0..count-1), RAW_WINDOW recvs posted at
    once into RAW_WINDOW reused buffers; returns when the last one landed."""
    import torch

    free: asyncio.Queue = asyncio.Queue()
    for _ in range(RAW_WINDOW):
        free.put_nowait(torch.empty(nbytes, dtype=torch.uint8, device=device))

    async def one(i):
        buf = await free.get()
        try:
            await ep.recv(ucx_view(buf), tag=i)
        finally:
            free.put_nowait(buf)

    await asyncio.gather(*(one(i) for i in range(count)))
    return time.monotonic()


async def _raw_send(ep, srcs, count: int) -> float:
    """Send `count` messages (tags 0..count-1) from `srcs` in turn, RAW_WINDOW at a time;
    returns when the first was submitted."""
    sem = asyncio.Semaphore(RAW_WINDOW)
    views = [ucx_view(s) for s in srcs]

    async def one(i):
        async with sem:
            await ep.send(views[i % len(views)], tag=i)

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    return t0


def sender_main(conn, device: str, settings: dict, rx_device: str | None = None) -> None:
    asyncio.run(_sender(conn, device, settings, rx_device))


async def _sender(conn, device, settings, rx_device=None):
    import torch

    from baton.kvtransfer.sender import KVSender, SenderSettings

    if torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    loop = asyncio.get_running_loop()
    tx = KVSender(SenderSettings(pod_id="bench-prefill", transfer_timeout_s=600, **settings))
    await tx.start()
    import ucxx

    conn.send(("started",))
    cache = {}
    raw_ep = None
    cycles_per_us = calibrate_sleep() if device.startswith("cuda") else None
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "stop":
            break
        if cmd[0] == "copy":
            _, tokens, layers = cmd
            conn.send(
                ("copy", copy_rate(cache.setdefault(tokens, sources(tokens, device)), layers, dst_device=rx_device))
            )
            continue
        if cmd[0] == "raw":
            _, host, port, tokens, count = cmd
            if raw_ep is None:
                raw_ep = await ucxx.create_endpoint(host, port)
            src = cache.setdefault(tokens, sources(tokens, device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            conn.send(("raw_pushed", await _raw_send(raw_ep, src, count)))
            continue
        _, address, tokens, layers, tags, pace_us = cmd
        src = cache.setdefault(tokens, sources(tokens, device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result = {}
        producer = threading.Thread(
            target=_produce,
            args=(tx, address, tokens, layers, tags, src, result, pace_us, cycles_per_us),
        )
        before = tx.stats()
        cpu0 = time.process_time()
        producer.start()
        await loop.run_in_executor(None, producer.join)
        result["cpu_s"] = time.process_time() - cpu0
        after = tx.stats()
        result["messages"] = after["messages_sent"] - before["messages_sent"]
        result["inflight_peak"] = after["inflight_messages_peak"]
        conn.send(("pushed", result))
    if raw_ep is not None:
        raw_ep.abort()
    await tx.close()


def calibrate_sleep() -> float:
    """GPU clock cycles per µs of torch.cuda._sleep, measured."""
    import torch

    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / (start.elapsed_time(end) * 1000)


def _produce(tx, address, tokens, layers, tags, src, result, pace_us, cycles_per_us):
    """Push each request's layers from this thread. Paced: before each layer, `pace_us` of
    work on the stream (GPU) or a sleep (CPU); `t_compute_end` is when the last layer's
    work was done."""
    import torch

    from baton.kvtransfer.errors import TransferFailed

    result["t0"] = time.monotonic()
    handles = []
    for tag in tags:
        h = tx.begin(tag, "res-" + tag, address, layers, layer_shape(tokens), torch.bfloat16)
        for i in range(layers):
            if pace_us and cycles_per_us:
                torch.cuda._sleep(int(pace_us * cycles_per_us))  # the layer's "compute"
            elif pace_us:
                time.sleep(pace_us / 1e6)
            h.push_layer(i, src[i % DISTINCT])
        if pace_us:
            if cycles_per_us:
                torch.cuda.current_stream().synchronize()
            result["t_compute_end"] = time.monotonic()
        h.finish(first_token=0)
        handles.append(h)
    for h in handles:
        try:
            h.result(timeout=600)
        except (TransferFailed, TimeoutError) as e:
            result["error"] = str(e)


def copy_rate(src, layers: int, reps: int = 5, dst_device=None) -> float:
    """GB/s of Tensor.copy_ over the same layer tensors, on their device or to dst_device
    (a plain tensor.to("cuda:1") between two GPUs)."""
    import torch

    dst = [torch.empty_like(s, device=dst_device or s.device) for s in src]

    def sync():
        if src[0].is_cuda:
            torch.cuda.synchronize(src[0].device)
            torch.cuda.synchronize(dst[0].device)

    for s, d in zip(src, dst):  # warm-up
        d.copy_(s)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        for i in range(layers):
            dst[i % DISTINCT].copy_(src[i % DISTINCT])
    sync()
    return reps * layers * src[0].numel() * src[0].element_size() / (time.perf_counter() - t) / 1e9


def ask(conn, timeout: float = 900):
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer within {timeout}s")
    return conn.recv()


def push(rx_conn, tx_conn, address, tokens, layers, tags, pace_us=0):
    """One round of requests through baton.kvtransfer; returns (seconds, push result)."""
    rx_conn.send(("expect", tokens, layers, tags))
    ask(rx_conn)
    tx_conn.send(("push", address, tokens, layers, tags, pace_us))
    _, result = ask(tx_conn)
    _, t_end, rx_error, bad, rx_stats = ask(rx_conn)
    if result.get("error") or rx_error or bad:
        raise SystemExit(
            f"{tokens} tokens: sender {result.get('error')}, receiver {rx_error}, "
            f"corrupt layers {bad}"
        )
    result["t_end"], result["rx_stats"] = t_end, rx_stats
    return t_end - result["t0"], result


def raw(rx_conn, tx_conn, host, port, tokens, count):
    """`count` one-layer messages through plain ucxx, 16 in flight; returns seconds."""
    nbytes = 2 * tokens * KV_HEADS * HEAD_DIM * 2
    rx_conn.send(("raw", nbytes, count))
    tx_conn.send(("raw", host, port, tokens, count))
    ask(rx_conn)  # ready (after the connection was accepted)
    _, t0 = ask(tx_conn)
    _, t_end = ask(rx_conn)
    return t_end - t0


def main() -> None:
    import torch

    from baton.kvtransfer.sender import SenderSettings
    from baton.kvtransfer.ucx_runtime import ENV_DEFAULTS

    defaults = SenderSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rx-device", default=None, help="the receiver's device (default --device), e.g. cuda:1")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--requests", type=int, default=4, help="timed requests per size")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument(
        "--inflight-mib",
        type=int,
        default=defaults.max_inflight_bytes >> 20,
        help="sender's max_inflight_bytes",
    )
    p.add_argument(
        "--window",
        type=int,
        default=defaults.max_inflight_messages,
        help="sender's max_inflight_messages",
    )
    p.add_argument(
        "--min-message-mib",
        type=float,
        default=defaults.min_message_bytes / 2**20,
        help="sender's min_message_bytes (0: one layer per message)",
    )
    p.add_argument(
        "--pace-us",
        type=int,
        default=2000,
        help="paced request: work before each layer (0: skip the paced request)",
    )
    args = p.parse_args()
    sizes = [int(t) for t in args.tokens.split(",")]
    settings = {
        "max_inflight_bytes": args.inflight_mib << 20,
        "max_inflight_messages": args.window,
        "min_message_bytes": int(args.min_message_mib * 2**20),
    }

    ctx = mp.get_context("spawn")  # ucxx does not survive fork
    rx_conn, rx_child = ctx.Pipe()
    tx_conn, tx_child = ctx.Pipe()
    rx = ctx.Process(
        target=receiver_main, args=(rx_child, args.rx_device or args.device, 2 * args.inflight_mib << 20)
    )
    tx = ctx.Process(target=sender_main, args=(tx_child, args.device, settings, args.rx_device))
    rx.start()
    tx.start()
    rows = []
    try:
        _, address, raw_port, transports = ask(rx_conn, 120)
        host = address.rpartition(":")[0]
        ask(tx_conn, 120)
        for tokens in sizes:
            layer_bytes = 2 * tokens * KV_HEADS * HEAD_DIM * 2
            total = args.requests * args.layers * layer_bytes
            push(rx_conn, tx_conn, address, tokens, args.layers, [f"warm-{tokens}"])
            seconds, result = push(
                rx_conn,
                tx_conn,
                address,
                tokens,
                args.layers,
                [f"r{tokens}-{i}" for i in range(args.requests)],
            )
            push_gbps = total / seconds / 1e9
            raw(rx_conn, tx_conn, host, raw_port, tokens, RAW_WINDOW)  # warm-up
            ucxx16 = (
                total
                / raw(rx_conn, tx_conn, host, raw_port, tokens, args.requests * args.layers)
                / 1e9
            )
            tail_ms = None
            if args.pace_us:
                _, paced = push(
                    rx_conn,
                    tx_conn,
                    address,
                    tokens,
                    args.layers,
                    [f"paced-{tokens}"],
                    args.pace_us,
                )
                tail_ms = (paced["t_end"] - paced["t_compute_end"]) * 1e3
            tx_conn.send(("copy", tokens, args.layers))
            _, copy = ask(tx_conn)
            rows.append(
                {
                    "tokens": tokens,
                    "layer_mib": layer_bytes / 2**20,
                    "request_mib": args.layers * layer_bytes / 2**20,
                    "requests": args.requests,
                    "messages_per_request": result["messages"] / args.requests,
                    "inflight_peak": result["inflight_peak"],
                    "push_gbps": round(push_gbps, 2),
                    "ucxx16_gbps": round(ucxx16, 2),
                    "copy_gbps": round(copy, 2),
                    "push_over_copy": round(push_gbps / copy, 3),
                    "push_over_ucxx16": round(push_gbps / ucxx16, 3),
                    "ms_per_request": round(args.layers * layer_bytes / push_gbps / 1e6, 2),
                    "paced_tail_ms": None if tail_ms is None else round(tail_ms, 2),
                    # CPU both processes spent per request (all threads): what the push
                    # costs the model thread's GIL and cores on either side
                    "sender_cpu_ms_per_request": round(result["cpu_s"] * 1e3 / args.requests, 2),
                    "receiver_cpu_ms_per_request": round(
                        result["rx_stats"]["cpu_s"] * 1e3 / args.requests, 2
                    ),
                    "staging_allocations": result["rx_stats"]["staging_allocations"],
                }
            )
    finally:
        for c in (rx_conn, tx_conn):
            try:
                c.send(("stop",))
            except OSError:
                pass
        for proc in (tx, rx):
            proc.join(30)
            if proc.is_alive():
                proc.kill()

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {
        "device": device,
        "sender_device": args.device,
        "receiver_device": args.rx_device or args.device,
        "transports": transports,
        "layers": args.layers,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bfloat16",
        "sender": settings,
        "pace_us": args.pace_us,
        "ucx_env": {k: os.environ.get(k, v) for k, v in ENV_DEFAULTS.items()},
        "rows": rows,
    }
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"kvtransfer{args.tag}.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(
        f"\nbaton.kvtransfer push, two processes on {device} ({', '.join(transports)}), "
        f"{args.layers} layers, bf16, {KV_HEADS} KV heads x {HEAD_DIM}; window {args.window}, "
        f"coalescing below {args.min_message_mib:g} MiB"
    )
    head = (
        "tokens",
        "layer MiB",
        "msgs/req",
        "peak",
        "push GB/s",
        "ucxx16 GB/s",
        "copy GB/s",
        "push/ucxx16",
        "push/copy",
        "ms/request",
        f"tail ms @{args.pace_us}us",
        "tx cpu ms/r",
        "rx cpu ms/r",
    )
    print(" ".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = (
            r["tokens"],
            f"{r['layer_mib']:.0f}",
            f"{r['messages_per_request']:.0f}",
            r["inflight_peak"],
            f"{r['push_gbps']:.2f}",
            f"{r['ucxx16_gbps']:.2f}",
            f"{r['copy_gbps']:.1f}",
            f"{r['push_over_ucxx16']:.3f}",
            f"{r['push_over_copy']:.3f}",
            f"{r['ms_per_request']:.1f}",
            "-" if r["paced_tail_ms"] is None else f"{r['paced_tail_ms']:.2f}",
            f"{r['sender_cpu_ms_per_request']:.1f}",
            f"{r['receiver_cpu_ms_per_request']:.1f}",
        )
        print(" ".join(f"{c:>11}" for c in cells))


if __name__ == "__main__":
    main()
