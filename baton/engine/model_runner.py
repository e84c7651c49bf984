"""Runs one scheduled step: builds the step's inputs, runs the decoder, samples.

Owns the model, the paged KV cache tensor and (on CUDA) the captured decode graphs.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.loader import load_weights, random_weights
from baton.engine.model import AttentionMetadata, CausalLM
from baton.engine.quant import quantize_linears
from baton.engine.rope import cos_sin_cache
from baton.engine.sampler import (
    BatchLogprobs, PenaltyState, SamplerOutput, SamplingBuffers, SamplingTensors, batch_logprobs, sample_batch,
    to_device,
)
from baton.engine.sampling_params import GREEDY_TEMPERATURE
from baton.engine.scheduler import ScheduledSeq
from baton.kernels import ops

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
# Prompt chunks run as CUDA graphs too, one per token bucket (a step's prompt tokens padded
# up to the next bucket, at most PREFILL_GRAPH_SEQS sequences): launched one kernel at a
# time, a pass costs ~20 ms of host time on the H200's host whatever its size (28 layers x
# ~10 launches of ~50 us), four decode steps' worth, so every stream stalls for it
# (bench/bench_mixed_step.py).
PREFILL_GRAPH_TOKENS = [256, 512, 1024, 2048, 4096, 8192, 16384]
PREFILL_GRAPH_SEQS = 64


def resolve_device(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    dev = config.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype


@dataclass
class StepTokens:
    """A step's sampled tokens on the host, one entry per sampling row."""

    token_ids: list[int]
    logprobs: list[list[tuple[int, float]] | None]  # None, or [(sampled id, lp), (top id, lp), ...]
    bad: list[bool]  # the row's logits were not usable (NaN/inf): its request fails alone


class StepHandle:
    """A launched step's sampled tokens: on the device (`tokens`, the next step's inputs) and
    on their way to the host, read by `wait()`."""

    def __init__(self, out: SamplerOutput | None = None, copy=None):
        self.out = out
        self.tokens = None if out is None else out.tokens
        self._copy = copy  # (host tokens, host bad, CUDA event or None)
        self._result: StepTokens | None = None

    def wait(self) -> StepTokens | None:
        if self._result is None and self.out is not None:
            host_tokens, host_bad, ev = self._copy
            if ev is not None:
                ev.synchronize()
            self._result = StepTokens(host_tokens.tolist(), self.out.logprob_lists(), host_bad.tolist())
        return self._result


