"""Paged attention over the KV pool, for prefill chunks and decodes in one call.

Sequence b has query tokens q[cu_q[b]:cu_q[b+1]] that are the *last* q_len(b) of its kv_len(b) tokens
(their K/V are already stored); its K/V live in blocks block_tables[b, 0..ceil(kv_len/block_size)).
Query j of sequence b (absolute position kv_len - q_len + j) attends causally to positions <= its own.
The pool holds q's dtype or float8_e4m3fn (CacheConfig.kv_cache_dtype "fp8"), converted to q's dtype as read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from punica.ops import pdl
from punica.ops.pdl import pdl_start

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # the torch backend runs without Triton
    triton = tl = None
    _jit = lambda fn: fn  # noqa: E731

# With an fp8 cache and a bf16 or fp16 q, the kernels compute their dots in fp16: e4m3 converts to fp16 in one
# instruction on sm_89 and later, to bf16 in several; q (bf16) fits fp16's 10-bit mantissa, its range clamped.
FP8_DOT_FP16 = True
# Steps that mix prefill chunks with decodes run their one-query sequences through the decode kernel and only
# the longer ones through the prefill kernel, whose 64-row query tiles would hold one real row per decode.
SPLIT_MIXED = True
# Which caches the decode kernel reads as its dots' first operand (scores^T = K q^T, out^T = V^T p): "never",
# "fp8" or "always". As the first operand a converted fp8 tile feeds Hopper's tensor cores (wgmma) from registers.
# On an H200 with an fp8 cache (batch 32, Llama-2-7B sizes) it won alone (53.4 against 62.4 us per layer at context
# 400) and in decode-graph replays (-4.2% at context 400, -5.4% at 1000), but lost 2% of text generation's tokens/s
# in two runs, in either order; so it stays off until that is explained (benchmarks/results/textgen_NOTES.md).
DECODE_KV_AS_A = "never"
# ... and on CUDA the prefill kernel runs on a second, higher-priority stream beside the decode kernel (two
# branches in a CUDA graph): a chunk's few long programs start first instead of trailing the decodes' wave.
OVERLAP_MIXED = True
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


@dataclass
class AttentionMeta:
    """Per-step attention metadata (a field of the model's Batch).

    cu_q:         [B+1] int32 query offsets
    kv_lens:      [B] int32 tokens of context per sequence, including this step's
    block_tables: [B, max_blocks] int32 block ids (unused tail entries are 0)
    max_q_len / max_kv_len: host ints (grid bounds); host_cu_q / host_kv_lens: the same as lists
    q_tiles:      optional [N, 2] int32 work list (sequence, query block of `tile_rows` rows), padded with
                  sequence -1: when given, the prefill kernel runs one program per entry, so its grid
                  depends on N alone (CUDA graphs of mixed steps); built by query_tiles
    seq_order:    optional [B] int32 permutation of the sequences, longest context first: decode programs
                  then start in that order (all heads of a sequence together), so the longest contexts do
                  not run last (set by the CUDA-graph runner for decode steps)
    """

    cu_q: torch.Tensor
    kv_lens: torch.Tensor
    block_tables: torch.Tensor
    max_q_len: int
    max_kv_len: int
    host_cu_q: list[int]
    host_kv_lens: list[int]
    q_tiles: torch.Tensor | None = None
    tile_rows: int = 0
    seq_order: torch.Tensor | None = None

    @functools.cached_property
    def has_single_query(self) -> bool:
        """Whether some sequence has exactly one query (once per step, not per layer)."""
        cu = self.host_cu_q
        return any(cu[b + 1] - cu[b] == 1 for b in range(len(cu) - 1))


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMeta, scale: float) -> torch.Tensor:
    """out[t] = softmax(q[t] @ K[:p(t)+1].T * scale) @ V[:p(t)+1] per head, GQA heads sharing K/V.

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; returns [T, Hq, D] in q.dtype.
    """
    num_blocks, block_size, h_kv, d = k_cache.shape
    group = q.shape[1] // h_kv
    out = torch.empty_like(q)
    for b, kv_len in enumerate(meta.host_kv_lens):
        q0, q1 = meta.host_cu_q[b], meta.host_cu_q[b + 1]
        if q1 == q0:
            continue
        n_blk = -(-kv_len // block_size)
        blocks = meta.block_tables[b, :n_blk].long()
        k = k_cache[blocks].reshape(-1, h_kv, d)[:kv_len].float()
        v = v_cache[blocks].reshape(-1, h_kv, d)[:kv_len].float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, kv, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[q0:q1].float().transpose(0, 1)  # [Hq, n, D]
        scores = (qb @ k.transpose(1, 2)) * scale
        q_pos = torch.arange(kv_len - (q1 - q0), kv_len, device=q.device)[:, None]
        mask = torch.arange(kv_len, device=q.device)[None, :] > q_pos
        scores.masked_fill_(mask, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


# ---- Triton kernels. Both read K/V token by token through the block table (any power-of-two page size) and
# keep an online softmax in base 2 (scores pre-multiplied by scale*log2(e)) with fp32 accumulators.

@_jit
def _softmax_step(qk, m_i, l_i, acc):
    """One online-softmax update with a tile of base-2 scores qk [M, N] (-inf where masked)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no inf - inf
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@_jit
def _softmax_step_t(kq, m_i, l_i, acc_t):
    """_softmax_step with the tiles transposed: scores kq [N, M], accumulator acc_t [D, M]."""
    m_new = tl.maximum(m_i, tl.max(kq, 0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(kq - m_use[None, :])
    alpha = tl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + tl.sum(p, 0), acc_t * alpha[None, :]


@_jit
def _dot_dtype(q, FP16_DOT: tl.constexpr):
    """q as the dots take it: in fp16 (its range clamped to fp16's) with FP16_DOT, else as loaded. K and V are
    converted to q's dtype as they are read."""
    if FP16_DOT:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@_jit
def _kv_offsets(bt_row_ptr, n, valid, kv_head, stride_kb, stride_ks, stride_kh, PAGE: tl.constexpr):
    """Element offsets [N] of tokens n of one sequence (block-table row bt_row_ptr) in the paged cache."""
    page = tl.load(bt_row_ptr + n // PAGE, mask=valid, other=0).to(tl.int64)
    return page * stride_kb + (n % PAGE) * stride_ks + kv_head * stride_kh


@_jit
def _k_tile(k_ptr, bt_row_ptr, n0, end, kv_head, d, stride_kb, stride_ks, stride_kh, PAGE: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """Tokens n0 .. n0 + BLOCK_N of one sequence, those before `end` valid: (n, valid, offsets, K rows as stored)."""
    n = n0 + tl.arange(0, BLOCK_N)
    valid = n < end
    off = _kv_offsets(bt_row_ptr, n, valid, kv_head, stride_kb, stride_ks, stride_kh, PAGE)
    return n, valid, off, tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)


@_jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr, cu_q_ptr, kv_lens_ptr, bt_ptr,
                   order_ptr, scale_log2, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                   stride_ot, stride_oh, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PREC: tl.constexpr,
                   ORDERED: tl.constexpr, FP16_DOT: tl.constexpr, KV_AS_A: tl.constexpr, PDL: tl.constexpr):
    """Program (b, kv head h, split s): the GROUP query heads of h over split s of b's context. ORDERED: the
    grid is (h, i, s) and b = order[i], so programs start in the order's sequence order. KV_AS_A: the dots
    transposed (DECODE_KV_AS_A)."""
    pdl_start(PDL)
    if ORDERED:
        h, b, s = tl.program_id(0), tl.load(order_ptr + tl.program_id(1)), tl.program_id(2)
        n_kv_heads = tl.num_programs(0)
    else:
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_kv_heads = tl.num_programs(1)
    row = tl.load(cu_q_ptr + b)
    if tl.load(cu_q_ptr + b + 1) - row != 1:  # no query (padding), or a prefill chunk (the prefill kernel's)
        return
    kv_len = tl.load(kv_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), SPLITS) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, kv_len)
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, HEAD_DIM)
    heads = h * GROUP + g
    q = _dot_dtype(tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                           mask=(g < GROUP)[:, None], other=0.0), FP16_DOT)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if KV_AS_A:  # transposed: scores [BLOCK_N, BLOCK_G] = K q^T, acc [HEAD_DIM, BLOCK_G] += V^T p
        q_t = tl.trans(q)
        acc_t = tl.zeros([HEAD_DIM, BLOCK_G], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            _, valid, off, k = _k_tile(k_ptr, bt_ptr + b * stride_bt, n0, end, h, d, stride_kb, stride_ks, stride_kh,
                                       PAGE, BLOCK_N)
            kq = tl.where(valid[:, None], tl.dot(k.to(q.dtype), q_t, input_precision=PREC) * scale_log2,
                          float("-inf"))
            p, m_i, l_i, acc_t = _softmax_step_t(kq, m_i, l_i, acc_t)
            v_t = tl.load(v_ptr + off[None, :] + d[:, None], mask=valid[None, :], other=0.0).to(q.dtype)
            acc_t += tl.dot(v_t, p.to(v_t.dtype), input_precision=PREC)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            _, valid, off, k = _k_tile(k_ptr, bt_ptr + b * stride_bt, n0, end, h, d, stride_kb, stride_ks, stride_kh,
                                       PAGE, BLOCK_N)
            qk = tl.where(valid[None, :], tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scale_log2,
                          float("-inf"))
            p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLITS == 1:
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
    else:
        part = (b * n_kv_heads * GROUP + heads) * SPLITS + s
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=(g < GROUP)[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g < GROUP)


@_jit
def _combine_kernel(part_o_ptr, part_lse_ptr, out_ptr, cu_q_ptr, stride_ot, stride_oh, HQ: tl.constexpr,
                    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """Program (b, head): out = sum_s 2^lse_s * o_s / sum_s 2^lse_s over the decode splits."""
    pdl_start(PDL)
    b, head = tl.program_id(0), tl.program_id(1)
    row = tl.load(cu_q_ptr + b)
    if tl.load(cu_q_ptr + b + 1) - row != 1:
        return
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, HEAD_DIM)
    part = (b * HQ + head) * SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # all splits empty (kv_len 0): w = 0
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    o = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty))


