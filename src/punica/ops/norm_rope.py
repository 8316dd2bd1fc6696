"""RMSNorm, rotary position embedding (HF's rotate-half convention, Llama-3 scaling) and SiLU-mul."""

from __future__ import annotations

import math

import torch

from punica.config import rope_type
from punica.ops import pdl
from punica.ops.pdl import pdl_start

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # the torch backend runs without Triton
    triton = tl = None
    _jit = lambda fn: fn  # noqa: E731


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """out = x / sqrt(mean(x**2) + eps) * weight, computed in fp32. x: [T, H]; weight: [H]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.to(x.dtype) * weight) if weight.dtype == x.dtype else (xf * weight.float()).to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x (+ delta, rounded to x's dtype: a LoRA delta not yet added) + residual; return
    (rms_norm(residual), residual). x, residual, delta: [T, H]."""
    if delta is not None:
        x = x + delta
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


def silu_and_mul_torch(x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """out = silu(x[:, :I]) * x[:, I:] of x (+ delta, rounded to x's dtype: a LoRA delta not yet added).
    x, delta: [T, 2I]; returns [T, I]."""
    if delta is not None:
        x = x + delta
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], scaled as `scaling` says (linear, Llama 3's, YaRN's, or longrope's: its
    short-context factors, or with `long` its long-context ones)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = rope_type(scaling)
    if kind in ("default", None):
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "yarn":
        return _yarn_inv_freq(inv, head_dim, theta, scaling).float()
    if kind == "longrope":
        return (inv / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)).float()
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, yarn, "
                         "longrope)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


def _yarn_inv_freq(inv: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN: the fast-rotating dimensions as they are, the slow ones divided by the factor, a linear ramp between.
    The ramp runs over the dimensions that turn between beta_fast and beta_slow times over the pretraining length."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over old_len positions
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    span = high - low if high != low else 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp)


def rope_attention_scale(scaling: dict | None) -> float:
    """What the rope table's cos and sin are multiplied by: YaRN's attention factor (given, or 0.1 ln(factor) + 1,
    or DeepSeek's ratio of two such from mscale / mscale_all_dim), longrope's (given, or sqrt(1 + ln(factor) /
    ln(pretraining length))), else 1."""
    kind = rope_type(scaling)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    if kind == "longrope":
        old_len = scaling["original_max_position_embeddings"]
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))

    def m(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1.0)


