"""Settings of a decode (or colocated) pod: the shared pod settings plus its own."""

from __future__ import annotations

from dataclasses import dataclass

from baton.pod.settings import PodSettings
from baton.settings import field


@dataclass
class DecodeSettings(PodSettings):
    role: str = field("colocated", "colocated (prefills itself) or decode (takes KV from prefill pods)")
    token_timeout_s: float = field(120.0, "most seconds a request waits for its next token before it is aborted")
    ucx_port: int = field(13337, "UCX listener port for KV from prefill pods (role decode; 0: any)")
    kv_setup_timeout_s: float = field(10.0, "seconds from reserving blocks until the prefill pod starts pushing")
    kv_transfer_timeout_s: float = field(30.0, "seconds a whole KV transfer may take before local prefill")
    prefill_urls: list[str] = field(
        [], "prefill pods this pod may call besides the registry's verified ones (comma-separated); "
        "any other prefill.url is not called: the pod prefills itself")

    def __post_init__(self):
        if self.role not in ("colocated", "decode"):
            raise ValueError(f"role must be colocated or decode, got {self.role!r}")
