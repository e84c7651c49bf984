"""LLMEngine: requests in, one step at a time, token outputs out.

`step()` asks the scheduler, runs the model, samples and hands tokens back to the
scheduler; data flows one way. Not thread-safe: the services drive it from one thread.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from baton.engine.block_manager import BlockManager, KVEvents
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.model_runner import ModelRunner
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from baton.engine.sequence import PENDING, Sequence, Status
from baton.kvindex.hashing import BlockHash, model_identity, model_seed

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class Reservation:
    """Blocks a decode pod holds for a prompt whose KV a prefill pod computes.

    KV of tokens [start, end) travels (end is the prompt's length); `slots` are their slots
    in this pod's cache. The prefill pod samples the first token and sends it along.
    """

    request_id: str
    start: int
    end: int
    slots: torch.Tensor


@dataclass
class FirstToken:
    """The token a prefill pod sampled after the prompt, with what the decode pod needs to
    go on exactly as a colocated pod would: its logprobs and the sampling generator's state
    after the draw (None for greedy requests)."""

    token: int
    logprobs: list[tuple[int, float]] | None = None  # [(token, logprob), (top id, logprob), ...]
    generator_state: bytes | None = None


class KVPush(Protocol):
    """The prefill→decode hand-off, worker side on a prefill engine (passed in at construction).

    Both run on the engine thread: `push_layer` right after a layer of a step computed the
    last chunk of prefill-only requests (kv [2, n, Hkv, D], tokens [kv_start, end)), and
    `first_token` once that step's token is sampled. They must not block.
    """

    def push_layer(self, request_id: str, layer: int, kv: torch.Tensor) -> None: ...

    def first_token(self, request_id: str, first: FirstToken) -> None: ...


@dataclass
class EngineStats:
    running: int
    waiting: int
    receiving: int  # reservations waiting for KV from a prefill pod
    waiting_prefill_tokens: int
    free_blocks: int
    total_blocks: int
    cached_blocks: int


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, kv_push: KVPush | None = None):
        self.config = config = config or EngineConfig()
        self.model_dir = str(model_dir)
        self.model_cfg = ModelConfig.from_dir(model_dir)
        max_len = config.max_model_len or self.model_cfg.max_position_embeddings
        self.runner = ModelRunner(self.model_dir, self.model_cfg, config, max_len)
        # a sequence must fit the whole cache, or it could never run alone
        self.max_model_len = min(max_len, self.runner.num_blocks * config.block_size)
        self.seed = model_seed(model_identity(model_dir))
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, self.seed, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.batched_tokens(self.runner.device.type)
        )
        self.seqs: dict[str, Sequence] = {}
        self.kv_push = kv_push  # prefill pods: where prefill-only requests' KV and first token go
        self.reservations: dict[str, Reservation] = {}  # decode pods: KV arriving from prefill pods
        self._inflight: tuple[list[ScheduledSeq], object] | None = None  # a launched step, tokens unread
        self._arrival = itertools.count()
        self._default_seeds = torch.Generator().manual_seed(config.seed)
        log.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
            self.model_cfg.architecture, self.runner.device, self.runner.dtype,
            self.runner.num_blocks, config.block_size, self.max_model_len,
        )

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # -- requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                f"and at least one must be left to generate"
            )
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.model_cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.model_cfg.vocab_size - 1})")

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prefill_only: bool = False, kv_start: int = 0,
    ) -> None:
        """Queue a request. `prefill_only`: compute the prompt's KV, sample one token and end
        ("prefilled"); tokens [kv_start, len) go to `kv_push` layer by layer, then the token."""
        seq = self._new_seq(request_id, prompt_token_ids, params)
        seq.prefill_only, seq.kv_start = prefill_only, kv_start
        if prefill_only and not 0 <= kv_start < len(prompt_token_ids):
            raise ValueError(f"kv_start {kv_start} outside the prompt (0..{len(prompt_token_ids) - 1})")
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def _new_seq(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(
                torch.randint(0, 2**62, (1,), generator=self._default_seeds)
            )
            gen = torch.Generator(device=self.device).manual_seed(seed)
        return Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, next(self._arrival), gen)

    # -- decode pods: KV computed elsewhere ----------------------------------------------
    def reserve_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Reservation | None:
        """Hold blocks for a prompt whose KV a prefill pod sends; this pod's own prefix
        hits stay, so only the missing tokens travel. None when the cache has no room now
        (the caller prefills locally instead)."""
        seq = self._new_seq(request_id, prompt_token_ids, params)
        bm = self.block_manager
        hits = bm.prefix_hits(seq)
        if bm.admit_room(hits) < seq.num_tokens - len(hits) * bm.block_size:
            return None
        bm.admit(seq, hits)
        bm.allocate(seq, seq.num_tokens)
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.status = Status.REMOTE
        self.seqs[request_id] = seq
        start, end = seq.num_computed_tokens, seq.num_tokens
        res = self.reservations[request_id] = Reservation(request_id, start, end, self.runner.slots(seq, start, end))
        return res

    def receive_layer(self, request_id: str, layer: int, kv: torch.Tensor):
        """Worker side of the hand-off on a decode engine: write one received layer of KV
        (tokens [start, end), [2, n, Hkv, D]) into the reservation's blocks. Returns what
        tells when the write is done (a CUDA event, or None when it already is); the caller
        keeps `kv` alive until then. A reservation already ended is not written."""
        res = self.reservations.get(request_id)
        if res is None:
            return None
        return self.runner.write_kv(layer, kv, res.slots)

    def _end_reservation(self, request_id: str) -> None:
        # later kernels (the request's decode steps, or the blocks' next owner) run after
        # every write into the reservation's blocks
        if self.reservations.pop(request_id, None) is not None:
            self.runner.after_kv_writes()

    def complete_remote(self, request_id: str, first: FirstToken | None = None) -> list[RequestOutput] | None:
        """The reservation's KV is in: the request joins the running batch.

        With `first` (every layer arrived), the prompt counts as computed and its first
        token as sampled; the returned output carries that token. Without it, this pod
        computes what the reservation holds beyond its own hits (the prompt's last token,
        when the hits cover all the rest) and nothing is returned. None, changing nothing,
        if the request was aborted meanwhile or `first` cannot continue it here (a token
        outside the vocabulary, or a generator state this pod's device cannot take).
        """
        seq = self.seqs.get(request_id)
        if seq is None or seq.status is not Status.REMOTE:
            return None
        if first is None:
            self._end_reservation(request_id)
            self.scheduler.resume(seq)
            return []
        if not 0 <= first.token < self.model_cfg.vocab_size:
            log.warning("request %s: first token %d is outside the vocabulary", request_id, first.token)
            return None
        if (first.generator_state is None) != (seq.generator is None):
            log.warning("request %s: the prefill pod's generator state does not fit this request", request_id)
            return None
        if seq.generator is not None:
            try:
                seq.generator.set_state(torch.frombuffer(bytearray(first.generator_state), dtype=torch.uint8))
            except (RuntimeError, ValueError) as e:  # e.g. a CPU generator's state on a GPU pod
                log.warning("request %s: cannot take the prefill pod's generator state: %s", request_id, e)
                return None
        self._end_reservation(request_id)
        seq.num_computed_tokens = seq.num_tokens
        self.block_manager.register_computed(seq)
        seq.token_ids.append(first.token)
        reason = self._finish_reason(seq, first.token, seq.num_tokens)
        if reason:  # the first token was the last
            self.scheduler.finish(seq, reason)
            del self.seqs[request_id]
        else:
            self.scheduler.resume(seq)
        return [RequestOutput(request_id, [first.token], None if first.logprobs is None else [first.logprobs],
                              reason, seq.num_prompt_tokens, max(seq.num_cached_tokens, 0))]

    def fallback_local(self, request_id: str) -> bool:
        """The transfer failed: drop whatever arrived and prefill here instead."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status is not Status.REMOTE:
            return False
        self._end_reservation(request_id)
        self.scheduler.requeue(seq)  # frees the blocks: nothing that arrived is ever registered or read
        return True

    def abort_request(self, request_id: str) -> bool:
        """End a request and free its blocks; False if it is not known (already ended)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self._end_reservation(request_id)
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- the step ------------------------------------------------------------------------
    def step(self, on_layer_done: Callable[[int], None] | None = None) -> list[RequestOutput]:
        """Schedule and launch a step; return the tokens of the step that finished.

        With async scheduling, a step whose tokens are all greedy stays in flight: the next
        call schedules and launches step N+1 (its sequences' last tokens are placeholders,
        filled on the device from step N's tokens) before it reads step N's tokens back, so
        the CPU work overlaps the GPU's. A sequence that step N finishes has also run in step
        N+1; that token is dropped. Otherwise a step's tokens return from the same call.
        """
        prev, self._inflight = self._inflight, None
        sched: SchedulerOutput = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        handle = None
        if sched.scheduled:
            pushes = [s.seq for s in sched.scheduled if s.seq.prefill_only and s.samples]
            if pushes and self.kv_push is not None and on_layer_done is None:
                on_layer_done = self._push_layers(pushes)
            defer = self.config.async_scheduling and on_layer_done is None and not pushes
            handle = self.runner.launch(sched.scheduled, prev[1].tokens if prev else None, on_layer_done, defer)
            self._advance(sched.scheduled, handle.deferred)
        if prev is not None:
            outputs += self._finish(*prev)
        if handle is not None:
            if handle.deferred:
                self._inflight = (sched.scheduled, handle)
            else:
                outputs += self._finish(sched.scheduled, handle)
        return outputs

    def _advance(self, scheduled: list[ScheduledSeq], deferred: bool) -> None:
        """The launched step's KV counts as computed; each sampled token gets a placeholder."""
        row = 0
        for s in scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            seq.pending = -1
            if s.samples:
                s.token_at = len(seq.token_ids)
                seq.token_ids.append(PENDING)
                if deferred:
                    seq.pending = row
                row += 1

    def _finish(self, scheduled: list[ScheduledSeq], handle) -> list[RequestOutput]:
        """Read a launched step's tokens back and hand them to their sequences."""
        result = handle.wait()
        outputs = []
        row = 0
        for s in scheduled:
            seq = s.seq
            if not s.samples:
                if seq.status is not Status.FINISHED:
                    self.block_manager.register_computed(seq)
                continue
            i, row = row, row + 1
            if seq.status is Status.FINISHED:
                continue  # finished (or aborted) by an earlier step: this token was never wanted
            token = result.token_ids[i]
            at = s.token_at
            seq.token_ids[at] = token
            if seq.prefill_only:
                outputs.append(self._prefilled(seq, token, result.logprobs[i]))
                continue
            if len(seq.token_ids) == at + 1:  # no later step took this sequence yet
                seq.pending = -1
            self.block_manager.register_computed(seq)
            reason = self._finish_reason(seq, token, at + 1)
            if reason:
                del seq.token_ids[at + 1 :]
                seq.pending = -1
                self.scheduler.finish(seq, reason)
                del self.seqs[seq.request_id]
            lp = result.logprobs[i]
            outputs.append(RequestOutput(
                seq.request_id, [token], None if lp is None else [lp], reason,
                seq.num_prompt_tokens, max(seq.num_cached_tokens, 0),
            ))
        return outputs

    def _prefilled(self, seq: Sequence, token: int, logprobs) -> RequestOutput:
        """A prefill-only request computed its prompt and sampled: hand the token (and the
        generator's state after the draw) to kv_push, and end the request."""
        seq.pending = -1
        self.block_manager.register_computed(seq)
        state = None if seq.generator is None else seq.generator.get_state().numpy().tobytes()
        if self.kv_push is not None:
            self.kv_push.first_token(seq.request_id, FirstToken(token, logprobs, state))
        self.scheduler.finish(seq, "prefilled")
        del self.seqs[seq.request_id]
        return RequestOutput(seq.request_id, [token], None if logprobs is None else [logprobs], "prefilled",
                             seq.num_prompt_tokens, max(seq.num_cached_tokens, 0))

    def _push_layers(self, seqs: list[Sequence]) -> Callable[[int], None]:
        from baton.kernels import ops

        slots = [(s.request_id, self.runner.slots(s, s.kv_start, s.num_tokens)) for s in seqs]
        push, cache = self.kv_push, self.runner.kv_cache

        def on_layer_done(layer: int) -> None:
            for rid, sl in slots:
                push.push_layer(rid, layer, ops.gather_kv(cache[layer], sl))

        return on_layer_done

    def _finish_reason(self, seq: Sequence, token: int, num_tokens: int) -> str | None:
        """Whether `token`, the sequence's num_tokens-th, ends it."""
        p = seq.params
        if not p.ignore_eos and token in self.model_cfg.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if num_tokens - seq.num_prompt_tokens >= p.max_tokens or num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- what the services publish -------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            receiving=sum(1 for s in self.seqs.values() if s.status is Status.REMOTE),
            waiting_prefill_tokens=self.scheduler.waiting_prefill_tokens(),
            free_blocks=bm.num_free_blocks, total_blocks=bm.num_blocks, cached_blocks=bm.num_cached_blocks,
        )

    def drain_kv_events(self) -> KVEvents:
        return self.block_manager.drain_events()

    def cached_block_hashes(self) -> list[BlockHash]:
        return self.block_manager.cached_hashes()
