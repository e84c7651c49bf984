"""FP8 (e4m3) weights: quantizing, dequantizing, and the linear layer that multiplies in FP8.

Weights are stored per output channel: w ~= w8[n, :] * w_scale[n]. Activations are
quantized per token at each call (dynamic): x ~= x8[t, :] * x_scale[t]. The product is
(x8 @ w8.T) * x_scale[t] * w_scale[n], which kernels' fp8_matmul computes on CUDA
(torch._scaled_mm: FP8 tensor cores, float32 accumulation) and reference.fp8_matmul
computes in float32 anywhere else.

FP8 checkpoints in Hugging Face's layout (Qwen3-8B-FP8: block-wise `weight_scale_inv`, one
float32 per 128x128 block, w = w8 * scale_inv[block]) are dequantized at load and requantized
per channel, so one matmul path serves both kinds of model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from baton.kernels import ops

FP8 = torch.float8_e4m3fn


class Fp8Rows(NamedTuple):
    """Activations already quantized per row (x ~= x8 * scale) by the op before an FP8
    linear (RMSNorm with fp8=True), so the linear skips its own quantizing pass; `dtype`: the
    activations' dtype, which the linear's output takes."""

    x8: torch.Tensor  # [..., K] float8_e4m3fn
    scale: torch.Tensor  # [..., 1] float32
    dtype: torch.dtype


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x8 FP8 [..., K], scale float32 [..., 1]) with x ~= x8 * scale, one scale a
    row (a weight's output channel, an activation's token): kernels' quantize_rows."""
    x8, scale = ops.quantize_rows(x.reshape(-1, x.shape[-1]))
    return x8.view(x.shape), scale.view(*x.shape[:-1], 1)


def dequantize_blocks(w8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A block-wise FP8 weight [N, K] (scale_inv [ceil(N/bn), ceil(K/bk)]) in float32."""
    bn, bk = block
    n, k = w8.shape
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv is {tuple(scale_inv.shape)}, a {n}x{k} weight in "
                         f"{bn}x{bk} blocks needs {want}")
    s = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return w8.float() * s


def fp8_linear(x8, x_scale, w8, w_scale, bias, out_dtype):
    """x8 [M, K] (quantized per token, x_scale [M, 1]) times the per-channel FP8 weight: on
    CUDA at decode's few rows the Triton FP8 matmul (torch._scaled_mm took 1.3-1.6x as long
    there), else ops.fp8_matmul (torch._scaled_mm on CUDA, reference.fp8_matmul's float32
    maths elsewhere)."""
    if x8.is_cuda and ops._TRITON_ON:  # BATON_TRITON=0: _scaled_mm, as the facade does
        from baton.kernels import triton_fp8_matmul

        if triton_fp8_matmul.handles(x8.shape[0]):
            return triton_fp8_matmul.fp8_matmul(x8, x_scale, w8, w_scale, bias, out_dtype)
    return ops.fp8_matmul(x8, x_scale, w8, w_scale, bias, out_dtype)


class Fp8Linear(nn.Module):
    """nn.Linear's contract over an FP8 weight [out, in] with per-output-channel scales; it
    also takes activations already quantized (Fp8Rows)."""

    takes_fp8 = True  # the model's norms hand it Fp8Rows (one kernel instead of two)

    def __init__(self, weight8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight8.shape[1], weight8.shape[0]
        self.register_buffer("weight8", weight8)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._w_cpu: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Fp8Linear":
        w8, scale = quantize_rows(lin.weight.data)
        return cls(w8, scale, None if lin.bias is None else lin.bias.data)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):
            shape, dtype = x.x8.shape, x.dtype
            x8, x_scale = x.x8.reshape(-1, shape[-1]), x.scale.reshape(-1, 1)
        else:
            shape, dtype = x.shape, x.dtype
            x8, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
        if x8.is_cuda:
            y = fp8_linear(x8, x_scale, self.weight8, self.weight_scale, self.bias, dtype)
        else:
            # fp8_linear's maths with the weight dequantized once: torch's CPU cast from FP8
            # is slow (SmolLM2 generated 14x slower converting the weights at every step)
            if self._w_cpu is None:
                self._w_cpu = self.dequantized()
            y = (x8.float() * x_scale) @ self._w_cpu.t()
            y = (y if self.bias is None else y + self.bias.float()).to(dtype)
        return y.reshape(*shape[:-1], -1)

    def dequantized(self) -> torch.Tensor:
        return self.weight8.float() * self.weight_scale[:, None]


def quantize_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of the decoder layers (not the LM head, not embeddings: as
    published FP8 checkpoints do) by an Fp8Linear, in place; returns how many."""
    layers = getattr(model, "layers")
    count = 0
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fp8Linear.from_linear(child))
                    count += 1
    return count
