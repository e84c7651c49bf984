"""Every router knob: one name, one default, read from CLI flags (first), BATON_* env vars, defaults.

`--redis-url` is BATON_REDIS_URL, `--pods` is BATON_PODS (comma-separated), and so on: the flag
is the field name with dashes, the env var is BATON_ + the field name in capitals.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from baton.kvindex.schema import DEFAULT_PREFIX
from baton.router.policy import Weights
from baton.router.protocol import MAX_N

_W = Weights()


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_", extra="ignore")

    model: str = Field(
        description="Hugging Face model directory (tokenizer, chat template, config)"
    )
    served_model_name: str | None = Field(
        None, description="name clients use; default: the dir's name"
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, description="HTTP port of the OpenAI API")
    log_level: str = Field("info", description="logging level")

    redis_url: str | None = Field(
        None, description="KV index and pod registry; unset: static pods only"
    )
    redis_prefix: str = Field(DEFAULT_PREFIX, description="key prefix of the index and registry in Redis")
    # Short: a lookup sits on every request's path; a slow Redis costs a cache-blind pick, not latency.
    redis_timeout_s: float = Field(
        0.1, description="most seconds one Redis call on a request's path may take (then: load-only routing)")
    redis_retry_s: float = Field(1.0, description="after a Redis error, route load-only this long")
    pods: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="static colocated pod URLs (comma-separated), polled over HTTP",
    )

    policy: Literal["prefix", "round_robin", "least_load"] = Field(
        "prefix", description="how pods are picked: prefix (cached prefix and load), round_robin, least_load")
    block_size: int = Field(16, ge=1, description="KV block size the pods hash with")
    max_model_len: int | None = Field(
        None, description="default: config.json max_position_embeddings"
    )
    w_prefill: float = Field(_W.prefill, description="cost weight of one uncached prompt token (the unit)")
    w_queue: float = Field(_W.queue, description="cost weight of one token queued ahead on the pod")
    w_decode: float = Field(_W.decode, description="cost weight of the pod's running sequences")
    decode_tokens_per_seq: float = Field(
        _W.decode_tokens_per_seq, description="prompt tokens one running sequence costs as much as")

    retries: int = Field(
        2, ge=0, description="other pods tried when one fails before the first token"
    )
    refresh_interval_s: float = Field(0.5, gt=0, description="pod list / load refresh period")
    stale_after_s: float = Field(3.0, gt=0, description="HTTP-polled pod counts as dead after this")
    sweep_interval_s: float = Field(5.0, gt=0, description="purge of dead pods' index entries")
    connect_timeout_s: float = Field(2.0, description="seconds to connect to a pod")
    first_token_timeout_s: float = Field(300.0, description="most seconds from dispatch to a pod's first token")
    token_timeout_s: float = Field(60.0, description="most seconds between two tokens from a pod")

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys (comma-separated); set: /v1/* need `Authorization: Bearer <key>`",
    )
    internal_token: str | None = Field(
        None, description="shared secret sent to pods as X-Baton-Token (set it on the pods too)"
    )
    max_body_bytes: int = Field(16 << 20, ge=0, description="largest request body (413 above); 0: no limit")
    max_n: int = Field(MAX_N, ge=1, le=MAX_N, description="most choices (n) one request may ask for")
    max_tokens_limit: int = Field(
        0, ge=0, description="largest max_tokens a request may ask for (400 above); 0: max_model_len only"
    )
    max_inflight_requests: int = Field(
        0, ge=0, description="requests served at once; more get 429 + Retry-After; 0: no limit"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long requests in flight may run before exit"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v):
        if isinstance(v, str):
            v = v.split(",")
        return [k.strip() for k in v if k.strip()]

    @field_validator("pods", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [u.strip().rstrip("/") for u in v.split(",") if u.strip()]
        return [u.rstrip("/") for u in v]

    @property
    def weights(self) -> Weights:
        return Weights(self.w_prefill, self.w_queue, self.w_decode, self.decode_tokens_per_seq)

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> RouterSettings:
        """Flags given on the command line override env vars, which override defaults."""
        parser = argparse.ArgumentParser(prog="baton router", argument_default=argparse.SUPPRESS)
        for name, f in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            help_ = f"{f.description or ''} (env BATON_{name.upper()})".strip()
            base = _base_type(f.annotation)
            if base is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
            elif base is list:
                parser.add_argument(flag, help=help_)  # comma-separated, split by the validator
            elif typing.get_origin(base) is Literal:
                parser.add_argument(flag, choices=typing.get_args(base), help=help_)
            else:
                parser.add_argument(flag, type=base, help=help_)
        args = vars(parser.parse_args(argv))
        try:
            return cls(**args)
        except ValidationError as e:
            parser.error(str(e))  # exits with the usage line, as a bad flag does


def _base_type(annotation):
    # `float | None` -> float; Annotated[list[str], ...] -> list; Literal stays.
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return list
    return annotation
