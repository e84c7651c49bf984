"""Structured outputs: a request's `structured_output` as an xgrammar grammar, its matcher, and
the packed token bitmask of the next step.

`Grammars` (one per engine) compiles specs with the model's tokenizer, cached by spec (LRU);
`GrammarState` (one per request) holds the xgrammar matcher and how many of the request's
output tokens it has accepted, so it catches up (or rebuilds) from the tokens alone: after a
preemption, on a decode pod whose first token came from a prefill pod, or under async
scheduling where a token is read back one step late. xgrammar is imported on first use.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

CACHE_SIZE = 128  # compiled grammars kept per engine
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[13:44:45] /project/cpp/x.cc:94: "


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a packed token bitmask (bit t of the row: token t allowed)."""
    return -(-vocab_size // 32)


def fill_threads() -> int:
    """Threads for xgrammar's batched fill: the CPUs this process may run on but two (the
    engine thread waits on the fill; the rest is for the pod's event loop), at most 16. The
    fill is on the step's critical path: on an H200 host a batch of 64 JSON rows took 14 ms on
    one thread, 2 ms on 8. xgrammar's own default, half of std::thread::hardware_concurrency(),
    counts the whole host, which inside a container limited to a few cores oversubscribes them."""
    return max(1, min(16, len(os.sched_getaffinity(0)) - 2))


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _message(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _XGR_PREFIX.sub("", first)


class Grammars:
    """Compiled grammars of one model, by spec; thread-safe (the pods compile at validation)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, stop_token_ids: list[int], capacity: int = CACHE_SIZE):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size  # the logits' width, may exceed the tokenizer's vocabulary
        self.stop_token_ids = list(stop_token_ids)
        self.capacity = capacity
        self._compiler = None
        self._batch = None  # xgrammar's BatchGrammarMatcher, made on first use
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            encoded = [""] * self.vocab_size
            for s, i in tok.get_vocab(with_added_tokens=True).items():
                if i < self.vocab_size:
                    encoded[i] = s
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
            info = xgr.TokenizerInfo(encoded, vocab_type=meta["vocab_type"], vocab_size=self.vocab_size,
                                     stop_token_ids=self.stop_token_ids, add_prefix_space=meta["add_prefix_space"])
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, spec: dict):
        """The compiled grammar of a spec (see SamplingParams.structured_output); ValueError
        naming what xgrammar cannot take."""
        key = spec_key(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            comp = self._get_compiler()
        kind = spec["type"]
        try:
            # no free whitespace: small models given room for it fill max_tokens with newlines;
            # strict_mode (no properties the schema does not name) whatever `strict` says
            if kind == "json_schema":
                compiled = comp.compile_json_schema(json.dumps(spec["schema"]), any_whitespace=False, strict_mode=True)
            elif kind == "json_object":
                compiled = comp.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif kind == "ebnf":
                compiled = comp.compile_grammar(spec["grammar"])
            else:
                compiled = comp.compile_regex(spec["pattern"])
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json_schema": "JSON schema", "ebnf": "grammar", "regex": "regex"}.get(kind, kind)
            raise ValueError(f"structured output: the {what} is not supported: {_message(e)}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled

    def fill(self, states: list["GrammarState"], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill bitmask row rows[i] from states[i]: one call, the rows on xgrammar's threads
        (one matcher after another took longer than a batch-64 forward on an H200)."""
        if len(states) == 1:
            states[0].fill(bitmask, rows[0])
            return
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(fill_threads())
        self._batch.batch_fill_next_token_bitmask([g.matcher for g in states], bitmask, rows)

    def new_state(self, spec: dict) -> "GrammarState":
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=self.stop_token_ids))


class GrammarState:
    """One request's matcher and the number of its output tokens it has accepted."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.accepted = 0
        self.rejected: int | None = None  # a token the grammar did not allow (the request fails)

    def sync(self, token_ids: list[int], start: int = 0, end: int | None = None) -> bool:
        """Accept the output tokens token_ids[start:end] not accepted yet (fewer than were
        accepted rebuilds the matcher from them); False when one is not allowed. No slice is
        copied: a long output costs only its new tokens each step."""
        end = len(token_ids) if end is None else end
        if end - start < self.accepted:
            self.matcher.reset()
            self.accepted = 0
        for i in range(start + self.accepted, end):
            if not self.advance(token_ids[i]):
                self.rejected = token_ids[i]
                return False
        return True

    def advance(self, token: int) -> bool:
        """Accept one more output token; False (the matcher unchanged) when it is not allowed."""
        if self.matcher.is_terminated() or not self.matcher.accept_token(token):
            return False
        self.accepted += 1
        return True

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of the packed bitmask: the tokens the grammar allows next."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
