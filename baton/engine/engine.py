"""LLMEngine: requests in, one step at a time, token outputs out.

`step()` asks the scheduler, runs the model, samples and hands tokens back to the
scheduler; data flows one way. Not thread-safe: the services drive it from one thread.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from baton.engine.block_manager import BlockManager, KVEvents
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.grammar import Grammars, bitmask_words
from baton.engine.model_runner import ModelRunner
from baton.engine.sampler import check_logit_bias, new_seed
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
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None = None  # finish_reason "error": why this request alone failed


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
    """The token a prefill pod sampled after the prompt, and its logprobs. Nothing else need
    travel for the decode pod to go on exactly as a colocated pod would: the randomness behind
    each token is a pure function of the request's seed and the token's position."""

    token: int
    logprobs: list[tuple[int, float]] | None = None  # [(token, logprob), (top id, logprob), ...]


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
        self._init_state(model_dir, self.runner.num_blocks, self.runner.device.type, kv_push)
        log.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
            self.model_cfg.architecture, self.runner.device, self.runner.dtype,
            self.runner.num_blocks, config.block_size, self.max_model_len,
        )

    def _init_state(self, model_dir: str | Path, num_blocks: int, device_type: str, kv_push: KVPush | None) -> None:
        """Everything but the model: the cache's blocks, the scheduler and the requests' state
        (the simulated engine, baton/sim, shares it with its own runner)."""
        config = self.config
        self.seed = model_seed(model_identity(model_dir))
        self.block_manager = BlockManager(num_blocks, config.block_size, self.seed, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.batched_tokens(device_type),
                                   config.prefill_tokens_when_decoding(device_type))
        self.seqs: dict[str, Sequence] = {}
        # structured outputs: compiled on first use (xgrammar is imported then)
        self.grammars = Grammars(self.model_dir, self.model_cfg.vocab_size, self.model_cfg.eos_token_ids)
        self.kv_push = kv_push  # prefill pods: where prefill-only requests' KV and first token go
        self.reservations: dict[str, Reservation] = {}  # decode pods: KV arriving from prefill pods
        self._penalty_slots_free = list(range(config.max_num_seqs))
        # a launched step whose tokens are unread: its rows, its handle and its kind
        self._inflight: tuple[list[ScheduledSeq], object, str] | None = None
        # the last step whose tokens were read back: its kind (SchedulerOutput.kind) and its
        # time, from the tokens of the step before it (back to back) or from its own launch
        # (after a pause); None after a step() call that read none back. The pod's step metric.
        self.last_step: tuple[str, float] | None = None
        self._since = time.perf_counter()  # where the next finished step's time starts
        # structured outputs under async scheduling: a launched step's grammar rows catch up with
        # its tokens and fill the next bitmask on a worker thread (see _grammar_ahead)
        self._grammar_pool: ThreadPoolExecutor | None = None
        self._grammar_job: Future | None = None
        self._ahead: tuple[torch.Tensor, dict] | None = None
        self.grammar_rows_ahead = 0  # bitmask rows that came from the worker (tests, metrics)
        self._arrival = itertools.count()
        # seeds of requests that bring none: from config.seed when set (reproducible runs)
        self._seeds = random.Random(config.seed) if config.seed is not None else None

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
        err = check_logit_bias(params, self.model_cfg.vocab_size)
        if err:
            raise ValueError(err)
        if params.structured_output is not None:
            self.grammars.compile(params.structured_output)  # cached: admission finds it compiled

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
        seed = params.seed
        if seed is None and not params.greedy:
            seed = self._seeds.getrandbits(63) if self._seeds is not None else new_seed()
            log.info("request %s: sampling with seed %d (none given)", request_id, seed)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       next(self._arrival), seed=seed or 0)
        if params.structured_output is not None:
            seq.grammar = self.grammars.new_state(params.structured_output)
        return seq

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
        outside the vocabulary).
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
        if seq.grammar is not None and not seq.grammar.sync([first.token]):
            log.warning("request %s: first token %d is not allowed by its grammar", request_id, first.token)
            return None
        self._end_reservation(request_id)
        seq.num_computed_tokens = seq.num_tokens
        self.block_manager.register_computed(seq)
        seq.token_ids.append(first.token)
        reason = self._grammar_stop(seq) or self._finish_reason(seq, first.token, seq.num_tokens)
        if reason:  # the first token was the last
            self._end(seq, reason)
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
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        self._end_reservation(request_id)
        self._end(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- the step ------------------------------------------------------------------------
    def step(self, on_layer_done: Callable[[int], None] | None = None) -> list[RequestOutput]:
        """Schedule and launch a step; return the tokens of the step that finished.

        With async scheduling, a step stays in flight (greedy and sampled alike): the next
        call schedules and launches step N+1 (its sequences' last tokens are placeholders,
        filled on the device from step N's tokens) before it reads step N's tokens back, so
        the CPU work overlaps the GPU's. A sequence that step N finishes has also run in step
        N+1; that token is dropped. Steps that push KV to decode pods return their tokens
        from the same call. A step with grammar rows reads step N's tokens back once its own
        forward is queued and before it samples: its bitmask depends on them.
        """
        prev, self._inflight = self._inflight, None
        self._ahead = None
        self.last_step = None
        if prev is None:  # nothing ran until now: the next step's time starts here
            self._since = time.perf_counter()
        sched: SchedulerOutput = self.scheduler.schedule()
        kind = sched.kind
        self._assign_penalty_slots(sched)
        outputs: list[RequestOutput] = []
        handle = None
        deferred = False
        if sched.scheduled:
            pushes = [s.seq for s in sched.scheduled if s.seq.prefill_only and s.samples]
            if pushes and self.kv_push is not None and on_layer_done is None:
                on_layer_done = self._push_layers(pushes)
            scheduled = sched.scheduled
            deferred = any(s.samples for s in scheduled) and self.config.async_scheduling and on_layer_done is None
            token_mask = None
            if any(s.samples and s.seq.grammar is not None for s in scheduled):
                # the bitmask of this step needs the previous step's tokens: read them back
                # (the device has them before it starts this step's forward), hand them to the
                # matchers and fill the bitmask, all while the device runs this step's forward
                def token_mask():
                    nonlocal prev
                    self._advance(scheduled, deferred)
                    if prev is not None:
                        outputs.extend(self._finish(*prev))
                        prev = None
                    return self._bitmask(scheduled)

            handle = self.runner.launch(scheduled, prev[1].tokens if prev else None, on_layer_done, token_mask)
            if token_mask is None:
                self._advance(scheduled, deferred)
        if prev is not None:
            outputs += self._finish(*prev)
        if handle is not None:
            if deferred:
                self._inflight = (sched.scheduled, handle, kind)
                self._start_grammar_job(sched.scheduled, handle)
            else:
                outputs += self._finish(sched.scheduled, handle, kind)
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

    def _finish(self, scheduled: list[ScheduledSeq], handle, kind: str) -> list[RequestOutput]:
        """Read a launched step's tokens back and hand them to their sequences."""
        self._join_grammar_job()  # the worker is done with the matchers before they are read
        result = handle.wait()
        now = time.perf_counter()
        self.last_step = (kind, now - self._since)
        self._since = now
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
            if result.bad[i]:  # this request's logits went bad: it fails alone, the batch goes on
                del seq.token_ids[at:]
                seq.pending = -1
                self._end(seq, "error")
                msg = "the model's output for this request was not finite (NaN or inf); it was stopped"
                log.warning("request %s: %s", seq.request_id, msg)
                outputs.append(RequestOutput(seq.request_id, [], None, "error", seq.num_prompt_tokens,
                                             max(seq.num_cached_tokens, 0), error=msg))
                continue
            seq.token_ids[at] = token
            if seq.prefill_only:
                outputs.append(self._prefilled(seq, token, result.logprobs[i]))
                continue
            if len(seq.token_ids) == at + 1:  # no later step took this sequence yet
                seq.pending = -1
            if seq.grammar is not None and not seq.grammar.sync(seq.token_ids, seq.num_prompt_tokens, at + 1):
                # the sampler kept to the bitmask, so only a bug or a changed grammar gets here
                del seq.token_ids[at:]
                seq.pending = -1
                self._end(seq, "error")
                msg = f"token {token} is not allowed by the request's grammar; it was stopped"
                log.warning("request %s: %s", seq.request_id, msg)
                outputs.append(RequestOutput(seq.request_id, [], None, "error", seq.num_prompt_tokens,
                                             max(seq.num_cached_tokens, 0), error=msg))
                continue
            self.block_manager.register_computed(seq)
            reason = self._grammar_stop(seq) or self._finish_reason(seq, token, at + 1)
            if reason:
                del seq.token_ids[at + 1 :]
                seq.pending = -1
                self._end(seq, reason)
            lp = result.logprobs[i]
            outputs.append(RequestOutput(
                seq.request_id, [token], None if lp is None else [lp], reason,
                seq.num_prompt_tokens, max(seq.num_cached_tokens, 0),
            ))
        return outputs

    @staticmethod
    def _grammar_stop(seq: Sequence) -> str | None:
        """"stop" once the request's grammar has ended (its stop token taken)."""
        return "stop" if seq.grammar is not None and seq.grammar.terminated else None

    def _bitmask(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """The packed bitmask of a launched step's sampling rows: each grammar row's matcher
        catches up with the row's output tokens (all read back by now) and fills its row, or
        takes the row the worker filled from the same matcher state (_grammar_ahead)."""
        rows = [s for s in scheduled if s.samples]
        mask = torch.full((len(rows), bitmask_words(self.model_cfg.vocab_size)), -1, dtype=torch.int32)
        ahead, self._ahead = self._ahead, None
        filled, index = ahead if ahead is not None else (None, {})
        states, at, dst, src = [], [], [], []
        for i, s in enumerate(rows):
            seq, g = s.seq, s.seq.grammar
            # a request ended by the previous step keeps the all-ones row: its token is dropped
            if g is None or seq.status is Status.FINISHED:
                continue
            if g.sync(seq.token_ids, seq.num_prompt_tokens, s.token_at) and not g.terminated:
                hit = index.get(g)
                if hit is not None and hit[1] == g.accepted:  # filled in the state it is in now
                    dst.append(i)
                    src.append(hit[0])
                else:
                    states.append(g)
                    at.append(i)
        if dst:
            mask[dst] = filled[src]
            self.grammar_rows_ahead += len(dst)
        if states:
            self.grammars.fill(states, mask, at)
        return mask

    def _start_grammar_job(self, scheduled: list[ScheduledSeq], handle) -> None:
        """Hand a launched (deferred) step's grammar rows to the worker thread."""
        rows, i = [], 0
        for s in scheduled:
            if not s.samples:
                continue
            seq = s.seq
            if seq.grammar is not None and not seq.prefill_only and seq.status is not Status.FINISHED:
                rows.append((i, seq.grammar, s.token_at - seq.num_prompt_tokens))
            i += 1
        if rows:
            if self._grammar_pool is None:
                self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="baton-grammar")
            self._grammar_job = self._grammar_pool.submit(self._grammar_ahead, handle, rows)

    def _grammar_ahead(self, handle, rows: list[tuple[int, object, int]]) -> tuple[torch.Tensor, dict]:
        """On the worker: as soon as the step's tokens are back, each grammar row whose matcher
        has accepted exactly the tokens before this one accepts it, and the rows fill the next
        step's bitmask, while the engine thread schedules and launches that step. (One after
        the other on the engine thread, a step's host work and the fill outlasted an H200's
        forward at batch 64.) Returns the filled rows and {state: (row, tokens accepted)}."""
        result = handle.wait()
        states = []
        for i, g, accepted in rows:
            if result.bad[i] or g.accepted != accepted or not g.advance(result.token_ids[i]):
                continue  # the engine thread sees it in _finish (and fails the request if need be)
            if not g.terminated:
                states.append(g)
        filled = torch.full((len(states), bitmask_words(self.model_cfg.vocab_size)), -1, dtype=torch.int32)
        if states:
            self.grammars.fill(states, filled, list(range(len(states))))
        return filled, {g: (k, g.accepted) for k, g in enumerate(states)}

    def _join_grammar_job(self) -> None:
        job, self._grammar_job = self._grammar_job, None
        if job is None:
            return
        try:
            self._ahead = job.result()
        except Exception:  # the rows are filled on the engine thread instead
            log.exception("the grammar worker failed; filling on the engine thread")
            self._ahead = None

    def _prefilled(self, seq: Sequence, token: int, logprobs) -> RequestOutput:
        """A prefill-only request computed its prompt and sampled: hand the token to kv_push,
        and end the request."""
        seq.pending = -1
        self.block_manager.register_computed(seq)
        if self.kv_push is not None:
            self.kv_push.first_token(seq.request_id, FirstToken(token, logprobs))
        self._end(seq, "prefilled")
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

    def _end(self, seq: Sequence, reason: str) -> None:
        """The request is over: its blocks and penalty slot are freed."""
        self._free_penalty_slot(seq)
        self.scheduler.finish(seq, reason)
        del self.seqs[seq.request_id]

    # -- penalties: each penalised running sequence holds a slot of the runner's token counts
    def _assign_penalty_slots(self, sched: SchedulerOutput) -> None:
        for seq in sched.preempted:
            self._free_penalty_slot(seq)
        for s in sched.scheduled:
            seq = s.seq
            if seq.params.penalized and seq.penalty_slot < 0:
                seq.penalty_slot = self._penalty_slots_free.pop()
                # counts from the tokens so far: a preempted sequence's tokens are all read
                # back by now (its pending token, if any, came in from the previous step)
                self.runner.penalty_state().reset(seq.penalty_slot, seq.token_ids[: seq.num_prompt_tokens],
                                                  seq.output_token_ids)

    def _free_penalty_slot(self, seq: Sequence) -> None:
        if seq.penalty_slot >= 0:
            self._penalty_slots_free.append(seq.penalty_slot)
            seq.penalty_slot = -1

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