@_jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, kv_lens_ptr, bt_ptr, tiles_ptr, scale_log2,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, TILED: tl.constexpr,
                    SKIP_SINGLE: tl.constexpr, FP16_DOT: tl.constexpr, PDL: tl.constexpr):
    """Program (query tile m, b, head), or (work-list entry, 0, head) when TILED: flash attention of
    BLOCK_M queries of b, causal over the paged KV. SKIP_SINGLE: sequences of one query are the decode
    kernel's."""
    pdl_start(PDL)
    head = tl.program_id(2)
    if TILED:
        b = tl.load(tiles_ptr + 2 * tl.program_id(0))
        mb = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
        if b < 0:
            return
    else:
        mb, b = tl.program_id(0), tl.program_id(1)
    q0 = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q0
    if mb * BLOCK_M >= q_len or (SKIP_SINGLE and q_len == 1):
        return
    kv_len = tl.load(kv_lens_ptr + b)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = kv_len - q_len + rows
    d = tl.arange(0, HEAD_DIM)
    q = _dot_dtype(tl.load(q_ptr + (q0 + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                           mask=(rows < q_len)[:, None], other=0.0), FP16_DOT)
    end = tl.minimum(kv_len, kv_len - q_len + tl.minimum((mb + 1) * BLOCK_M, q_len))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        n, valid, off, k = _k_tile(k_ptr, bt_ptr + b * stride_bt, n0, end, head // GROUP, d, stride_kb, stride_ks,
                                   stride_kh, PAGE, BLOCK_N)
        keep = valid[None, :] & (n[None, :] <= pos[:, None])
        qk = tl.where(keep, tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scale_log2, float("-inf"))
        p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q0 + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=(rows < q_len)[:, None])