class ModelRunner:
    def __init__(self, model_dir: str, model_cfg: ModelConfig, config: EngineConfig, max_model_len: int):
        self.cfg = model_cfg
        self.config = config
        self.device, self.dtype = resolve_device(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        # built on the meta device, then allocated once in the target dtype: no float32 copy
        # of an 8B model on the way (every parameter is then loaded or randomised)
        with torch.device("meta"):
            model = CausalLM(model_cfg)
        self.model = model.to(dtype=self.dtype).to_empty(device=self.device)
        self.model.cos_sin = cos_sin_cache(model_cfg.head_dim, model_cfg.rope_theta, model_cfg.rope_scaling,
                                           max_model_len).to(self.device)
        if config.load_format == "random":
            random_weights(self.model)
        elif config.load_format == "safetensors":
            load_weights(self.model, model_dir)
        else:
            raise ValueError(f"load_format must be safetensors or random, got {config.load_format!r}")
        if config.quantization == "fp8" or model_cfg.fp8_weight_block is not None:
            quantize_linears(self.model)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the bf16 weights just freed: room for the KV cache
        self.model.eval()
        # the KV cache's dtype (what the KV push moves, too): FP8 e4m3 at scale 1.0, or the model's
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.num_blocks = self._num_blocks()
        self.kv_cache = torch.empty(
            model_cfg.num_layers, 2, self.num_blocks, self.block_size, model_cfg.num_kv_heads,
            model_cfg.head_dim, dtype=self.kv_dtype, device=self.device,
        )
        if os.environ.get("BATON_POISON_KV") == "1":
            # debugging aid and test setting: any read of KV no step wrote turns into NaN
            self.kv_cache.fill_(float("nan"))
        self._write_stream = None  # CUDA: the stream write_kv scatters on
        # one step's sampling parameters, at fixed device addresses the decode graphs read
        self.sampling = SamplingBuffers(max(config.max_num_seqs, GRAPH_BATCH_SIZES[-1]), self.device)
        self.penalties: PenaltyState | None = None  # token counts of penalised requests, made when needed
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        # token bucket -> (replay: None when captured, else the pass itself; its logits)
        self.prefill_graphs: dict[int, tuple[Callable[[], torch.Tensor | None], torch.Tensor | None]] = {}
        if self.device.type == "cuda" and config.cuda_graphs:
            self._capture_graphs()
        # a step that decodes and prefills runs its decodes apart (their graph) from its
        # prompt chunks: see _launch_split. Without graphs (a CPU) it only costs a second
        # pass, so it is off there unless a test turns it on.
        self.split_mixed = bool(self.graphs) and config.split_mixed_steps

    # -- set-up --------------------------------------------------------------------------
    def _num_blocks(self) -> int:
        c = self.config
        per_block = self.cfg.kv_bytes_per_token(self.kv_dtype.itemsize) * self.block_size
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # keep room for activations of the largest step and the graphs' pools
            act = c.batched_tokens(self.device.type) * (self.cfg.hidden_size * 4 + self.cfg.intermediate_size * 2 + self.cfg.vocab_size) * 4
            # this pod's share of the GPU, whatever other processes on it hold (two pods at
            # 0.45 each share one GPU in either start order), and never more than is free
            mine = total * c.gpu_memory_utilization - torch.cuda.memory_reserved(self.device)
            budget = min(mine, free - (256 << 20)) - act
            return max(1, int(budget // per_block))
        return max(1, c.kv_cache_bytes // per_block)

    # -- KV written from outside (a decode pod's received layers) -------------------------
    def write_kv(self, layer: int, kv: torch.Tensor, slots: torch.Tensor):
        """Scatter kv [2, n, Hkv, D] into layer `layer`'s cache slots; on CUDA without waiting,
        returning the event after the write (None on CPU, where it is done on return).

        On CUDA the writes go on one side stream of CUDA's lowest priority, the default
        stream's own: decode steps never queue behind them, and each write is one layer of
        one request, so the step's kernels interleave with them. Each write first waits for
        the work already queued on the model's stream: blocks just reserved may still be
        read or written by kernels queued for their previous owner.
        """
        if self.device.type != "cuda":
            ops.scatter_kv(kv, self.kv_cache[layer], slots)
            return None
        if self._write_stream is None:
            self._write_stream = torch.cuda.Stream(self.device, priority=0)
        side = self._write_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            ops.scatter_kv(kv, self.kv_cache[layer], slots)
        kv.record_stream(side)  # the allocator must not hand kv's memory on before the write
        ev = torch.cuda.Event(blocking=True)  # its waiter sleeps rather than spins
        ev.record(side)
        return ev

    def after_kv_writes(self) -> None:
        """Make the model's stream wait for every write_kv so far (before a step reads those
        blocks, or another request reuses them)."""
        if self._write_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._write_stream)

    # -- inputs --------------------------------------------------------------------------
    def _tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        t = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
        return to_device(t, self.device)

    def slots(self, seq, start: int, end: int) -> torch.Tensor:
        """Cache slots of seq's tokens [start, end), on the cache's device."""
        bs = self.block_size
        pos = np.arange(start, end, dtype=np.int64)
        table = np.asarray(seq.block_table[start // bs : -(-end // bs)], dtype=np.int64)
        return self._tensor(table[pos // bs - start // bs] * bs + pos % bs)

    def _inputs(self, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None):
        """The step's inputs as host lists: token ids, positions, cache slots, cu_seqlens,
        context lengths, block tables, and (dst, src): token dst's id is still on the device,
        row src of prev_tokens (written here as 0, filled in on the device)."""
        bs = self.block_size
        input_ids, positions, slots, cu, ctx, tables = [], [], [], [0], [], []
        dst, src = [], []
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids += seq.token_ids[start:end]
            if seq.pending >= 0:  # its last token is still on the GPU, in prev_tokens
                assert s.num_new_tokens == 1 and prev_tokens is not None
                dst.append(len(input_ids) - 1)
                src.append(seq.pending)
                input_ids[-1] = 0
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            cu.append(cu[-1] + s.num_new_tokens)
            ctx.append(end)
            tables.append(table)
        return input_ids, positions, slots, cu, ctx, tables, dst, src

    @staticmethod
    def _pack_tables(tables: list[list[int]], out: np.ndarray) -> None:
        """Block tables into the rows of out [len(tables), >= longest] (numpy: 2x faster
        than torch.tensor on lists); entries past a table's end are left as they are."""
        for i, t in enumerate(tables):
            out[i, : len(t)] = t

    def prepare(self, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None = None):
        input_ids, positions, slots, cu, ctx, tables, dst, src = self._inputs(batch, prev_tokens)
        decode = all(s.num_new_tokens == 1 for s in batch)
        padded = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int32)
        self._pack_tables(tables, padded)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            context_lens=self._tensor(ctx),
            block_tables=self._tensor(padded),
            cu_seqlens_q=None if decode else self._tensor(cu),
            max_q_len=max(s.num_new_tokens for s in batch),
        )
        ids = self._tensor(input_ids, torch.int64)
        if dst:
            ids.index_copy_(0, self._tensor(dst, torch.int64), prev_tokens[self._tensor(src, torch.int64)].long())
        last = [c - 1 for c, s in zip(cu[1:], batch) if s.samples]
        return ids, self._tensor(positions, torch.int64), meta, last

    # -- running -------------------------------------------------------------------------
    def penalty_state(self) -> PenaltyState:
        """The token counts of penalised requests: one slot per running sequence, and a last
        one that rows without penalties write to and nobody reads."""
        if self.penalties is None:
            self.penalties = PenaltyState(self.config.max_num_seqs + 1, self.cfg.vocab_size, self.device)
        return self.penalties

    @property
    def scratch_slot(self) -> int:
        return self.config.max_num_seqs

    @torch.inference_mode()
    def run(
        self, batch: list[ScheduledSeq], on_layer_done: Callable[[int], None] | None = None
    ) -> StepTokens | None:
        """Compute the step's KV; sample for sequences that reach their last token."""
        return self.launch(batch, None, on_layer_done).wait()

    @torch.inference_mode()
    def launch(
        self, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None,
        on_layer_done: Callable[[int], None] | None = None,
        token_mask: Callable[[], torch.Tensor] | None = None,
    ) -> "StepHandle":
        """Start the step's work on the device; sampled tokens come from the handle.

        A sequence whose input token is still pending (seq.pending >= 0) takes it from row
        seq.pending of `prev_tokens`, the previous step's tokens, on the device. Nothing here
        waits for the device: the step's tokens stay on it (the next step's inputs) and are
        copied back behind the step, greedy and sampled rows alike. Decode steps run as CUDA
        graphs with the sampler inside; logit_bias and penalties process the graph's logits
        and sample again outside it.

        `token_mask` (steps with a grammar row) is called once the forward pass is queued and
        before sampling: the host's packed bitmask [sampling rows, ceil(V/32)] int32 of the
        tokens each row may take (all ones: any), filled while the device runs the forward.
        """
        n = len(batch)
        rows = [i for i, s in enumerate(batch) if s.samples]
        samplers = [batch[i].seq for i in rows]
        graph = None
        if on_layer_done is None and self.graphs and all(s.num_new_tokens == 1 for s in batch):
            graph = next((b for b in self._graph_sizes if b >= n), None)
        elif on_layer_done is None and token_mask is None and self.split_mixed:
            out = self._launch_split(batch, prev_tokens)
            if out is not None:
                return out
        # the rows' parameters go where the graph reads them; every row of a graph samples
        # inside it unless one needs logit_bias or penalties (then the graph's own sampling
        # is a waste, its tokens unused)
        st = self._sampling_tensors(samplers)
        in_graph = graph is not None and len(rows) == n and st.in_graph
        if graph is not None:
            logits, tokens, bad = self._replay(graph, batch, prev_tokens)
            logits = logits[:n]
            if in_graph:
                # copies: the graph's outputs are overwritten by the next replay, which runs
                # before this step's tokens and logprobs are read back
                tokens, bad = tokens[:n].clone(), bad[:n].clone()
                out = SamplerOutput(tokens, bad, batch_logprobs(logits, st, tokens))
            elif samplers:
                rows_logits = logits if len(rows) == n else logits.index_select(0, self._tensor(rows, torch.int64))
                out = sample_batch(rows_logits, self._masked(st, token_mask), self.penalties)
        else:
            out = self._eager(batch, prev_tokens, st if samplers else None, token_mask, on_layer_done)
        if not samplers:
            return StepHandle(None)
        return self._handle(out, st)

    def _eager(self, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None,
               st: SamplingTensors | None = None, token_mask: Callable[[], torch.Tensor] | None = None,
               on_layer_done: Callable[[int], None] | None = None) -> SamplerOutput | None:
        """The forward pass without a decode graph (and the sampler for the rows that sample,
        when `st` is given): prompt chunks (a prefill graph when one fits), and steps a
        decode graph does not fit."""
        logits = None
        if on_layer_done is None and self.prefill_graphs:
            logits = self._replay_prefill(batch, prev_tokens)
        if logits is None:
            input_ids, positions, meta, last = self.prepare(batch, prev_tokens)
            hidden = self.model(input_ids, positions, self.kv_cache, meta, on_layer_done)
            if st is None:
                return None
            logits = self.model.compute_logits(hidden[last])
        if st is None:
            return None
        return sample_batch(logits, self._masked(st, token_mask), self.penalties)

    def _launch_split(self, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None) -> "StepHandle | None":
        """A step that decodes and prefills: the decodes (the batch's leading one-token rows,
        which the scheduler puts first) replay their graph, the prompt chunks run eagerly
        after it. One eager pass over both costs ~4 decode steps whatever the chunk (the
        decode rows lose their graph; bench/bench_mixed_step.py), so every stream would
        stall for it. None when the decodes cannot take their graph's own sampler."""
        nd = 0
        while nd < len(batch) and batch[nd].num_new_tokens == 1 and batch[nd].samples:
            nd += 1
        graph = next((b for b in self._graph_sizes if b >= nd), None) if self.graphs else None
        if nd in (0, len(batch)) or (self.graphs and graph is None):
            return None
        decodes = [s.seq for s in batch[:nd]]
        st_d = self._sampling_tensors(decodes)
        if graph is None:  # no graphs (a CPU): the same split, both parts eager
            out = self._eager(batch[:nd], prev_tokens, st_d)
        elif st_d.in_graph:
            logits, tokens, bad = self._replay(graph, batch[:nd], prev_tokens)
            tokens, bad = tokens[:nd].clone(), bad[:nd].clone()
            out = SamplerOutput(tokens, bad, batch_logprobs(logits[:nd], st_d, tokens))
        else:
            return None
        rest = batch[nd:]
        prompts = [s.seq for s in rest if s.samples]
        if not prompts:
            self._eager(rest, prev_tokens)
            return self._handle(out, st_d)
        st_p = self._sampling_tensors(prompts, graph_buffers=False)
        out_p = self._eager(rest, prev_tokens, st_p)
        if st_d.penalized:
            self.penalties.append(st_d.slots, out.tokens)
        if st_p.penalized:
            self.penalties.append(st_p.slots, out_p.tokens)
        both = SamplerOutput(torch.cat([out.tokens, out_p.tokens]), torch.cat([out.bad, out_p.bad]),
                             BatchLogprobs.cat(out.logprobs, out_p.logprobs, nd))
        return StepHandle(both, self._copy_back(both.tokens, both.bad))

    def _handle(self, out: SamplerOutput, st: SamplingTensors) -> "StepHandle":
        if st.penalized:
            self.penalties.append(st.slots, out.tokens)
        return StepHandle(out, self._copy_back(out.tokens, out.bad))

    def _masked(self, st: SamplingTensors, token_mask: Callable[[], torch.Tensor] | None) -> SamplingTensors:
        """st with the grammar rows' bitmask on the device (the host fills it now, while the
        device computes the logits)."""
        if token_mask is not None:
            mask = token_mask()
            st.bitmask = to_device(mask, self.device)
        return st

    def _sampling_tensors(self, seqs: list, graph_buffers: bool = True) -> SamplingTensors:
        """The rows' sampling parameters; the token each row samples is its sequence's
        num_tokens-th (0-based), the position its randomness is keyed by. They land in the
        graphs' buffers unless `graph_buffers` is False (a second set in one step)."""
        params = [q.params for q in seqs]
        slots = None
        if any(p.penalized for p in params):
            self.penalty_state()
            slots = [q.penalty_slot if q.penalty_slot >= 0 else self.scratch_slot for q in seqs]
        return SamplingTensors.build(params, [q.seed for q in seqs], [q.num_tokens for q in seqs],
                                     self.device, slots, self.sampling if graph_buffers else None)

    def _copy_back(self, tokens: torch.Tensor, bad: torch.Tensor):
        """Start copying the step's tokens and bad flags to the host: (tokens, bad, event or None)."""
        if self.device.type != "cuda":
            return tokens, bad, None
        host_t = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_b = torch.empty(bad.shape, dtype=bad.dtype, pin_memory=True)
        host_t.copy_(tokens, non_blocking=True)
        host_b.copy_(bad, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return host_t, host_b, ev

    # -- CUDA graphs for decode steps ----------------------------------------------------
    def _capture_graphs(self) -> None:
        """One graph per batch bucket: the forward pass, the logits and the sampler (greedy and
        sampled rows, parameters read from self.sampling's device rows).

        A step's inputs reach the graph in two host-to-device copies from pinned buffers:
        [ids | positions | slots | context lengths] for every row of the largest bucket
        (padding rows: slot -1, so nothing is stored, context 1), and the block tables
        packed to the step's width, which one device copy spreads into the table rows.
        """
        # no garbage collection during a capture: an earlier engine's graphs freed by the
        # collector mid-capture invalidate it (torch no longer collects before capturing)
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture_all()
        finally:
            if was_enabled:
                gc.enable()

    def _capture_all(self) -> None:
        max_bs = min(self.config.max_num_seqs, GRAPH_BATCH_SIZES[-1])
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_bs]
        dev, big, width = self.device, sizes[-1], self.max_blocks_per_seq
        # rows: ids, positions, slots, context lengths, and (for pending ids) where / from
        scalars = torch.zeros(6, big, dtype=torch.int32, device=dev)
        scalars[2].fill_(-1)
        scalars[3].fill_(1)
        tables = torch.zeros(big, width, dtype=torch.int32, device=dev)
        self._g = dict(
            scalars=scalars, tables=tables,
            tables_stage=torch.zeros(big * width, dtype=torch.int32, device=dev),
            host=torch.zeros(6, big, dtype=torch.int32).pin_memory(),
            host_tables=torch.zeros(big * width, dtype=torch.int32).pin_memory(),
            copied=torch.cuda.Event(),
        )
        self._g["copied"].record()
        pool = None
        for b in reversed(sizes):
            meta = AttentionMetadata(
                slot_mapping=scalars[2, :b], context_lens=scalars[3, :b], block_tables=tables[:b], cu_seqlens_q=None,
            )
            args = (scalars[0, :b], scalars[1, :b], self.kv_cache, meta)

            f, i = self.sampling.views(b)

            def forward():
                logits = self.model.compute_logits(self.model(*args))
                # top_k's threshold by the kernel's own search (no host hint inside a graph)
                tokens, bad = ops.sample_tokens(logits, f[0], i[0], f[1], f[2], i[1], i[2], GREEDY_TEMPERATURE)
                return logits, tokens, bad

            g, out = self._capture(forward, pool)
            pool = g.pool()
            self.graphs[b] = (g, out)
        self._graph_sizes = sorted(self.graphs)
        self.prefill_buffers()
        for t in reversed(self._prefill_sizes):
            g, out = self._capture(self._prefill_forward(t), pool)
            self.prefill_graphs[t] = (g.replay, out)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s and prefill graphs for %s tokens",
                 sizes, self._prefill_sizes)

    @staticmethod
    def _capture(forward: Callable[[], object], pool) -> tuple[torch.cuda.CUDAGraph, object]:
        """forward captured as a graph in `pool` (None: a new one), after one uncaptured run
        that compiles its kernels: (graph, forward's outputs, which each replay rewrites)."""
        with torch.inference_mode():
            forward()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = forward()
        return g, out

    def _copy_tables(self, bufs: dict, tables: list[list[int]]) -> None:
        """The step's block tables into the rows of bufs["tables"]: packed to the step's width
        in pinned memory, one host-to-device copy, then spread on the device."""
        n, w = len(tables), max(len(t) for t in tables)
        self._pack_tables(tables, bufs["host_tables"].numpy()[: n * w].reshape(n, w))
        stage = bufs["tables_stage"][: n * w]
        stage.copy_(bufs["host_tables"][: n * w], non_blocking=True)
        bufs["tables"][:n, :w].copy_(stage.view(n, w))

    # -- prefill graphs: prompt chunks padded to a token bucket ---------------------------
    def prefill_buffers(self) -> None:
        """The prefill graphs' fixed inputs: [ids | positions | slots] for the largest bucket
        (padding tokens: slot -1, so nothing is stored), [cu_seqlens | context lengths] and
        the block tables of PREFILL_GRAPH_SEQS sequences (padding sequences: no tokens, no
        context), and the rows whose logits are taken (padding: row 0)."""
        budget = self.config.batched_tokens(self.device.type)
        top = -(-budget // PREFILL_GRAPH_TOKENS[0]) * PREFILL_GRAPH_TOKENS[0]
        self._prefill_sizes = [t for t in PREFILL_GRAPH_TOKENS if t < top] + [top]
        n_seq = min(PREFILL_GRAPH_SEQS, self.config.max_num_seqs)
        dev, pin, w = self.device, self.device.type == "cuda", self.max_blocks_per_seq
        n_longs, n_ints = 3 * top + n_seq, 2 * n_seq + 1
        self._p = dict(
            longs=torch.zeros(n_longs, dtype=torch.int64, device=dev),
            ints=torch.zeros(n_ints, dtype=torch.int32, device=dev),
            tables=torch.zeros(n_seq, w, dtype=torch.int32, device=dev),
            tables_stage=torch.zeros(n_seq * w, dtype=torch.int32, device=dev),
            host_longs=torch.zeros(n_longs, dtype=torch.int64, pin_memory=pin),
            host_ints=torch.zeros(n_ints, dtype=torch.int32, pin_memory=pin),
            host_tables=torch.zeros(n_seq * w, dtype=torch.int32, pin_memory=pin),
            copied=torch.cuda.Event() if pin else None, top=top, n_seq=n_seq,
        )
        self._p["longs"][2 * top: 3 * top].fill_(-1)

    def use_prefill_passes(self) -> None:
        """Without CUDA graphs (a CPU; tests): prompt chunks still take the prefill graphs'
        padded fixed inputs, and each bucket's pass runs as it would be captured."""
        self.prefill_buffers()
        self.prefill_graphs = {t: (self._prefill_forward(t), None) for t in self._prefill_sizes}

    def _prefill_forward(self, t: int) -> Callable[[], torch.Tensor]:
        """The bucket-t pass over the fixed inputs: logits [PREFILL_GRAPH_SEQS, V] of the rows
        named in the last-row buffer."""
        p, top, n_seq = self._p, self._p["top"], self._p["n_seq"]
        longs, ints = p["longs"], p["ints"]
        meta = AttentionMetadata(slot_mapping=longs[2 * top: 2 * top + t], context_lens=ints[n_seq + 1:],
                                 block_tables=p["tables"], cu_seqlens_q=ints[: n_seq + 1], max_q_len=t)
        ids, pos, last = longs[:t], longs[top: top + t], longs[3 * top:]

        def forward() -> torch.Tensor:
            return self.model.compute_logits(self.model(ids, pos, self.kv_cache, meta)[last])

        return forward

    def _replay_prefill(self, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Run batch (prompt chunks) as the smallest prefill graph that holds it: the logits
        of its rows that sample [R, V], or None when no graph holds it."""
        p = self._p
        n, total = len(batch), sum(s.num_new_tokens for s in batch)
        t = next((b for b in self._prefill_sizes if b >= total), None)
        if t is None or n > p["n_seq"]:
            return None
        replay, out = self.prefill_graphs[t]
        ids, pos, slots, cu, ctx, tables, dst, src = self._inputs(batch, prev_tokens)
        last = [c - 1 for c, s in zip(cu[1:], batch) if s.samples]
        top, n_seq = p["top"], p["n_seq"]
        if p["copied"] is not None:
            p["copied"].synchronize()  # the pinned buffers' last copies have left
        hl, hi = p["host_longs"].numpy(), p["host_ints"].numpy()
        hl[:total], hl[total:t] = ids, 0
        hl[top: top + total], hl[top + total: top + t] = pos, 0
        hl[2 * top: 2 * top + total], hl[2 * top + total: 2 * top + t] = slots, -1
        hl[3 * top: 3 * top + len(last)], hl[3 * top + len(last):] = last, 0
        hi[: n + 1], hi[n + 1: n_seq + 1] = cu, total
        hi[n_seq + 1: n_seq + 1 + n], hi[n_seq + 1 + n:] = ctx, 0
        p["longs"].copy_(p["host_longs"], non_blocking=True)
        p["ints"].copy_(p["host_ints"], non_blocking=True)
        self._copy_tables(p, tables)
        if p["copied"] is not None:
            p["copied"].record()
        if dst:
            ids_dev = p["longs"][:t]
            ids_dev.index_copy_(0, self._tensor(dst, torch.int64), prev_tokens[self._tensor(src, torch.int64)].long())
        logits = replay()
        return (out if logits is None else logits)[: len(last)]

    def _replay(self, b: int, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None):
        """Run the bucket-b graph on a batch of one-token steps: (logits [b, V], tokens [b], bad [b])."""
        g, out = self.graphs[b]
        st, n = self._g, len(batch)
        ids, pos, slots, _, ctx, tables, dst, src = self._inputs(batch, prev_tokens)
        st["copied"].synchronize()  # the pinned buffers' last copies have left
        host = st["host"].numpy()
        host[0, :n], host[1, :n], host[2, :n], host[3, :n] = ids, pos, slots, ctx
        host[:2, n:b], host[2, n:b], host[3, n:b] = 0, -1, 1
        m = len(dst)
        if m:
            host[4, :m], host[5, :m] = dst, src
        sc = st["scalars"]
        sc.copy_(st["host"], non_blocking=True)
        self._copy_tables(st, tables)
        st["copied"].record()
        if m:
            sc[0].index_copy_(0, sc[4, :m].long(), prev_tokens[sc[5, :m].long()].to(torch.int32))
        g.replay()
        return out
