"""Turns logits into tokens: the batched device sampler (`sample_batch`).

Each step the engine builds `SamplingTensors` from its sampling rows (params, seed, position)
and calls `sample_batch(logits, tensors, penalty_state)`; tokens, the per-row bad flags and
logprobs stay on the device until the engine reads them. Rows with penalties keep their
token counts in `PenaltyState`, which the engine updates with `append(slots, tokens)` after
each step (on the device, so it works under async scheduling). Randomness and the kept-set
semantics: baton/kernels/sampling_reference.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baton.engine.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from baton.kernels import ops


def new_seed() -> int:
    """A seed for a request that brought none (drawn at admission, logged, so it replays)."""
    return secrets.randbits(63)


def _int64(seed: int) -> int:
    """A 64-bit seed (negative or up to 2**64 - 1) as the int64 with the same low 64 bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def check_logit_bias(params: SamplingParams, vocab_size: int) -> str | None:
    """An error message when logit_bias names a token outside the vocabulary (check at admission:
    on the device such an id would fail the whole step)."""
    for tok in params.logit_bias or ():
        if tok >= vocab_size:
            return f"logit_bias token {tok} is outside the vocabulary (size {vocab_size})"
    return None


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A new host tensor on `device` without waiting for the device: through pinned memory,
    non-blocking. A plain .to() of pageable memory synchronizes the stream, so the host waits
    for the step in flight and async scheduling's overlap is lost (logit_bias and grammar rows
    measured 20% slower on an H200 for it)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class PenaltyState:
    """Per-request token statistics for penalties, on the device, one slot (row) per request.

    Dense [num_slots, V]: int32 counts of each token in the output so far and a bool mask of
    the prompt's tokens, 5 bytes x V per slot (~0.75 MiB at V = 152k; 190 MiB for 256 slots).
    Chosen over a compact per-request token list because a step's update is one scatter of B
    ones, and applying needs one gather of the rows, no rebuilding of [B, V] counts from the
    history each step (a memset of B x V plus a scatter of every past token).
    """

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str):
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)

    def reset(self, slot: int, prompt_ids: Sequence[int], output_ids: Sequence[int] = ()) -> None:
        """Fill a slot for a request: at admission, and after a preemption (from its tokens)."""
        dev = self.counts.device
        self.counts[slot].zero_()
        self.in_prompt[slot].zero_()
        if len(prompt_ids):
            self.in_prompt[slot, to_device(torch.tensor(list(prompt_ids), dtype=torch.int64), dev)] = True
        if len(output_ids):
            ids = to_device(torch.tensor(list(output_ids), dtype=torch.int64), dev)
            self.counts[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def append(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's new token (device tensors [B]; rows may repeat no slot)."""
        self.counts.index_put_(
            (slots.to(torch.int64), tokens.to(torch.int64)),
            torch.ones(tokens.shape, dtype=torch.int32, device=tokens.device), accumulate=True)


@dataclass
class SamplingTensors:
    """One step's per-row sampling parameters, on the device. Build with `build`."""

    temperature: torch.Tensor  # [B] float32; 0 for greedy rows
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    repetition: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64; 0: off
    seeds: torch.Tensor  # [B] int64 (a 64-bit seed's two's complement)
    positions: torch.Tensor  # [B] int64: index of the token being sampled in its sequence
    slots: torch.Tensor  # [B] int64: the row's PenaltyState slot (0 where unused)
    # host facts fixed at build time, so sample_batch never asks the device
    penalized: bool  # some row has a penalty: gather its counts and apply
    bias_ids: torch.Tensor | None  # [B, NB] int64, padded with token 0 and value 0.0
    bias_values: torch.Tensor | None  # [B, NB] float32
    logprob_rows: torch.Tensor | None  # [R] int64: rows that want logprobs
    logprob_ks: list[int]  # per row of logprob_rows: how many top logprobs it wants
    max_top_k: int  # the largest top_k of the rows (0: none), the kernel's hint
    grammar: bool = False  # some row has a structured_output: `bitmask` is set before sampling
    bitmask: torch.Tensor | None = None  # [B, ceil(V/32)] int32 packed allowed tokens (all ones: free rows)

    @classmethod
    def build(
        cls, params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int],
        device: torch.device | str, slots: Sequence[int] | None = None,
        buffers: "SamplingBuffers | None" = None,
    ) -> "SamplingTensors":
        """Two host-to-device copies (floats, ints) plus one for logit_bias when a row has it.
        With `buffers`, the rows land in its persistent buffers (pinned host memory, fixed
        device addresses that a CUDA graph reads); rows past len(params) up to the buffers'
        size are set greedy, so a graph's padding rows cost one argmax pass."""
        B = len(params)
        floats = [[0.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
                  [p.min_p for p in params], [p.presence_penalty for p in params],
                  [p.frequency_penalty for p in params], [p.repetition_penalty for p in params]]
        ints = [[max(p.top_k, 0) for p in params], [_int64(s) for s in seeds], list(positions),
                list(slots) if slots is not None else [0] * B]
        if buffers is not None:
            dev_f, dev_i = buffers.load(floats, ints)
        else:
            dev_f = to_device(torch.tensor(floats, dtype=torch.float32).reshape(6, B), device)
            dev_i = to_device(torch.tensor(ints, dtype=torch.int64).reshape(4, B), device)
        penalized = any(p.penalized for p in params)
        if penalized and slots is None:
            raise ValueError("rows with penalties need their PenaltyState slots")
        bias_ids = bias_values = None
        nb = max((len(p.logit_bias or ()) for p in params), default=0)
        if nb:
            ids = torch.zeros(B, nb, dtype=torch.int64)
            vals = torch.zeros(B, nb, dtype=torch.float32)
            for i, p in enumerate(params):
                for j, (tok, b) in enumerate((p.logit_bias or {}).items()):
                    ids[i, j], vals[i, j] = tok, b
            bias_ids, bias_values = to_device(ids, device), to_device(vals, device)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            *dev_f.unbind(0), *dev_i.unbind(0), penalized=penalized, bias_ids=bias_ids,
            bias_values=bias_values,
            logprob_rows=to_device(torch.tensor(want, dtype=torch.int64), device) if want else None,
            logprob_ks=[params[i].logprobs for i in want],
            max_top_k=max((p.top_k for p in params if not p.greedy), default=0),
            grammar=any(p.structured_output is not None for p in params),
        )

    @property
    def in_graph(self) -> bool:
        """Whether a captured graph's sampler gives these rows' tokens: no logit_bias, no
        penalties and no grammar (those process the logits first, outside the graph)."""
        return self.bias_ids is None and not self.penalized and not self.grammar


class SamplingBuffers:
    """A runner's persistent buffers for one step's per-row sampling parameters: pinned host
    rows copied into device rows of fixed addresses (a CUDA graph's sampler reads them)."""

    def __init__(self, rows: int, device: torch.device):
        cuda = device.type == "cuda"
        self.rows = rows
        self.host_f = torch.zeros(6, rows, dtype=torch.float32, pin_memory=cuda)
        self.host_i = torch.zeros(4, rows, dtype=torch.int64, pin_memory=cuda)
        self.dev_f = torch.zeros(6, rows, dtype=torch.float32, device=device)
        self.dev_i = torch.zeros(4, rows, dtype=torch.int64, device=device)
        self.copied = torch.cuda.Event() if cuda else None  # the host rows' last copy has left
        if cuda:
            self.copied.record()

    def views(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dev_f[:, :n], self.dev_i[:, :n]

    def load(self, floats: list[list[float]], ints: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [0, B) from the lists, the rest greedy; device views of the B rows."""
        B = len(floats[0])
        if self.copied is not None:
            self.copied.synchronize()
        hf, hi = self.host_f.numpy(), self.host_i.numpy()
        if B:
            hf[:, :B] = floats
            hi[:, :B] = ints
        hf[0, B:] = 0.0  # greedy padding
        self.dev_f.copy_(self.host_f, non_blocking=True)
        self.dev_i.copy_(self.host_i, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return self.views(B)


@dataclass
class BatchLogprobs:
    """Logprobs (log_softmax of the raw logits) for the rows that asked, on the device."""

    rows: torch.Tensor  # [R] int64
    ks: list[int]  # host: top logprobs each row wants
    sampled: torch.Tensor  # [R] float32: the sampled token's
    top_ids: torch.Tensor  # [R, max k] int64
    top_logprobs: torch.Tensor  # [R, max k] float32

    @staticmethod
    def cat(a: "BatchLogprobs | None", b: "BatchLogprobs | None", offset: int) -> "BatchLogprobs | None":
        """Two parts' logprobs as one batch's: b's rows come after a's `offset` rows (the
        top columns are padded to the wider part: each row reads only its own k)."""
        if a is None or b is None:
            if b is not None:
                return BatchLogprobs(b.rows + offset, b.ks, b.sampled, b.top_ids, b.top_logprobs)
            return a
        k = max(a.top_ids.shape[1], b.top_ids.shape[1])

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, k - x.shape[1]))

        return BatchLogprobs(torch.cat([a.rows, b.rows + offset]), a.ks + b.ks, torch.cat([a.sampled, b.sampled]),
                             torch.cat([pad(a.top_ids), pad(b.top_ids)]),
                             torch.cat([pad(a.top_logprobs), pad(b.top_logprobs)]))


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64, on the device; 0 on bad rows
    bad: torch.Tensor  # [B] bool: the row's processed logits hold NaN/+inf or nothing finite
    logprobs: BatchLogprobs | None

    def logprob_lists(self) -> list[list[tuple[int, float]] | None]:
        """Per row, the engine's shape: None, or [(sampled id, logprob), (top id, logprob), ...]
        (reads the device: call once the step's tokens are wanted on the host anyway)."""
        out: list[list[tuple[int, float]] | None] = [None] * self.tokens.shape[0]
        lp = self.logprobs
        if lp is None:
            return out
        tokens = self.tokens.index_select(0, lp.rows).tolist()
        sampled, ids, vals = lp.sampled.tolist(), lp.top_ids.tolist(), lp.top_logprobs.tolist()
        for j, row in enumerate(lp.rows.tolist()):
            k = lp.ks[j]
            out[row] = [(tokens[j], sampled[j])] + list(zip(ids[j][:k], vals[j][:k]))
        return out


def process_logits(logits: torch.Tensor, st: SamplingTensors, penalties: PenaltyState | None) -> torch.Tensor:
    """logit_bias, then penalties, then the grammar's token bitmask, on a float32 copy; the
    logits themselves when none applies."""
    if st.bias_ids is None and not st.penalized and st.bitmask is None:
        return logits
    x = logits.float()
    x = x.clone() if x is logits else x
    if st.bias_ids is not None:
        x.scatter_add_(1, st.bias_ids, st.bias_values)
    if st.penalized:
        assert penalties is not None, "a penalised row needs the PenaltyState"
        x = ops.apply_penalties(
            x, penalties.counts.index_select(0, st.slots), penalties.in_prompt.index_select(0, st.slots),
            st.presence, st.frequency, st.repetition)
    if st.bitmask is not None:
        ops.apply_bitmask(x, st.bitmask)
    return x


def batch_logprobs(logits: torch.Tensor, st: SamplingTensors, tokens: torch.Tensor) -> BatchLogprobs | None:
    """Logprobs of the rows that asked, from the raw logits (what the model said, before any
    processing) and the tokens sampled for them; None when no row asked."""
    if st.logprob_rows is None:
        return None
    logp = torch.log_softmax(logits.index_select(0, st.logprob_rows).float(), dim=-1)
    sampled = logp.gather(1, tokens.index_select(0, st.logprob_rows)[:, None])[:, 0]
    top = torch.topk(logp, max(st.logprob_ks), dim=-1)
    return BatchLogprobs(st.logprob_rows, st.logprob_ks, sampled, top.indices, top.values)


def sample_batch(logits: torch.Tensor, st: SamplingTensors, penalties: PenaltyState | None = None) -> SamplerOutput:
    """Tokens for every row of logits [B, V] (float32 or bf16) in one pass, greedy and sampled
    rows alike; nothing here waits for the device."""
    x = process_logits(logits, st, penalties)
    tokens, bad = ops.sample_tokens(
        x, st.temperature, st.top_k, st.top_p, st.min_p, st.seeds, st.positions, GREEDY_TEMPERATURE,
        st.max_top_k)
    return SamplerOutput(tokens, bad, batch_logprobs(logits, st, tokens))