def rope_table(head_dim: int, theta: float, scaling: dict | None, max_positions: int,
               rotary_dim: int | None = None) -> torch.Tensor:
    """The model's rope table (rope_cos_sin, times rope_attention_scale); for longrope two, the short-context
    factors' rows then the long-context ones' (Sequence.rope_long picks). With a partial `rotary_dim` the
    frequencies are its, and the dimension pairs past them turn by nothing (cos 1, sin 0): the model's q/k rows
    are ordered so (ModelConfig.rotary_row_order)."""
    rotary_dim = rotary_dim or head_dim
    scale = rope_attention_scale(scaling)
    tables = [rope_cos_sin(rope_inv_freq(rotary_dim, theta, scaling, long), max_positions, scale)
              for long in ((False, True) if rope_type(scaling) == "longrope" else (False,))]
    table = torch.cat(tables)
    if rotary_dim == head_dim:
        return table
    cos, sin = table.chunk(2, dim=-1)
    still = head_dim // 2 - rotary_dim // 2
    return torch.cat([cos, cos.new_ones(len(cos), still), sin, sin.new_zeros(len(sin), still)], dim=-1)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int, scale: float = 1.0) -> torch.Tensor:
    """The table [max_positions, head_dim] holding cos in the first half and sin in the second, times `scale`
    (rope_attention_scale)."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return table * scale if scale != 1.0 else table


def apply_rope_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by position (rotate-half pairs (i, i + D/2)); returns new tensors."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# ---- Triton kernels: one program per token row, fp32 math, roundings placed where the references round.

@_jit
def _rms_norm_kernel(x_ptr, d_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, H, eps,
                     ADD: tl.constexpr, HAS_DELTA: tl.constexpr, ROUND_FIRST: tl.constexpr, BLOCK_H: tl.constexpr,
                     PDL: tl.constexpr):
    """Row t: s = x (+ d, same strides; + residual, rounded and stored when ADD); out = s * rsqrt(mean(s^2) +
    eps) * w."""
    pdl_start(PDL)
    t = tl.program_id(0)
    i = tl.arange(0, BLOCK_H)
    mask = i < H
    xf = _load_sum(x_ptr, d_ptr, t * stride_x + i, mask, HAS_DELTA)
    if ADD:
        x = (xf + tl.load(res_ptr + t * stride_r + i, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + t * H + i, x, mask=mask)
        xf = x.to(tl.float32)
    y = xf * (1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps))
    if ROUND_FIRST:  # the reference casts to x.dtype before multiplying by a weight of that dtype
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + i, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     delta: torch.Tensor | None = None):
    if x.dim() != 2 or weight.shape != (x.shape[1],) or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} must be [T, H] with unit last stride, weight [H], got "
                         f"{tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    _check_delta("x", x, delta)
    t, h = x.shape
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if t:
        block = triton.next_power_of_2(h)
        res = x if residual is None else residual
        _rms_norm_kernel[(t,)](x, x if delta is None else delta, res, weight, out, res_out, x.stride(0),
                               res.stride(0), h, eps, ADD=residual is not None, HAS_DELTA=delta is not None,
                               ROUND_FIRST=weight.dtype == x.dtype, BLOCK_H=block,
                               num_warps=8 if block >= 4096 else 4, **pdl.options(x))
    return out, res_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_torch in one launch. x: [T, H]; weight: [H]; returns [T, H] in x.dtype."""
    return _rms_norm_launch(x, None, weight, eps)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_torch in one launch: (rms_norm(x (+ delta) + residual), x (+ delta) + residual); new
    tensors. x, residual: [T, H]; delta with x's strides."""
    if residual is None:
        raise ValueError("add_rms_norm needs a residual")
    return _rms_norm_launch(x, residual, weight, eps, delta)


