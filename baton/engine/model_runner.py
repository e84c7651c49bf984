"""Runs one scheduled step: builds the step's inputs, runs the decoder, samples.

Owns the model, the paged KV cache tensor and (on CUDA) the captured decode graphs.
"""

from __future__ import annotations

import os

import logging
from typing import Callable

import numpy as np
import torch

from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.loader import load_weights, random_weights
from baton.engine.model import AttentionMetadata, CausalLM
from baton.engine.rope import cos_sin_cache
from baton.engine.sampler import SampleResult, sample
from baton.engine.scheduler import ScheduledSeq

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]


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
            model = CausalLM(model_cfg, max_positions=max_model_len)
        self.model = model.to(dtype=self.dtype).to_empty(device=self.device)
        # rope tables stay float32 (recomputed: .to(dtype) above rounded them)
        self.model.cos_sin = cos_sin_cache(model_cfg.head_dim, model_cfg.rope_theta, model_cfg.rope_scaling,
                                           max_model_len).to(self.device)
        if config.load_format == "random":
            random_weights(self.model)
        elif config.load_format == "safetensors":
            load_weights(self.model, model_dir)
        else:
            raise ValueError(f"load_format must be safetensors or random, got {config.load_format!r}")
        self.model.eval()
        self.num_blocks = self._num_blocks()
        self.kv_cache = torch.empty(
            model_cfg.num_layers, 2, self.num_blocks, self.block_size, model_cfg.num_kv_heads,
            model_cfg.head_dim, dtype=self.dtype, device=self.device,
        )
        if os.environ.get("BATON_POISON_KV") == "1":
            # debugging aid and test setting: any read of KV no step wrote turns into NaN
            self.kv_cache.fill_(float("nan"))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        if self.device.type == "cuda" and config.cuda_graphs:
            self._capture_graphs()

    # -- set-up --------------------------------------------------------------------------
    def _num_blocks(self) -> int:
        c = self.config
        per_block = self.cfg.kv_bytes_per_token(self.dtype.itemsize) * self.block_size
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # keep room for activations of the largest step and the graphs' pools
            act = c.max_num_batched_tokens * (self.cfg.hidden_size * 4 + self.cfg.intermediate_size * 2 + self.cfg.vocab_size) * 4
            budget = free - total * (1 - c.gpu_memory_utilization) - act
            return max(1, int(budget // per_block))
        return max(1, c.kv_cache_bytes // per_block)

    # -- inputs --------------------------------------------------------------------------
    def _tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        t = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def slots(self, seq, start: int, end: int) -> torch.Tensor:
        """Cache slots of seq's tokens [start, end), on the cache's device."""
        bs, table = self.block_size, seq.block_table
        return self._tensor([table[p // bs] * bs + p % bs for p in range(start, end)], torch.int64)

    def prepare(self, batch: list[ScheduledSeq]):
        bs = self.block_size
        input_ids, positions, slots, cu, ctx, tables = [], [], [], [0], [], []
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            cu.append(cu[-1] + s.num_new_tokens)
            ctx.append(end)
            tables.append(table)
        decode = all(s.num_new_tokens == 1 for s in batch)
        width = max(len(t) for t in tables)
        padded = np.zeros((len(tables), width), dtype=np.int32)  # numpy: 2x faster than torch.tensor on lists
        for i, t in enumerate(tables):
            padded[i, : len(t)] = t
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            context_lens=self._tensor(ctx),
            block_tables=self._tensor(padded),
            cu_seqlens_q=None if decode else self._tensor(cu),
            max_q_len=max(s.num_new_tokens for s in batch),
        )
        last = [c - 1 for c, s in zip(cu[1:], batch) if s.samples]
        return (self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta, last)

    # -- running -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self, batch: list[ScheduledSeq], on_layer_done: Callable[[int], None] | None = None
    ) -> SampleResult | None:
        """Compute the step's KV; sample for sequences that reach their last token."""
        input_ids, positions, meta, last = self.prepare(batch)
        n = len(batch)
        graph = None
        if meta.is_decode and on_layer_done is None and self.graphs:
            graph = next((b for b in sorted(self.graphs) if b >= n), None)
        if graph is not None:
            hidden = self._replay(graph, input_ids, positions, meta)[:n]
        else:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, on_layer_done)
        if not last:
            return None
        logits = self.model.compute_logits(hidden[last])
        samplers = [s.seq for s in batch if s.samples]
        return sample(logits, [s.params for s in samplers], [s.generator for s in samplers])

    # -- CUDA graphs for decode steps ----------------------------------------------------
    def _capture_graphs(self) -> None:
        max_bs = min(self.config.max_num_seqs, GRAPH_BATCH_SIZES[-1])
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_bs]
        dev = self.device
        big = sizes[-1]
        static = dict(
            input_ids=torch.zeros(big, dtype=torch.int64, device=dev),
            positions=torch.zeros(big, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((big,), -1, dtype=torch.int64, device=dev),
            context_lens=torch.ones(big, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(big, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
        )
        pool = None
        for b in reversed(sizes):
            meta = AttentionMetadata(
                slot_mapping=static["slot_mapping"][:b], context_lens=static["context_lens"][:b],
                block_tables=static["block_tables"][:b], cu_seqlens_q=None,
            )
            args = (static["input_ids"][:b], static["positions"][:b], self.kv_cache, meta)
            with torch.inference_mode():
                self.model(*args)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = self.model(*args)
            pool = g.pool()
            self.graphs[b] = (g, dict(static, out=out))
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", sizes)

    def _replay(self, b: int, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        g, st = self.graphs[b]
        n = input_ids.shape[0]
        st["input_ids"][:n].copy_(input_ids)
        st["positions"][:n].copy_(positions)
        st["slot_mapping"].fill_(-1)
        st["slot_mapping"][:n].copy_(meta.slot_mapping)
        st["context_lens"].fill_(1)
        st["context_lens"][:n].copy_(meta.context_lens)
        w = meta.block_tables.shape[1]
        st["block_tables"][:n, :w].copy_(meta.block_tables)
        g.replay()
        return st["out"]