# ---- Wrappers.

def check_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMeta) -> None:
    """Raise ValueError unless the tensors follow paged_attention_torch's shapes and the kernels' limits."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} must be [T, Hq, D] and k/v caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} the same [num_blocks, block_size, Hkv, D]")
    _, block_size, h_kv, d = k_cache.shape
    if q.shape[2] != d or q.shape[1] % h_kv or d < 16 or d & (d - 1) or block_size & (block_size - 1):
        raise ValueError(f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}: need Hq % Hkv == 0 and "
                         "power-of-two head_dim >= 16 and block_size")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype} (the "
                         "caches hold q's dtype or float8_e4m3fn)")
    if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q needs a unit stride in head_dim and the caches must be contiguous")
    if meta.block_tables.stride(1) != 1 or len(meta.host_cu_q) != len(meta.host_kv_lens) + 1:
        raise ValueError("block_tables needs a unit last stride and host_cu_q must have B+1 entries")
    order = meta.seq_order
    if order is not None and (order.dtype != torch.int32 or tuple(order.shape) != (len(meta.host_kv_lens),)
                              or not order.is_contiguous()):
        raise ValueError(f"seq_order must be a contiguous [B] int32 tensor, got {order.dtype} {tuple(order.shape)}")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests cover the combine path at small sizes
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, h_kv: int, max_kv_len: int, device: torch.device) -> int:
    """Pieces each context is cut into (a power of two): enough programs for ~2 waves, >= 256 tokens each.

    Depends only on host ints, so a CUDA graph captured with max_kv_len = its capacity stays valid."""
    want = min(triton.cdiv(2 * _num_sms(device), max(batch * h_kv, 1)), triton.cdiv(max_kv_len, 256), 16)
    return 1 << max(want - 1, 0).bit_length()


def decode_config(head_dim: int, group: int, dtype: torch.dtype, device: torch.device | None = None,
                  kv_as_a: bool = False) -> dict:
    """Decode tiles: BLOCK_G query rows per program (the group padded to >= 16 for tensor cores), BLOCK_N tokens
    per step, launch options. Padded rows cost little: on an H200 the tensor-core path (pipelined cp.async
    loads) read Llama-2-7B's KV at 1.0-1.08x the copy-bandwidth floor, a CUDA-core path for MHA at 1.4-1.5x.
    Three stages where shared memory allows: at batch 32 on an H200 (benchmarks/bench_attention.py) 58.0 vs
    60.2 us per layer at context 400, 66.5 vs 68.1 at mixed contexts, 127.4 vs 131.9 at 1024. With the dots
    transposed (kv_as_a, an fp8 cache) one stage: 53.4 us at context 400 against 55.2 with two and 64.6 with three
    (the kernel issues instructions, not bytes, at its limit; fewer registers let 4 programs share an SM)."""
    block_n, stages = 64, 2
    tile_bytes = 2 * block_n * head_dim * 2  # a K and a V tile, 16-bit
    if kv_as_a:
        stages = 1
    elif dtype != torch.float32 and _smem_per_block(device) >= 3 * tile_bytes + (16 << 10):
        stages = 3
    return dict(BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
                num_warps=8 if dtype == torch.float32 else 4, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _smem_per_block(device: torch.device | None) -> int:
    """Shared memory a program may use (bytes), from Triton's driver; the interpreter has no limit that matters."""
    if device is None or device.type != "cuda":
        return 1 << 20
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except (AttributeError, KeyError, RuntimeError):
        return 48 << 10