@_jit
def _load_sum(x_ptr, d_ptr, offs, mask, HAS_DELTA: tl.constexpr):
    """x[offs] (+ d[offs], rounded to x's dtype as a torch add would) in fp32."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@_jit
def _silu_and_mul_kernel(x_ptr, d_ptr, out_ptr, stride_x, inter, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    """Row t, columns block c: out = silu(gate) * up of x (+ d, same strides), rounding silu to the input
    dtype as torch does."""
    pdl_start(PDL)
    t, c = tl.program_id(0), tl.program_id(1)
    i = c * BLOCK + tl.arange(0, BLOCK)
    mask = i < inter
    gate = _load_sum(x_ptr, d_ptr, t * stride_x + i, mask, HAS_DELTA)
    up = _load_sum(x_ptr, d_ptr, t * stride_x + inter + i, mask, HAS_DELTA)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * inter + i, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _check_delta(name: str, x: torch.Tensor, delta: torch.Tensor | None) -> None:
    if delta is not None and (delta.shape != x.shape or delta.stride() != x.stride() or delta.dtype != x.dtype):
        raise ValueError(f"delta for {name} must match it in shape, strides and dtype: {tuple(delta.shape)} "
                         f"{delta.stride()} {delta.dtype} vs {tuple(x.shape)} {x.stride()} {x.dtype}")


def silu_and_mul_triton(x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul_torch in one launch. x, delta: [T, 2I] (delta with x's strides); returns [T, I]."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} must be [T, 2I] with unit last stride")
    _check_delta("x", x, delta)
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, inter), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](x, x if delta is None else delta, out, x.stride(0),
                                                             inter, HAS_DELTA=delta is not None, BLOCK=block,
                                                             **pdl.options(x))
    return out


@_jit
def _norm_heads(x1, x2, w_ptr, eps, i, HALF: tl.constexpr, DTYPE: tl.constexpr, ROUND_FIRST: tl.constexpr):
    """rms_norm_torch over each head (row) of the halves x1, x2 [BLOCK_H, BLOCK_HALF] (fp32, zero where masked)
    with weight w [2 * HALF], rounded to DTYPE as the reference rounds; returns the two halves in fp32."""
    r = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    y1, y2 = x1 * r, x2 * r
    if ROUND_FIRST:  # the reference casts to x's dtype before multiplying by a weight of that dtype
        y1, y2 = y1.to(DTYPE).to(tl.float32), y2.to(DTYPE).to(tl.float32)
    w1 = tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    return (y1 * w1).to(DTYPE).to(tl.float32), (y2 * w2).to(DTYPE).to(tl.float32)


@_jit
def _rotate_heads(x_ptr, o_ptr, t, row, stride_t, stride_h, cos, sin, H: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, d_ptr, HAS_DELTA: tl.constexpr, w_ptr=None,
                  eps=0.0, NORM: tl.constexpr = False, ROUND_FIRST: tl.constexpr = True):
    """Rotate the H heads of token t (+ d's, same strides) into contiguous row `row` of o: (x1, x2) ->
    (x1 cos - x2 sin, x2 cos + x1 sin), pairs (i, i + HALF), rounded to o's dtype as the reference rounds.
    NORM: each head RMS-normalized with weight w first (Qwen3's q_norm / k_norm)."""
    h, i = tl.arange(0, BLOCK_H)[:, None], tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < H) & (i < HALF)
    offs = t * stride_t + h * stride_h + i
    x1 = _load_sum(x_ptr, d_ptr, offs, mask, HAS_DELTA)
    x2 = _load_sum(x_ptr, d_ptr, offs + HALF, mask, HAS_DELTA)
    if NORM:
        x1, x2 = _norm_heads(x1, x2, w_ptr, eps, i, HALF, x_ptr.dtype.element_ty, ROUND_FIRST)
    dst = o_ptr + (row * H + h) * (2 * HALF) + i
    rounded = x_ptr.dtype.element_ty  # the reference returns x's dtype, which the cache may then convert
    tl.store(dst, (x1 * cos - x2 * sin).to(rounded).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(rounded).to(o_ptr.dtype.element_ty), mask=mask)


@_jit
def _angles(cos_sin_ptr, pos_ptr, t, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """(cos, sin) [1, BLOCK_HALF] of token t's position, from the rope table."""
    i = tl.arange(0, BLOCK_HALF)[None, :]
    row = cos_sin_ptr + tl.load(pos_ptr + t).to(tl.int64) * (2 * HALF)
    return tl.load(row + i, mask=i < HALF, other=0.0), tl.load(row + HALF + i, mask=i < HALF, other=0.0)


@_jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt,
                 stride_kh, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    """Program t: rotate every q and k head of token t by the angles of positions[t]."""
    pdl_start(PDL)
    t = tl.program_id(0)
    cos, sin = _angles(cos_sin_ptr, pos_ptr, t, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, t, t, stride_qt, stride_qh, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF, q_ptr,
                  False)
    _rotate_heads(k_ptr, k_out_ptr, t, t, stride_kt, stride_kh, cos, sin, HKV, HALF, BLOCK_HKV, BLOCK_HALF, k_ptr,
                  False)


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                      cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope_torch in one launch; q, k may be strided views (unit head_dim stride); returns new tensors.

    q: [T, Hq, D]; k: [T, Hkv, D]; positions: [T] int; cos_sin: [max_positions, D] fp32 (rope_cos_sin).
    """
    t, h_q, d = q.shape
    if k.dim() != 3 or k.shape[0] != t or k.shape[2] != d or d % 2 or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} must be [T, H, D] (even D, unit last stride)")
    if positions.shape != (t,) or cos_sin.shape[1] != d or not cos_sin.is_contiguous():
        raise ValueError(f"positions {tuple(positions.shape)} must be [{t}] and cos_sin [max_positions, {d}] "
                         f"contiguous, got {tuple(cos_sin.shape)}")
    q_out = torch.empty((t, h_q, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty(tuple(k.shape), dtype=k.dtype, device=k.device)
    if t:
        _rope_kernel[(t,)](q, k, q_out, k_out, positions, cos_sin.float(), q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), HQ=h_q, HKV=k.shape[1], HALF=d // 2,
                           BLOCK_HQ=triton.next_power_of_2(h_q), BLOCK_HKV=triton.next_power_of_2(k.shape[1]),
                           BLOCK_HALF=triton.next_power_of_2(d // 2), **pdl.options(q))
    return q_out, k_out
