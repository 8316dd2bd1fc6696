"""Building blocks of the model. LoRA is a property of the linear layer: every projection is a
`LoRALinear`, which adds its adapters' deltas (one per output slice) through the SGMV op."""

from __future__ import annotations

import torch
from torch import nn

from punica.model.batch import Batch
from punica.ops import Ops
from punica.ops.gemm import dequantize_rows, quantize_rows_fp8

# Above this many tokens the GEMM is compute-bound and long: running the LoRA beside it gains little, while
# its separate delta costs a write and a read of [T, out] (hundreds of MB for a 4096-token chunk). Measured on an
# H200 at 1074 tokens (batch 128, distinct / identical adapters): 40.6 / 38.7 ms with the LoRA after each GEMM,
# 40.1-40.8 / 38.7-39.4 under every side-stream arrangement (benchmarks/results/textgen_NOTES.md, session 16).
SIDE_STREAM_MAX_TOKENS = 512
# The side stream's delta is written by the expand itself (add_lora overwrite) instead of zero-filled first
DELTA_OVERWRITE = True
# Steps of more than this many tokens on the main stream run the LoRA first: the expand writes the delta as y
# (overwrite) and the GEMM adds x @ W.T to it in its epilogue (ops.linear_add). The expand then no longer reads
# and rewrites the GEMM's [T, out] output. Projections with a bias, or float8 weights (their GEMM has no
# accumulating form), keep the GEMM first.
DELTA_FIRST_MIN_TOKENS = SIDE_STREAM_MAX_TOKENS


class LoRALinear(nn.Module):
    """y = x @ W.T + b, then y[:, slice i] += LoRA_i(x) for each token's adapter.

    `out_slices` are the widths of the fused outputs (q, k, v for qkv; gate, up for gate_up). The adapter
    buffers `lora_a` [slots, n*R, in] and `lora_b` [slots, sum(out_slices), R] are attached by the
    AdapterPool (layout in ops/sgmv.py); until then the layer is a plain linear layer. After
    `quantize_fp8_`, W is float8 e4m3 with a scale per output row (`weight_scale`); x, y and the adapters keep
    the model's dtype.
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
        self.register_buffer("weight_scale", None, persistent=False)  # [out] fp32 once quantized
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.dora_scale: torch.Tensor | None = None  # [slots, out] with DoRA served (AdapterPool)
        self.side_stream: torch.cuda.Stream | None = None  # set by LlamaModel.overlap_lora
        self.overlap = "none"

    def quantize_fp8_(self) -> None:
        """W becomes float8 e4m3 with one fp32 scale per output row (EngineConfig.quantization "fp8"); the
        16-bit weight is freed."""
        q, scale = quantize_rows_fp8(self.weight.data)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale

    def dense_weight(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows of W in `dtype`, dequantized if W is float8 (DoRA's row norms read them)."""
        return dequantize_rows(self.weight[rows], None if self.weight_scale is None else self.weight_scale[rows],
                               dtype)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None, beside_lora: bool = False) -> torch.Tensor:
        return self.ops.linear(x, self.weight, bias, beside_lora=beside_lora, weight_scale=self.weight_scale)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        y, delta = self.forward_deferred(x, batch)
        return y if delta is None else y.add_(delta)

    def forward_deferred(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, delta): the output is y + delta; delta (computed beside the GEMM, overlap "delta") is None when
        already added. The caller folds the add into its next kernel (rope_store_kv, silu_and_mul, add_rms_norm)."""
        if self.lora_a is None or not batch.lora.has_lora:
            return self._linear(x, self.bias), None
        # DoRA: y = bias + scale[slot] * (x @ W.T + delta) per token; the expand scales as it adds, so the delta
        # cannot be written on its own (first, or beside the GEMM): where a side stream serves, only the shrink
        # runs there
        dora, bias = self.dora_scale, self.bias if self.dora_scale is None else None
        side = self.side_stream
        if side is None or x.shape[0] > SIDE_STREAM_MAX_TOKENS:
            if x.shape[0] > DELTA_FIRST_MIN_TOKENS and self.bias is None and dora is None and self.weight_scale is None:
                y = torch.empty(x.shape[0], self.slice_offsets[-1], dtype=x.dtype, device=x.device)
                self.ops.add_lora(y, x, self.lora_a, self.lora_b, batch.slot_rank, batch.lora, self.slice_offsets,
                                  overwrite=True)
                self.ops.linear_add(y, x, self.weight)
                return y, None
            y = self._linear(x, bias, beside_lora=True)
            self.ops.add_lora(y, x, self.lora_a, self.lora_b, batch.slot_rank, batch.lora, self.slice_offsets,
                              scale=dora)
            return self._dora_bias(y), None
        # LoRA work on a second stream, concurrently with the base GEMM (inside CUDA graphs the two become
        # parallel branches): its small latency-bound launches fill the GEMM's idle SMs
        overlap = "shrink" if dora is not None else self.overlap
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if overlap == "shrink":  # v = x @ A beside the GEMM; y += v @ B after it, in place
                out = torch.empty(x.shape[0], self.lora_a.shape[1], dtype=torch.float32, device=x.device)
                self.ops.sgmv_shrink(x, self.lora_a, batch.slot_rank, batch.lora, out, len(self.out_slices))
            else:  # the whole delta beside the GEMM, added after it; the expand writes every row (no zero-fill)
                new = torch.empty if DELTA_OVERWRITE else torch.zeros
                out = new(x.shape[0], self.slice_offsets[-1], dtype=x.dtype, device=x.device)
                self.ops.add_lora(out, x, self.lora_a, self.lora_b, batch.slot_rank, batch.lora, self.slice_offsets,
                                  overwrite=DELTA_OVERWRITE)
        y = self._linear(x, bias, beside_lora=True)
        main.wait_stream(side)
        if not torch.cuda.is_current_stream_capturing():  # eager: keep out's memory until main is done with it
            out.record_stream(main)
        if overlap == "shrink":
            self.ops.sgmv_expand(out, self.lora_b, batch.slot_rank, batch.lora, y, self.slice_offsets, dora)
            return self._dora_bias(y), None
        return y, out

    def _dora_bias(self, y: torch.Tensor) -> torch.Tensor:
        """y, plus the bias where DoRA left it out of the scaled sum."""
        return y.add_(self.bias) if self.dora_scale is not None and self.bias is not None else y


class RMSNorm(nn.Module):
    def __init__(self, ops: Ops, hidden_size: int, eps: float):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, delta: torch.Tensor | None = None):
        """Without `residual`: rms_norm(x). With it: (rms_norm(x + residual), x + residual), x + delta first
        when given (a LoRA delta not yet added to x)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps, delta)