def prefill_config(head_dim: int, dtype: torch.dtype, max_q_len: int) -> dict:
    """Prefill tiles (BLOCK_M queries x BLOCK_N keys) and launch options; fp32 and wide heads use small tiles."""
    wide = dtype == torch.float32 or head_dim > 128
    block_m = min(32 if wide else 64, max(16, triton.next_power_of_2(max_q_len)))
    return dict(BLOCK_M=block_m, BLOCK_N=32 if wide else 64, num_warps=8 if wide else 4, num_stages=2)


def _launch_args(q, k_cache, meta, out):
    return (meta.cu_q, meta.kv_lens, meta.block_tables), (
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMeta, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """paged_attention_torch for q_len <= 1 per sequence, each context split in pieces (flash decoding).

    Shapes as paged_attention_torch; num_splits defaults to decode_splits(...). Sequences with q_len 0 write
    nothing, those with kv_len 0 write zeros (padding for CUDA graphs).
    """
    check_attention_args(q, k_cache, v_cache, meta)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if len(meta.host_kv_lens) and q.shape[0]:
        _decode_into(out, q, k_cache, v_cache, meta, scale, num_splits)
    return out


def _decode_into(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMeta, scale: float, num_splits: int | None = None) -> None:
    """The decode kernel (and its split combine): out's rows of the sequences with exactly one query."""
    batch, (_, page, h_kv, d), h_q = len(meta.host_kv_lens), k_cache.shape, q.shape[1]
    splits = num_splits or decode_splits(batch, h_kv, meta.max_kv_len, q.device)
    group = h_q // h_kv
    part_o = q.new_empty((batch, h_q, splits, d) if splits > 1 else (1,), dtype=torch.float32)
    part_lse = q.new_empty((batch, h_q, splits) if splits > 1 else (1,), dtype=torch.float32)
    meta_args, strides = _launch_args(q, k_cache, meta, out)
    order, as_a = meta.seq_order, _kv_as_a(k_cache)
    grid = (batch, h_kv, splits) if order is None else (h_kv, batch, splits)
    _decode_kernel[grid](
        q, k_cache, v_cache, out, part_o, part_lse, *meta_args, meta.cu_q if order is None else order,
        scale * math.log2(math.e), *strides, GROUP=group, HEAD_DIM=d, PAGE=page, SPLITS=splits,
        PREC=_precision(q.dtype), ORDERED=order is not None, FP16_DOT=_fp16_dot(q, k_cache),
        KV_AS_A=as_a, **decode_config(d, group, q.dtype, q.device, as_a), **pdl.options(q))
    if splits > 1:
        _combine_kernel[(batch, h_q)](part_o, part_lse, out, meta.cu_q, out.stride(0), out.stride(1), HQ=h_q,
                                      HEAD_DIM=d, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
                                      **pdl.options(q))


def splits_mixed(meta: AttentionMeta) -> bool:
    """Whether a step with prefill queries hands its one-query sequences to the decode kernel (SPLIT_MIXED):
    always for a work list (a mixed CUDA graph cannot know its steps' lengths), else when there is one."""
    return SPLIT_MIXED and (meta.q_tiles is not None or meta.has_single_query)


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: AttentionMeta, scale: float) -> torch.Tensor:
    """paged_attention_torch for any query lengths (prefill chunks mixed with decodes), flash-attention; the
    decodes among them on the decode kernel (splits_mixed)."""
    check_attention_args(q, k_cache, v_cache, meta)
    batch, (_, page, h_kv, d), h_q = len(meta.host_kv_lens), k_cache.shape, q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0 or q.shape[0] == 0 or meta.max_q_len == 0:
        return out
    cfg = prefill_config(d, q.dtype, meta.max_q_len)
    meta_args, strides = _launch_args(q, k_cache, meta, out)
    tiles = meta.q_tiles
    if tiles is None:
        grid = (triton.cdiv(meta.max_q_len, cfg["BLOCK_M"]), batch, h_q)
    else:
        if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 2 or not tiles.is_contiguous():
            raise ValueError(f"q_tiles must be a contiguous [N, 2] int32 tensor, got {tiles.dtype} "
                             f"{tuple(tiles.shape)}")
        rows = meta.tile_rows
        if rows < 16 or rows & (rows - 1):
            raise ValueError(f"tile_rows must be a power of two >= 16, got {rows}")
        cfg["BLOCK_M"] = rows
        grid = (tiles.shape[0], 1, h_q)
    split = splits_mixed(meta)

    def prefill():
        _prefill_kernel[grid](
            q, k_cache, v_cache, out, *meta_args, out if tiles is None else tiles, scale * math.log2(math.e),
            *strides, GROUP=h_q // h_kv, HEAD_DIM=d, PAGE=page, PREC=_precision(q.dtype), TILED=tiles is not None,
            SKIP_SINGLE=split, FP16_DOT=_fp16_dot(q, k_cache), **cfg, **pdl.options(q))

    if not split:
        prefill()
    elif not (OVERLAP_MIXED and q.is_cuda):
        _decode_into(out, q, k_cache, v_cache, meta, scale)
        prefill()
    else:  # the two kernels write disjoint rows of out; nothing is allocated on the side stream
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            prefill()
        _decode_into(out, q, k_cache, v_cache, meta, scale)
        main.wait_stream(side)
    return out


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device, priority=-1)
    return _side_streams[device]


