"""One choice's output: pod token ids in, OpenAI text deltas and logprobs out.

Detokenizes incrementally, applies stop strings to the text, and shapes logprobs the way the
chat (`logprobs.content`) and completions (`tokens`/`token_logprobs`/...) APIs want them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from baton.router.stop import StopStrings


@dataclass
class Delta:
    text: str
    logprobs: list[list[list[float]]] | None  # the pod's entries for the tokens of this delta
    finish_reason: str | None = None


@dataclass
class ChoiceOutput:
    tok: Tokenizer
    prompt_ids: list[int]
    stops: list[str]
    want_logprobs: bool
    num_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list = field(default_factory=list)  # every token's pod entry, in order

    def __post_init__(self):
        self._detok = IncrementalDetokenizer(self.tok, self.prompt_ids)
        # without stop strings every text goes out as it comes (StopStrings would copy the
        # whole text so far on every push to find nothing)
        self._stop = StopStrings(self.stops) if any(self.stops) else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, line: dict) -> Delta:
        """One NDJSON line from the pod. After a stop string, `finish_reason` is "stop" and the
        caller must close the pod stream (the pod may still be generating)."""
        ids = line.get("token_ids") or []
        self.num_tokens += len(ids)
        self.num_cached_tokens = max(
            self.num_cached_tokens, int(line.get("num_cached_tokens") or 0)
        )
        lps = line.get("logprobs") if self.want_logprobs else None
        if lps:
            self.logprobs += lps
        pod_finish = line.get("finish_reason")
        text = self._detok.push(ids) if ids else ""
        if pod_finish is not None:
            text += self._detok.finish()
        out = text if self._stop is None else self._stop.push(text, final=pod_finish is not None)
        self.text += out
        if self._stop is not None and self._stop.stopped:
            self.finish_reason = "stop"
        elif pod_finish is not None:
            self.finish_reason = pod_finish
        return Delta(out, lps if self.want_logprobs else None, self.finish_reason)


def _tok_str(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, entries: list) -> dict:
    """Pod entries ([[id, lp], [alt, lp], ...] per token) -> chat's {"content": [...]}."""
    content = []
    for entry in entries:
        (tid, lp), alts = entry[0], entry[1:]
        s = _tok_str(tok, tid)
        content.append(
            {
                "token": s,
                "logprob": lp,
                "bytes": list(s.encode()),
                "top_logprobs": [
                    {"token": (a := _tok_str(tok, i)), "logprob": alp, "bytes": list(a.encode())}
                    for i, alp in alts
                ],
            }
        )
    return {"content": content}


def completion_logprobs(tok: Tokenizer, entries: list, text_offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for entry in entries:
        (tid, lp), alts = entry[0], entry[1:]
        s = _tok_str(tok, tid)
        tokens.append(s)
        token_lps.append(lp)
        tops.append({_tok_str(tok, i): alp for i, alp in alts})
        offsets.append(text_offset)
        text_offset += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
