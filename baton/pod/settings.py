"""Settings every pod shares: the engine's own options (inherited from EngineConfig, one
default each) plus where the pod listens, registers and how it drains.

Read as every service's settings are (baton/settings.py): flag, then BATON_* variable, then
default. Each pod service adds its own fields in its own settings.py.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, fields
from urllib.parse import urlparse

from baton.engine.config import EngineConfig
from baton.sim.config import SimConfig
from baton.settings import field


@dataclass
class PodSettings(SimConfig, EngineConfig):  # SimConfig: --engine sim and its timing
    model: str = field("", "model directory (default: the converted SmolLM2)")
    model_name: str = field("", "name served to clients (default: the directory's name)")
    host: str = field("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = field(8100, "HTTP port of the internal API")
    advertise_url: str = field("", "URL the router and other pods use to reach this pod (default http://HOST:PORT)")
    pod_id: str = field("", "unique pod id in the registry (default ROLE-HOSTNAME-PORT)")
    redis_url: str = field("", "Redis of the KV index and pod registry (redis://h:p, or redis+cluster://h1:p1,h2:p2/?shards=N: a Redis Cluster, sharded by pod); empty: do not register")
    heartbeat_interval_s: float = field(0.2, "seconds between index publications (heartbeat, KV events)")
    heartbeat_ttl_s: float = field(3.0, "seconds after which a silent pod counts as dead")
    log_level: str = field("info", "logging level")
    internal_token: str = field(
        "", "shared secret: peers send it as X-Baton-Token to /internal/*, it signs this pod's registry "
        "record and opens UCX connections; empty: /internal/* refused unless --insecure-internal")
    insecure_internal: bool = field(
        False, "without an internal token, serve /internal/* to anyone who reaches the port, and trust "
        "unsigned registry records (tests, a single-user machine); ignored when a token is set")
    drain_timeout_s: float = field(30.0, "on SIGTERM, how long requests in flight may run before exit")
    stream_stall_timeout_s: float = field(
        30.0, "seconds a stream may go unread (its reader stopped reading) before the request is aborted "
        "and its KV freed; 0: never")

    def resolve(self, role: str) -> None:
        """Fill the defaults that depend on the machine and the role."""
        if not self.model:
            from baton.modelzoo.smollm2 import get_model

            self.model = str(get_model("smollm2"))
        else:  # a directory as given, or a Hugging Face repo id, served under that id
            from baton.modelzoo.resolve import check_supported, resolve_model

            resolved = resolve_model(self.model)
            check_supported(resolved.path)
            self.model, self.model_name = str(resolved.path), self.model_name or resolved.name
        if not self.pod_id:
            self.pod_id = f"{role}-{socket.gethostname()}-{self.port}"
        if not self.advertise_url:
            self.advertise_url = f"http://{self.advertise_host}:{self.port}"

    @property
    def advertise_host(self) -> str:
        """The host others reach this pod at (its UCX listener too): advertise_url's, if given."""
        if self.advertise_url:
            return urlparse(self.advertise_url).hostname or self.host
        return socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})
