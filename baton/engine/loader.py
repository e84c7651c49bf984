"""Loads a Hugging Face safetensors checkpoint (memory-mapped) into the decoder.

Every parameter must be filled exactly once; a missing or unexpected tensor is an error
that names it. An FP8 checkpoint's weights (float8_e4m3fn with a block-wise
`<name>_scale_inv`) are dequantized into the model's dtype here; the runner requantizes
them per channel (quant.py).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from baton.engine.model import CausalLM, hf_to_param, param_to_hf, shard_bounds
from baton.engine.quant import FP8, dequantize_blocks

log = logging.getLogger(__name__)

# Tensors that checkpoints may carry and the decoder derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: CausalLM, model_dir: str | Path, progress: bool | None = None) -> None:
    d = Path(model_dir)
    start = time.monotonic()
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {d}")
    params = dict(model.named_parameters())
    # packed parameters need every shard; plain ones need one tensor
    todo: dict[str, set] = {}
    for name in params:
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            todo[name] = {0, 1, 2}
        elif name.endswith("gate_up_proj.weight"):
            todo[name] = {0, 1}
        else:
            todo[name] = {None}
    unexpected = []
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else (total > 1 << 30 and sys.stderr.isatty())
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(params), desc=f"loading {d.name}", unit="tensor")
    with torch.no_grad(), ExitStack() as stack:
        handles = [(f, stack.enter_context(safe_open(str(f), framework="pt"))) for f in files]
        # a weight's scale_inv may sit in another shard file than the weight
        where = {name: st for _, st in handles for name in st.keys()}
        for f, st in handles:
            for hf_name in st.keys():
                if hf_name.endswith(_IGNORED_SUFFIXES):
                    continue
                if hf_name.endswith(".weight_scale_inv") and hf_name[: -len("_scale_inv")] in where:
                    continue  # read with its weight
                if hf_name == "lm_head.weight" and model.lm_head is None:
                    continue  # tied embeddings: the checkpoint may store a copy
                ours, shard = hf_to_param(hf_name, model)
                if ours not in params or shard not in todo.get(ours, ()):
                    unexpected.append(hf_name)
                    continue
                t = st.get_tensor(hf_name)
                if t.dtype == FP8:
                    t = _dequantize(t, hf_name, where, model.cfg.fp8_weight_block, f.name)
                p = params[ours]
                dst = p.data if shard is None else p.data[slice(*shard_bounds(model, ours, shard))]
                if dst.shape != t.shape:
                    raise ValueError(
                        f"{f.name}: tensor {hf_name} has shape {tuple(t.shape)}, "
                        f"the config expects {tuple(dst.shape)}"
                    )
                dst.copy_(t)
                todo[ours].discard(shard)
                if bar is not None and not todo[ours]:
                    bar.update()
    if bar is not None:
        bar.close()
    missing = sorted(param_to_hf(n, shard) for n, s in todo.items() for shard in s)
    if missing or unexpected:
        msg = [f"checkpoint {d} does not match the model config"]
        if missing:
            msg.append(f"missing tensors for: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            msg.append(f"unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        raise ValueError("; ".join(msg))
    # a pod's log says what its start-up spent here (the bar above is for terminals only)
    log.info("loaded %d tensors (%.0f MB) from %s in %.1f s", len(params), total / 2**20, d, time.monotonic() - start)


def _dequantize(w8, name, where, block, file_name):
    scale_name = name + "_scale_inv"
    if block is None or scale_name not in where:
        raise ValueError(
            f"{file_name}: tensor {name} is float8_e4m3fn but "
            + ("config.json has no quantization_config with weight_block_size" if block is None
               else f"the checkpoint has no {scale_name}")
        )
    return dequantize_blocks(w8, where[scale_name].get_tensor(scale_name), block)


def random_weights(model: CausalLM, seed: int = 0) -> None:
    """Fill every parameter with small random values (norms near 1): throughput does not
    depend on the weights' values, only on their shapes."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
