"""Settings of a decode (or colocated) pod: flags, BATON_* environment variables, defaults."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from baton.settings import field


@dataclass
class PodSettings:
    model: str = field("", "model directory (default: the converted SmolLM2)")
    model_name: str = field("", "name served to clients (default: the directory's name)")
    role: str = field("colocated", "colocated (prefill + decode) or decode")
    host: str = field("127.0.0.1", "address to listen on")
    port: int = field(8100, "HTTP port of the internal API")
    advertise_url: str = field("", "URL the router uses to reach this pod (default http://HOST:PORT)")
    pod_id: str = field("", "unique pod id in the registry (default ROLE-HOSTNAME-PORT)")
    redis_url: str = field("", "Redis of the KV index and pod registry; empty: do not register")
    device: str = field("auto", "cuda, cuda:N, cpu or auto")
    dtype: str = field("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    block_size: int = field(16, "tokens per KV block")
    num_kv_blocks: int | None = field(None, "KV cache blocks (default: from memory)")
    kv_cache_bytes: int = field(1 << 30, "KV cache bytes on CPU when num_kv_blocks is unset")
    gpu_memory_utilization: float = field(0.85, "share of GPU memory the pod may use")
    max_num_seqs: int = field(256, "most sequences in one running batch")
    max_num_batched_tokens: int = field(2048, "token budget of one engine step (prefill chunk size)")
    max_model_len: int | None = field(None, "longest sequence (default: the model's)")
    enable_prefix_caching: bool = field(True, "reuse cached KV blocks across requests")
    cuda_graphs: bool = field(True, "capture decode steps as CUDA graphs")
    token_timeout_s: float = field(120.0, "most seconds a request waits for its next token before it is aborted")
    heartbeat_interval_s: float = field(0.2, "seconds between index publications (heartbeat, KV events)")
    heartbeat_ttl_s: float = field(3.0, "seconds after which a silent pod counts as dead")
    log_level: str = field("info", "logging level")

    def __post_init__(self):
        if self.role not in ("colocated", "decode"):
            raise ValueError(f"role must be colocated or decode, got {self.role!r}")
        if not self.pod_id:
            self.pod_id = f"{self.role}-{socket.gethostname()}-{self.port}"
        if not self.advertise_url:
            host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
            self.advertise_url = f"http://{host}:{self.port}"