def prefill_tile_rows(head_dim: int, dtype: torch.dtype, max_q_len: int) -> int:
    """Query rows per prefill program: the block size a q_tiles work list must be cut into."""
    return prefill_config(head_dim, dtype, max_q_len)["BLOCK_M"]


def query_tiles(cu_q: list[int], rows: int) -> list[int]:
    """Flat (sequence, query block) pairs covering every sequence's queries in blocks of `rows`
    (AttentionMeta.q_tiles); at most ceil(T / rows) + B of them. Under SPLIT_MIXED the sequences of one
    query are left out (the decode kernel runs them). Pure Python."""
    tiles: list[int] = []
    least = 2 if SPLIT_MIXED else 1
    for b in range(len(cu_q) - 1):
        n = cu_q[b + 1] - cu_q[b]
        if n >= least:
            for mb in range(-(-n // rows)):
                tiles += (b, mb)
    return tiles


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMeta, scale: float) -> torch.Tensor:
    """paged_attention_torch on Triton: the split-K decode kernel when meta.max_q_len == 1, else prefill.

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; returns [T, Hq, D] in q.dtype.
    """
    if meta.max_q_len == 1:
        return decode_attention_triton(q, k_cache, v_cache, meta, scale)
    return prefill_attention_triton(q, k_cache, v_cache, meta, scale)


def _fp16_dot(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the dots run in fp16: an fp8 cache read with a 16-bit q (FP8_DOT_FP16)."""
    return FP8_DOT_FP16 and k_cache.dtype == torch.float8_e4m3fn and q.dtype != torch.float32


def _kv_as_a(k_cache: torch.Tensor) -> bool:
    """Whether the decode kernel takes this cache as its dots' first operand (DECODE_KV_AS_A)."""
    return DECODE_KV_AS_A == "always" or (DECODE_KV_AS_A == "fp8" and k_cache.dtype == torch.float8_e4m3fn)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 tl.dot would otherwise round to tf32
