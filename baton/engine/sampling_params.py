"""Sampling parameters of one request (torch-free: the router builds them too)."""

from __future__ import annotations

from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5  # a temperature below this samples greedily


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0  # keep tokens with prob >= min_p * the top token's prob; 0: off
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and top k
    # OpenAI's: subtract presence_penalty once and frequency_penalty per occurrence of a token
    # in the output so far; vLLM's repetition_penalty over prompt + output (> 1 discourages)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # {token id: added to its logit}, applied first
    # constrained decoding (baton/engine/grammar.py), one of: {"type": "json_schema", "schema":
    # {...}, "strict": bool}, {"type": "json_object"}, {"type": "ebnf", "grammar": "root ::= ..."}
    # (xgrammar's EBNF), {"type": "regex", "pattern": "..."}; checked for shape here, compiled by the pod
    structured_output: dict | None = None
    # vLLM's cache_salt: mixed into the first block's hash (the block manager's, the router's
    # index lookups), so only requests with the same salt share cached prefix blocks
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:  # vLLM's range: no upper bound
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logit_bias:
            # JSON (OpenAI's API, the pods' wire form) carries the token ids as strings
            try:
                self.logit_bias = {int(tok): float(bias) for tok, bias in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
            for tok, bias in self.logit_bias.items():
                if tok < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {tok!r}")
                if not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for {tok}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.structured_output is not None:
            check_structured_output(self.structured_output)
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(self.cache_salt).__name__}")

    @property
    def greedy(self) -> bool:
        # below GREEDY_TEMPERATURE, x / T overflows or turns into NaN: the argmax is the answer
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


# structured_output's types and the fields each must (and may) carry, with their types
_STRUCTURED_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "json_schema": {"schema": (dict, True), "strict": (bool, False)},
    "json_object": {},
    "ebnf": {"grammar": (str, True)},
    "regex": {"pattern": (str, True)},
}


def check_structured_output(spec) -> None:
    """ValueError unless `spec` has one of structured_output's shapes (not whether it compiles)."""
    if not isinstance(spec, dict) or spec.get("type") not in _STRUCTURED_FIELDS:
        got = spec.get("type") if isinstance(spec, dict) else spec
        raise ValueError(f"structured_output type must be one of {', '.join(_STRUCTURED_FIELDS)}, got {got!r}")
    fields = _STRUCTURED_FIELDS[spec["type"]]
    for name in spec.keys() - {"type"} - fields.keys():
        raise ValueError(f"structured_output of type {spec['type']} takes no field {name!r}")
    for name, (kind, required) in fields.items():
        if name not in spec:
            if required:
                raise ValueError(f"structured_output of type {spec['type']} needs {name!r}")
        elif not isinstance(spec[name], kind):
            raise ValueError(f"structured_output {name!r} must be a {kind.__name__}, got {type(spec[name]).__name__}")
