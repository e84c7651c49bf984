"""Push rate of baton.kvtransfer at Qwen3-8B's per-layer KV sizes, beside a device copy.

Run: python bench/bench_kvtransfer.py [--device cuda|cpu] [--tokens 1024,4096,16384]
                                      [--requests 4] [--layers 36]

Two spawned processes on one device (two on one GPU, or two CPU processes): a KVSender
pushes each request's 36 layers, [2, tokens, 8 KV heads, 128] bf16 (4 KiB per token per
layer: 4/16/64 MiB per layer at 1k/4k/16k tokens), into a KVReceiver, which receives them
into its staging pool; on_layer does nothing. The producer pushes layers back to back from
its own thread, as a prefill model loop would, several requests one after another under the
sender's in-flight budget.

push GB/s = all requests' bytes / (receiver's last wait() return - sender's first push).
Both are time.monotonic(), one clock for the whole host. The first request of each size is a
warm-up (connection, staging pool, CUDA IPC handles) whose bytes are checked against the
sender's and which is not timed.
device copy GB/s = the same layer tensors copied with Tensor.copy_ on that device, in the
same run: the link's own copy bandwidth, the ceiling to compare against.

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


def layer_shape(tokens: int) -> tuple[int, int, int, int]:
    return (2, tokens, KV_HEADS, HEAD_DIM)


def sources(tokens: int, device: str):
    import torch

    out = []
    for i in range(DISTINCT):
        g = torch.Generator(device=device).manual_seed(1000 * tokens + i)
        out.append(torch.randn(layer_shape(tokens), generator=g, device=device).to(torch.bfloat16))
    return out


def receiver_main(conn, device: str, staging_idle_bytes: int) -> None:
    asyncio.run(_receiver(conn, device, staging_idle_bytes))


async def _receiver(conn, device, staging_idle_bytes):
    import torch

    from baton.kvtransfer.errors import TransferFailed
    from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings

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

    conn.send(("address", rx.address, sorted(ucxx.get_active_transports())))
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "stop":
            break
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
        error = None
        for t in transfers:
            try:
                await t.wait()
            except TransferFailed as e:  # reported to the parent, which stops the run
                error = str(e)
        conn.send(("done", time.monotonic(), error, bad, rx.stats()))
    await rx.close()


def sender_main(conn, device: str, inflight_bytes: int, min_message_bytes: int) -> None:
    asyncio.run(_sender(conn, device, inflight_bytes, min_message_bytes))


async def _sender(conn, device, inflight_bytes, min_message_bytes):
    import torch

    from baton.kvtransfer.sender import KVSender, SenderSettings

    loop = asyncio.get_running_loop()
    tx = KVSender(
        SenderSettings(
            pod_id="bench-prefill",
            transfer_timeout_s=600,
            max_inflight_bytes=inflight_bytes,
            min_message_bytes=min_message_bytes,
        )
    )
    await tx.start()
    conn.send(("started",))
    cache = {}
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "stop":
            break
        if cmd[0] == "copy":
            _, tokens, layers = cmd
            conn.send(
                ("copy", copy_rate(cache.setdefault(tokens, sources(tokens, device)), layers))
            )
            continue
        _, address, tokens, layers, tags = cmd
        src = cache.setdefault(tokens, sources(tokens, device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result = {}
        producer = threading.Thread(
            target=_produce, args=(tx, address, tokens, layers, tags, src, result)
        )
        producer.start()
        await loop.run_in_executor(None, producer.join)
        conn.send(("pushed", result["t0"], result.get("error"), tx.stats()))
    await tx.close()


def _produce(tx, address, tokens, layers, tags, src, result):
    import torch

    from baton.kvtransfer.errors import TransferFailed

    result["t0"] = time.monotonic()
    handles = []
    for tag in tags:
        h = tx.begin(tag, "res-" + tag, address, layers, layer_shape(tokens), torch.bfloat16)
        for i in range(layers):
            h.push_layer(i, src[i % DISTINCT])
        h.finish(first_token=0)
        handles.append(h)
    for h in handles:
        try:
            h.result(timeout=600)
        except (TransferFailed, TimeoutError) as e:
            result["error"] = str(e)


def copy_rate(src, layers: int, reps: int = 5) -> float:
    """GB/s of Tensor.copy_ over the same layer tensors on their device."""
    import torch

    dst = [torch.empty_like(s) for s in src]
    sync = torch.cuda.synchronize if src[0].is_cuda else (lambda: None)
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


def main() -> None:
    import torch

    from baton.kvtransfer.ucx_runtime import ENV_DEFAULTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--requests", type=int, default=4, help="timed requests per size")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--inflight-mib", type=int, default=1024, help="sender's max_inflight_bytes")
    p.add_argument("--min-message-kib", type=int, default=1024, help="sender's min_message_bytes")
    args = p.parse_args()
    sizes = [int(t) for t in args.tokens.split(",")]

    ctx = mp.get_context("spawn")  # ucxx does not survive fork
    rx_conn, rx_child = ctx.Pipe()
    tx_conn, tx_child = ctx.Pipe()
    rx = ctx.Process(
        target=receiver_main, args=(rx_child, args.device, 2 * args.inflight_mib << 20)
    )
    tx = ctx.Process(
        target=sender_main,
        args=(tx_child, args.device, args.inflight_mib << 20, args.min_message_kib << 10),
    )
    rx.start()
    tx.start()
    rows = []
    try:
        _, address, transports = ask(rx_conn, 120)
        ask(tx_conn, 120)
        for tokens in sizes:
            layer_bytes = 2 * tokens * KV_HEADS * HEAD_DIM * 2
            for timed, tags in (
                (False, [f"warm-{tokens}"]),
                (True, [f"r{tokens}-{i}" for i in range(args.requests)]),
            ):
                rx_conn.send(("expect", tokens, args.layers, tags))
                ask(rx_conn)
                tx_conn.send(("push", address, tokens, args.layers, tags))
                _, t0, tx_error, _ = ask(tx_conn)
                _, t_end, rx_error, bad, rx_stats = ask(rx_conn)
                if tx_error or rx_error or bad:
                    raise SystemExit(
                        f"{tokens} tokens: sender {tx_error}, receiver {rx_error}, "
                        f"corrupt layers {bad}"
                    )
                if timed:
                    total = len(tags) * args.layers * layer_bytes
                    push = total / (t_end - t0) / 1e9
            tx_conn.send(("copy", tokens, args.layers))
            _, copy = ask(tx_conn)
            rows.append(
                {
                    "tokens": tokens,
                    "layer_mib": layer_bytes / 2**20,
                    "request_mib": args.layers * layer_bytes / 2**20,
                    "requests": args.requests,
                    "push_gbps": round(push, 2),
                    "copy_gbps": round(copy, 2),
                    "push_over_copy": round(push / copy, 3),
                    "ms_per_request": round(args.layers * layer_bytes / push / 1e6, 2),
                    "staging_allocations": rx_stats["staging_allocations"],
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
        "transports": transports,
        "layers": args.layers,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bfloat16",
        "inflight_mib": args.inflight_mib,
        "min_message_kib": args.min_message_kib,
        "ucx_env": {k: os.environ.get(k, v) for k, v in ENV_DEFAULTS.items()},
        "rows": rows,
    }
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kvtransfer.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(
        f"\nbaton.kvtransfer push, two processes on {device} ({', '.join(transports)}), "
        f"{args.layers} layers, bf16, {KV_HEADS} KV heads x {HEAD_DIM}"
    )
    print(
        f"{'tokens':>7} {'layer MiB':>9} {'request MiB':>11} {'requests':>8} {'push GB/s':>9} "
        f"{'copy GB/s':>9} {'push/copy':>9} {'ms/request':>10}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>7} {r['layer_mib']:>9.0f} {r['request_mib']:>11.0f} {r['requests']:>8} "
            f"{r['push_gbps']:>9.2f} {r['copy_gbps']:>9.1f} {r['push_over_copy']:>9.3f} "
            f"{r['ms_per_request']:>10.1f}"
        )


if __name__ == "__main__":
    main()
