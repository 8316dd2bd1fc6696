"""Building blocks of the model. LoRA is a property of the linear layer: every projection is a
`LoRALinear`, which adds its adapters' deltas (one per output slice) through the SGMV op, or, in small
steps, hands the delta to the op that reads its output (`forward_deferred`, ops/lora_epilogue.py)."""

from __future__ import annotations

import torch
from torch import nn

from punica.model.batch import Batch
from punica.ops import Ops
from punica.ops.lora_epilogue import LoRADelta

# Above this many tokens the GEMM is compute-bound and long: running the LoRA beside it gains little, while
# its separate delta costs a zero-fill and an add over [T, out] (hundreds of MB for a 4096-token chunk).
SIDE_STREAM_MAX_TOKENS = 512
# Up to this many tokens a deferred delta's expand runs inside the next op (each token's row re-reads its
# adapter's B there, which is cheap while the step is small); above it the projection adds its delta itself.
DEFER_MAX_TOKENS = 512


class LoRALinear(nn.Module):
    """y = x @ W.T + b, then y[:, slice i] += LoRA_i(x) for each token's adapter.

    `out_slices` are the widths of the fused outputs (q, k, v for qkv; gate, up for gate_up). The adapter
    buffers `lora_a` [slots, n*R, in] and `lora_b` [slots, sum(out_slices), R] are attached by the
    AdapterPool (layout in ops/sgmv.py); until then the layer is a plain linear layer.
    """

    def __init__(self, ops: Ops, in_features: int, out_slices: tuple[int, ...], bias: bool = False):
        super().__init__()
        self.ops = ops
        self.in_features = in_features
        self.out_slices = out_slices
        offsets = [0]
        for width in out_slices:
            offsets.append(offsets[-1] + width)
        self.slice_offsets = tuple(offsets)
        self.weight = nn.Parameter(torch.empty(offsets[-1], in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(offsets[-1]), requires_grad=False) if bias else None
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.side_stream: torch.cuda.Stream | None = None  # set by LlamaModel.overlap_lora
        self.defer_max_tokens = DEFER_MAX_TOKENS  # forward_deferred defers up to this many tokens (defer_lora)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.lora_a is None or not batch.lora.has_lora:
            return nn.functional.linear(x, self.weight, self.bias)
        side = self.side_stream
        if side is None or x.shape[0] > SIDE_STREAM_MAX_TOKENS:
            y = nn.functional.linear(x, self.weight, self.bias)
            self.ops.add_lora(y, x, self.lora_a, self.lora_b, batch.slot_rank, batch.lora, self.slice_offsets)
            return y
        # the LoRA delta on a second stream, concurrently with the base GEMM (also inside CUDA graphs, where
        # the two become parallel branches): small latency-bound launches fill the GEMM's idle SMs
        delta = self._beside(x, lambda: torch.zeros(x.shape[0], self.slice_offsets[-1], dtype=x.dtype,
                                                    device=x.device),
                             lambda d: self.ops.add_lora(d, x, self.lora_a, self.lora_b, batch.slot_rank,
                                                         batch.lora, self.slice_offsets))
        return self._join(nn.functional.linear(x, self.weight, self.bias), delta).add_(delta)

    def forward_deferred(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, LoRADelta | None]:
        """(x @ W.T + b, its LoRA delta not yet added), for a caller that passes the delta to the op reading
        the output (add_rms_norm, silu_and_mul). Big steps and steps without adapters return (y + delta, None)."""
        if self.lora_a is None or not batch.lora.has_lora or x.shape[0] > self.defer_max_tokens:
            return self(x, batch), None
        n = len(self.out_slices)
        v = self._beside(x, lambda: torch.empty(x.shape[0], self.lora_a.shape[1], dtype=torch.float32,
                                                device=x.device),
                         lambda v: self.ops.sgmv_shrink(x, self.lora_a, batch.slot_rank, batch.lora, v, n))
        y = self._join(nn.functional.linear(x, self.weight, self.bias), v)
        return y, LoRADelta(v, self.lora_b, batch.slot_rank, batch.lora, self.slice_offsets)

    def _beside(self, x: torch.Tensor, alloc, fill) -> torch.Tensor:
        """alloc() then fill(it), on the side stream when there is one (after the main stream's work so far)."""
        side = self.side_stream
        if side is None:
            out = alloc()
            fill(out)
            return out
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            out = alloc()
            fill(out)
        return out

    def _join(self, y: torch.Tensor, side_out: torch.Tensor) -> torch.Tensor:
        """y, once the main stream has waited for the side stream's work on `side_out`."""
        if self.side_stream is not None:
            main = torch.cuda.current_stream(y.device)
            main.wait_stream(self.side_stream)
            if not torch.cuda.is_current_stream_capturing():  # eager: keep side_out's memory until main is done
                side_out.record_stream(main)
        return y


class RMSNorm(nn.Module):
    def __init__(self, ops: Ops, hidden_size: int, eps: float):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, delta: LoRADelta | None = None):
        """Without `residual`: rms_norm(x). With it: (rms_norm(x (+ delta) + residual), x (+ delta) + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        if delta is None:
            return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps, delta)
