"""Benchmark workloads: pure functions from (request count, seed, lengths) to sessions of turns.

A `Session` is what one simulated user sends: one turn for the single-shot workloads, several
for `multi-turn` (where each next request carries the previous answer, known only at run time;
payload.py puts them together). Prompts are random common English words, about one token each
in any BPE vocabulary; with a tokenizer, `PromptMaker` cuts them to an exact token count, as
token ids (for /v1/completions) or as text that encodes back to exactly that many tokens.

Same arguments, same sessions: every draw comes from a `random.Random` seeded here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Common short English words: a space plus the word is one token in GPT-2, Llama, Qwen vocabularies.
WORDS = tuple(
    """
the of and to in is was that for on with as by at from his her they this have not are but
had which one you were all there we can been has more will when who their would new some
time year people way day man thing woman life child world school state family group country
problem hand part place case week company system program question work government number
night point home water room mother area money story fact month lot right study book eye job
word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education foot boy age policy
music market sense nation plan college interest death experience effect class control
""".split()  # noqa: SIM905 (a word list reads best as text)
)

WORKLOADS = ("random", "shared-prefix", "multi-turn", "mixed")

Range = tuple[int, int]  # inclusive bounds of a uniform draw
Content = str | tuple[int, ...]  # prompt text, or exact token ids


@dataclass(frozen=True)
class Turn:
    content: Content  # the user's new input of this turn
    input_tokens: int  # tokens the workload meant `content` to have
    output_tokens: int  # max_tokens of this turn's request


@dataclass(frozen=True)
class Session:
    id: int
    turns: tuple[Turn, ...]
    system: Content | None = None  # system prompt (shared by a tenant's sessions)
    tenant: int | None = None


def parse_range(s: str) -> Range:
    """'256' -> (256, 256); '128:512' -> (128, 512)."""
    lo, _, hi = s.partition(":")
    r = (int(lo), int(hi or lo))
    if r[0] < 1 or r[1] < r[0]:
        raise ValueError(f"bad length range {s!r}: want N or LO:HI with 1 <= LO <= HI")
    return r


class PromptMaker:
    """Random-word prompts of a given token count: about right without a tokenizer, exact with one.

    `as_ids` (needs a tokenizer) makes token-id tuples, sent as /v1/completions' `prompt`;
    otherwise text, which with a tokenizer encodes (without special tokens) to exactly n tokens.
    """

    def __init__(self, tokenizer=None, as_ids: bool = False):
        if as_ids and tokenizer is None:
            raise ValueError("token-id prompts need a tokenizer")
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    def make(self, rng: random.Random, n: int) -> Content:
        if self.tokenizer is None:
            return " ".join(rng.choices(WORDS, k=n))
        ids = self._ids(rng, n)
        return tuple(ids) if self.as_ids else self._exact_text(rng, ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _ids(self, rng: random.Random, n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:  # a word is at least one token in practice; loop for safety
            ids += self.encode(" " + " ".join(rng.choices(WORDS, k=n - len(ids))))
        return ids[:n]

    def _exact_text(self, rng: random.Random, ids: list[int]) -> str:
        # decode(ids[:n]) can re-encode to n +- 1 tokens where a cut splits a word or a merge
        # differs; trimming or growing by one word converges in a few steps.
        n = len(ids)
        text = self.tokenizer.decode(ids)
        for _ in range(16):
            got = self.encode(text)
            if len(got) == n:
                return text
            if len(got) > n:
                text = self.tokenizer.decode(got[:n])
            else:
                text += " " + rng.choice(WORDS)
        raise ValueError(f"could not make text of exactly {n} tokens with this tokenizer")


def _draw(rng: random.Random, r: Range) -> int:
    return rng.randint(r[0], r[1])


def random_workload(num_requests: int, seed: int, maker: PromptMaker,
                    input_len: Range = (256, 256), output_len: Range = (128, 128)) -> list[Session]:
    rng = random.Random(seed)
    sessions = []
    for i in range(num_requests):
        n_in, n_out = _draw(rng, input_len), _draw(rng, output_len)
        sessions.append(Session(i, (Turn(maker.make(rng, n_in), n_in, n_out),)))
    return sessions


def shared_prefix_workload(num_requests: int, seed: int, maker: PromptMaker, tenants: int = 8,
                           system_tokens: int = 1024, question_len: Range = (64, 64),
                           output_len: Range = (128, 128)) -> list[Session]:
    """`tenants` system prompts; each request is one tenant's prompt plus its own question.

    Tenants take turns in a shuffled order, so consecutive requests mostly differ in tenant
    (what a prefix-aware router must sort out) while each tenant gets num_requests/tenants.
    """
    if tenants < 1:
        raise ValueError("tenants must be at least 1")
    rng = random.Random(seed)
    systems = [maker.make(rng, system_tokens) for _ in range(tenants)]
    order = [i % tenants for i in range(num_requests)]
    rng.shuffle(order)
    sessions = []
    for i, t in enumerate(order):
        n_in, n_out = _draw(rng, question_len), _draw(rng, output_len)
        sessions.append(Session(i, (Turn(maker.make(rng, n_in), n_in, n_out),), systems[t], t))
    return sessions


def multi_turn_workload(num_requests: int, seed: int, maker: PromptMaker, turns: int = 4,
                        input_len: Range = (64, 64), output_len: Range = (128, 128),
                        system_tokens: int = 0) -> list[Session]:
    """Conversations of `turns` turns (the last one shorter) holding num_requests turns in all."""
    if turns < 1:
        raise ValueError("turns must be at least 1")
    rng = random.Random(seed)
    sessions = []
    left = num_requests
    while left > 0:
        k = min(turns, left)
        system = maker.make(rng, system_tokens) if system_tokens else None
        ts = []
        for _ in range(k):
            n_in, n_out = _draw(rng, input_len), _draw(rng, output_len)
            ts.append(Turn(maker.make(rng, n_in), n_in, n_out))
        sessions.append(Session(len(sessions), tuple(ts), system))
        left -= k
    return sessions


def mixed_workload(num_requests: int, seed: int, maker: PromptMaker, long_input: Range = (2048, 2048),
                   short_output: Range = (16, 16), short_input: Range = (64, 64),
                   long_output: Range = (512, 512), long_share: float = 0.5) -> list[Session]:
    """DistServe's mix: prefill-heavy requests (long prompt, short answer) among decode-heavy
    ones (short prompt, long answer); `long_share` of them prefill-heavy, in random order."""
    if not 0.0 <= long_share <= 1.0:
        raise ValueError("long_share must be within [0, 1]")
    rng = random.Random(seed)
    n_long = round(num_requests * long_share)
    kinds = [True] * n_long + [False] * (num_requests - n_long)
    rng.shuffle(kinds)
    sessions = []
    for i, heavy_prefill in enumerate(kinds):
        n_in = _draw(rng, long_input if heavy_prefill else short_input)
        n_out = _draw(rng, short_output if heavy_prefill else long_output)
        sessions.append(Session(i, (Turn(maker.make(rng, n_in), n_in, n_out),)))
    return sessions


def request_count(sessions: list[Session]) -> int:
    return sum(len(s.turns) for s in sessions)
