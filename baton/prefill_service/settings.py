"""Settings of a prefill pod: the shared pod settings plus how it pushes KV."""

from __future__ import annotations

from dataclasses import dataclass

from baton.pod.settings import PodSettings
from baton.settings import field


@dataclass
class PrefillSettings(PodSettings):
    port: int = field(8200, "HTTP port of the internal API")
    ucx_connect_timeout_s: float = field(5.0, "seconds to connect to a decode pod's UCX listener")
    transfer_timeout_s: float = field(30.0, "seconds one request's whole push may take")
    max_inflight_bytes: int = field(1 << 30, "KV bytes pushed and not yet sent, all requests together")
    max_inflight_messages: int = field(16, "KV messages UCX sends at once, all requests together")
    min_message_bytes: int | None = field(
        None, "layers smaller than this travel several to a message (default: 16 MiB on a GPU, 1 MiB on CPU)")
    same_gpu_min_message_bytes: int = field(
        64 << 20, "min_message_bytes for a decode pod on this pod's own GPU (each message it copies "
        "takes the GPU from this pod for a moment: fewer, larger messages)")
