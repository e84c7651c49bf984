"""Every router knob: one name, one default, read from CLI flags (first), BATON_* env vars, defaults.

Read as every service's settings are (baton/settings.py): `--redis-url` is BATON_REDIS_URL,
`--pods` is BATON_PODS (comma-separated), and so on. The block size and the context length
are not router knobs: the router uses what the pods publish (pods.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baton.kvindex.schema import DEFAULT_PREFIX
from baton.router.defaults import OPERATOR_KEYS, parse_override
from baton.router.policy import Weights
from baton.router.protocol import MAX_N
from baton.settings import field, parse_settings

_W = Weights()


@dataclass
class RouterSettings:
    model: str = field("", "Hugging Face model directory (tokenizer, chat template, config); required")
    served_model_name: str | None = field(None, "name clients use; default: the dir's name")
    host: str = field("0.0.0.0", "address to listen on")
    port: int = field(8000, "HTTP port of the OpenAI API")
    log_level: str = field("info", "logging level")

    redis_url: str | None = field(None, "KV index and pod registry (redis://h:p, or redis+cluster://h1:p1,h2:p2/?shards=N for the index sharded by pod over a Redis Cluster); unset: static pods only")
    redis_prefix: str = field(DEFAULT_PREFIX, "key prefix of the index and registry in Redis")
    # Short: a lookup sits on every request's path; a slow Redis costs a cache-blind pick, not latency.
    redis_timeout_s: float = field(
        0.1, "most seconds one Redis call on a request's path may take (then: load-only routing)")
    redis_retry_s: float = field(1.0, "after a Redis error, route load-only this long")
    pods: list[str] = field([], "static colocated pod URLs (comma-separated), polled over HTTP")

    policy: Literal["prefix", "round_robin", "least_load"] = field(
        "prefix", "how pods are picked: prefix (cached prefix and load), round_robin, least_load")
    max_model_len: int | None = field(
        None, "cap on prompt + completion tokens; default: what the pods publish "
        "(before any has: config.json max_position_embeddings)")
    w_prefill: float = field(_W.prefill, "cost weight of one uncached prompt token (the unit)")
    w_queue: float = field(_W.queue, "cost weight of one token queued ahead on the pod")
    w_decode: float = field(_W.decode, "cost weight of the pod's running sequences")
    decode_tokens_per_seq: float = field(
        _W.decode_tokens_per_seq, "prompt tokens one running sequence costs as much as")

    retries: int = field(2, "other pods tried when one fails before the first token")
    refresh_interval_s: float = field(0.5, "pod list / load refresh period")
    stale_after_s: float = field(3.0, "HTTP-polled pod counts as dead after this")
    sweep_interval_s: float = field(5.0, "purge of dead pods' index entries")
    connect_timeout_s: float = field(2.0, "seconds to connect to a pod")
    first_token_timeout_s: float = field(300.0, "most seconds from dispatch to a pod's first token")
    token_timeout_s: float = field(60.0, "most seconds between two tokens from a pod")
    workers: int = field(
        1, "router processes on one port (SO_REUSEPORT): each has its own pods' view, the load "
        "accounting is shared through Redis as between routers; > 1 needs a fixed --port")
    reuse_port: bool = field(False, "bind with SO_REUSEPORT (what --workers sets for its processes)")
    pod_channels: bool = field(
        True, "one connection per pod for all of this router's requests there (the pod writes one "
        "frame per engine step for all of them); --no-pod-channels: one stream per request")
    stream_stall_timeout_s: float = field(
        30.0, "seconds a client may leave its stream unread before its pod stream is closed (aborting "
        "the request there); meanwhile the router stops pulling from the pod")

    api_keys: list[str] = field(
        [], "accepted API keys (comma-separated); set: /v1/* need `Authorization: Bearer <key>`")
    internal_token: str | None = field(
        None, "shared secret sent to pods as X-Baton-Token (set it on the pods too)")
    max_body_bytes: int = field(16 << 20, "largest request body (413 above); 0: no limit")
    # Bounded work per request (issue 25): a request's jobs are prompts x n, each a pod stream.
    max_prompts: int = field(64, "most prompts one /v1/completions request may carry (400 above)")
    max_choices: int = field(
        256, "most choices one request may ask for: prompts x n (400 above)")
    fan_out: int = field(16, "choices of one request running on pods at once (the rest wait)")
    tokenizer_threads: int = field(
        2, "threads that tokenize and render chat templates off the event loop (texts over 256 bytes)")
    body_timeout_s: float = field(
        30.0, "most seconds a client may take to send a /v1 request body (then 408)")
    header_timeout_s: float = field(
        10.0, "most seconds a connection may take to send a request's headers (then closed)")
    max_connections: int = field(
        4096, "open connections the server keeps; more are answered 503")
    metrics_without_key: bool = field(
        False, "serve /metrics without an API key (a scraper on a trusted network); off: "
        "with api_keys set, /metrics, /docs and /openapi.json need a key like /v1/*")
    cache_salt_by_key: bool = field(
        False, "salt the prefix cache by API key: one key's cached prompts are invisible "
        "(no hits, no cached_tokens) to another's")
    special_tokens_in_content: bool = field(
        False, "parse special-token text in message content as control tokens (unsafe: "
        "a user can forge role boundaries); off: content is plain text")
    max_n: int = field(MAX_N, "most choices (n) one request may ask for")
    max_tokens_limit: int = field(
        0, "largest max_tokens a request may ask for (400 above); 0: max_model_len only")
    # Without it a chat request that names no limit may run to the end of the context: minutes
    # of tokens for a question whose answer is one line (issue 24).
    default_max_tokens: int = field(
        1024, "max_tokens of a chat request that gives none (capped by the room left); "
        "0: all the room left. Completions keep OpenAI's 16")
    default_sampling: str | None = field(
        None, "JSON object of sampling defaults for fields a request omits, over the model's "
        "generation_config.json, e.g. '{\"temperature\": 0.2}' (keys: " + ", ".join(OPERATOR_KEYS) + ")")
    max_inflight_requests: int = field(
        0, "requests served at once; more get 429 + Retry-After; 0: no limit")
    drain_timeout_s: float = field(
        30.0, "on SIGTERM, how long requests in flight may run before exit")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a model directory is required (--model or BATON_MODEL)")
        self.pods = [u.strip().rstrip("/") for u in self.pods if u.strip()]
        self.api_keys = [k.strip() for k in self.api_keys if k.strip()]
        self.sampling_override  # noqa: B018 -- a bad --default-sampling stops the start, readably
        for name in ("retries", "max_body_bytes", "max_tokens_limit", "default_max_tokens",
                     "max_inflight_requests"):
            _at_least(self, name, 0)
        for name in ("max_prompts", "max_choices", "fan_out", "tokenizer_threads", "max_connections"):
            _at_least(self, name, 1)
        for name in ("body_timeout_s", "header_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)}")
        _at_least(self, "drain_timeout_s", 0)
        for name in ("refresh_interval_s", "stale_after_s", "sweep_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)}")
        if not 1 <= self.max_n <= MAX_N:
            raise ValueError(f"max_n must be between 1 and {MAX_N}, got {self.max_n}")

    @property
    def sampling_override(self) -> dict[str, float | int]:
        return parse_override(self.default_sampling)

    @property
    def weights(self) -> Weights:
        return Weights(self.w_prefill, self.w_queue, self.w_decode, self.decode_tokens_per_seq)

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> RouterSettings:
        """Flags given on the command line override env vars, which override defaults."""
        return parse_settings(cls, argv, "baton router", "Start the OpenAI-compatible router.")


def _at_least(s: RouterSettings, name: str, low: float) -> None:
    if getattr(s, name) < low:
        raise ValueError(f"{name} must be at least {low}, got {getattr(s, name)}")
