"""SGMV launch configuration from host ints only (never device data, so CUDA graphs stay valid): row
tiling modes, tile sizes, split-K, the tuned knobs, and the direct launch of compiled kernels."""

from __future__ import annotations

import functools

import torch

from punica.ops import pdl

try:
    from triton import knobs  # the launch hooks (profilers) that a direct launch would skip
except ImportError:  # no Triton, or one older than its knobs
    knobs = None
try:
    from torch._C import _cuda_getCurrentRawStream as _current_stream  # what Triton's own launches ask
except ImportError:
    def _current_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream

SEGMENT, TOKEN, WORKLIST, HYBRID = 0, 1, 2, 3  # row tiling modes (the kernels' MODE)

# Knobs picked on an H200 by `python -m benchmarks.bench_sgmv --tune --apply` (benchmarks/results/sgmv_NOTES.md);
# `set_tuning` changes them for sweeps. Token mode only for all-distinct decode: Uniform/Zipf batches with
# shared adapters ran faster in segment mode.
TUNING = {
    "bgmv_max_seg": 1,          # plans whose segments are all at most this long run in token (BGMV) mode
    "hybrid_graphs": 2,         # CUDA graphs tiling LoRA with hybrid work lists: 0 none, 1 all, 2 mixed steps only
    "hybrid_decode_max": 32,    # decode graphs of at most this many sequences use them too: shared adapters' tokens
                                # in tensor-core row blocks, each block reading its adapter once (per token: once a
                                # token). Batch 32: identical +3%, skewed +2.6%, distinct and uniform even; at 128
                                # distinct and uniform lost 4% (textgen_NOTES.md, session 8)
    "decode_single_max": 3,     # decode graphs' hybrid lists: segments of at most this many tokens are single-token
                                # items (2-3 token segments padded to 32-row blocks made uniform batches slower)
    "mixed_single_max": 1,      # mixed graphs' hybrid lists: the same. Their capacity grows with it (batch x this),
                                # and empty items cost: a 256-token chunk among decodes, LoRA a layer, 3 vs 1:
                                # 101 vs 80 us at batch 32, 297 vs 192 at 128 (textgen_NOTES.md, session 8)
    "max_block_m": 32,          # segment mode (eager steps): row blocks of a segment
    "list_block_m": 32,         # work lists (every graph): the row blocks plans cut. 16 won in the LoRA chain alone
                                # (decode at 32, distinct 59.2 -> 54.2 us a layer; a 256-token chunk among 127
                                # decodes 190.6 -> 171.2) but lost end to end at batch 128 in all four
                                # popularities, in either order (distinct 5181 -> 4824 tok/s, identical 6667 -> 6590;
                                # textgen_NOTES.md, session 11)
    "shrink_waves": 4,          # shrink programs aimed at per SM; split-K fills up to this
    "max_split_k": 32,
    "split_reduce_elems": 16384,  # SPLIT_K * BLOCK_M * BLOCK_R cap: what the last program of a tile sums
    "split_by_tokens": 1,       # 1: size a work list's split K by its tokens' row blocks, not its capacity (a
                                # mixed graph's list is padded for the worst case): a 128-token chunk among 31
                                # decodes, distinct adapters, 85.7 -> 70.5 us a layer (textgen_NOTES.md)
    "split_by_capacity_max": 64,  # except lists of at most this many tokens whose single items could hold every
                                # token (decode graphs): those may all be busy singles, and sizing by one row block
                                # split their shrinks 32 ways. Decode graph (sgmv_NOTES.md, sessions 13-14), ms,
                                # distinct/skewed/identical: batch 32 6.665/6.376/6.131 -> 6.641/6.306/6.065; batch
                                # 64 9.455/9.229/8.636 -> 9.451/9.009/8.510; batch 128 mixed (14.866/13.803/12.901
                                # -> 14.900/13.740/13.263), so 128 keeps the token rule
    "shrink_block_k": 128,      # segment mode
    "bgmv_block_r": 16,         # token mode; BLOCK_K makes a 16 KiB tile of lora_a (16 rows x 1 KiB runs)
    "max_block_k": 256,         # single-token shrink tiles 16 x 256: 54 registers where 16 x 512 took 123; issue
                                # 3's r64/T=32 Distinct row 34.7 -> 33.3 us, end to end at 128 within noise of 512
    "shrink_stages": 3,
    "shrink_sum_after": 1,      # single-token programs sum their products over k after the loop, not every step.
                                # Decode graph, 128 adapters, distinct / uniform, ms: batch 256 26.08 / 26.13 ->
                                # 25.80 / 25.67; batch 128 even. Shrink alone, r64, 128 distinct tokens: 28.6 ->
                                # 27.7 us (sgmv_NOTES.md, session 17)
    "shrink_warps": 4,
    "expand_waves": 4,          # expand programs aimed at per SM; BLOCK_N halves until reached
    "expand_block_n": 128,
    "bgmv_expand_tile": 8192,   # token mode: expand tiles of up to this many weights ([512, 16] at r <= 16, [128, 64]
                                # at r = 64 as in other modes). Decode graph at batch 256 over 128 adapters (per-token
                                # tiling), [128, 16] -> [512, 16]: distinct 25.21 -> 24.80 ms, uniform 25.21 -> 24.77
                                # (sgmv_NOTES.md, session 16)
    "expand_tiles": 1,          # N tiles per expand program
    "expand_stages": 2,
    "expand_warps": 4,
    "expand_persistent": 16,    # > 0: work lists with item counts expand on a fixed grid of this many programs per
                                # SM that walks the real items only; else a graph's padding launches a program per
                                # empty item and tile. LoRA of a layer, 256-token chunk among 127 decodes, padded
                                # (distinct, uniform, skewed, identical): 192, 176, 159, 151 us -> 190, 160, 105, 69.
                                # Decode at 128: 141, 138, 109, 98 -> 159, 148, 85, 45 (sgmv_NOTES.md, session 9)
    "shrink_persistent": 0,     # the same for the shrink: a loss wherever distinct adapters fill the list
    "sparse_decode": 0.5,       # > 0: decode buckets get a second ("sparse") graph, a hybrid list the expand walks
                                # (persistent), run by steps where at most this fraction of sequences are single
                                # items (cuda_graph.is_sparse). Chain, decode at 128, skewed and identical: 108.8
                                # and 97.8 us a layer -> 84.7 and 45.2. Text generation at 128 (256 requests),
                                # step / floor skewed 1.56 -> 1.43, identical 1.65 -> 1.40; batch 32 unchanged
    "persistent_min_batch": 128,  # item counts reach the kernels in mixed graphs of at least this many sequences
                                # only (cuda_graph.counts_items); at batch 32 the walk lost 5 us a layer distinct
}
_MAX_LOCKS = 1 << 14  # split-K tiles per shrink launch; more tiles than this never need a split
_locks: dict[tuple[str, torch.device], torch.Tensor] = {}
_launchers: dict[tuple, tuple] = {}  # launch key -> (launcher, function, metadata) of a compiled kernel
_direct = True


def set_tuning(**knobs: int) -> None:
    """Override launch knobs (benchmark sweeps and tests); unknown names raise KeyError."""
    for name, value in knobs.items():
        if name not in TUNING:
            raise KeyError(f"unknown SGMV knob {name!r}; known: {sorted(TUNING)}")
        TUNING[name] = value
    for cached in (_row_tiling, _shrink_config, _expand_config):
        cached.cache_clear()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count if device_index >= 0 else 1


@functools.lru_cache(maxsize=4096)
def _row_tiling(T: int, S: int, L: int, items: int, item_rows: int, num_single: int) -> tuple[int, int, int, int]:
    """(mode, BLOCK_M, row programs, blocks per segment) for T tokens in S segments of <= L tokens, or for
    a work list of `items` row blocks of <= item_rows tokens (the first num_single of them single tokens)."""
    if items:
        return HYBRID if num_single else WORKLIST, item_rows, items, 1
    block_m = min(max(16, _pow2(L)), TUNING["max_block_m"])
    seg_blocks = _cdiv(L, block_m)
    if L <= TUNING["bgmv_max_seg"] or S * seg_blocks > 2 * T:
        return TOKEN, 1, T, 1
    return SEGMENT, block_m, S * seg_blocks, seg_blocks


def work_list_rows() -> int:
    """The row-block size plans should cut their work lists into (SegmentPlan.items)."""
    return TUNING["list_block_m"]


def hybrid_graphs() -> frozenset[str]:
    """The kinds of CUDA graph ("decode", "mixed") that tile LoRA with hybrid work lists (SegmentPlan.num_single).
    Measured on an H200: with one-token segments alone as single items, hybrid lists lost in decode graphs of
    uniform batches but won in mixed steps (benchmarks/results/sgmv_NOTES.md); mixed graphs only (2) beat
    none (0) in text generation at batch 32: distinct +3%, uniform +1%, identical -0.4% (textgen_NOTES.md).
    Decode graphs up to TUNING["hybrid_decode_max"] sequences use them as well (StaticBuffers.is_hybrid)."""
    return {0: frozenset(), 1: frozenset({"decode", "mixed"}), 2: frozenset({"mixed"})}[TUNING["hybrid_graphs"]]


@functools.lru_cache(maxsize=4096)
def _shrink_config(tiling: tuple, h_in: int, NR: int, n_slices: int, sms: int, counted: bool = False) -> tuple:
    """(grid, kernel args from H_IN on, num_warps, SPLIT_K); `counted`: a work list with item counts on the
    device, which the persistent kernel (TUNING["shrink_persistent"]) takes."""
    mode, block_m, rows, seg_blocks = _row_tiling(*tiling)
    singles = mode in (TOKEN, HYBRID)  # some programs take one token on the CUDA cores
    R = NR // n_slices
    block_r = min(max(16, _pow2(R)), TUNING["bgmv_block_r"] if singles else 64)
    r_programs = n_slices * _cdiv(R, block_r)
    block_k1 = min(8192 // block_r, TUNING["max_block_k"], max(16, _pow2(h_in)))  # single-token programs
    block_k = block_k1 if mode == TOKEN else min(TUNING["shrink_block_k"], TUNING["max_block_k"],
                                                 max(16, _pow2(h_in)))
    busy = rows  # row programs expected to have work
    T, num_single = tiling[0], tiling[-1]
    decode_like = num_single >= T and T <= TUNING["split_by_capacity_max"]
    if TUNING["split_by_tokens"] and mode in (WORKLIST, HYBRID) and not decode_like:
        busy = min(rows, _cdiv(T, block_m))
    split = min(TUNING["shrink_waves"] * sms // (busy * r_programs), _cdiv(h_in, block_k),
                TUNING["max_split_k"], TUNING["split_reduce_elems"] // (block_m * block_r))
    split = 1 if rows * r_programs > _MAX_LOCKS else max(split, 1)
    split = 1 << (split.bit_length() - 1)  # a power of two: SPLIT_K is a constexpr, so few values, few compiles
    step = max(block_k, block_k1) if singles else block_k
    k_per_split = _cdiv(_cdiv(h_in, split), step) * step
    split = _cdiv(h_in, k_per_split)
    persistent = bool(counted and TUNING["shrink_persistent"] and mode in (WORKLIST, HYBRID))
    args = (h_in, R, NR, seg_blocks, k_per_split, tiling[-1], r_programs, mode, split, block_m, block_k, block_k1,
            block_r, _cdiv(R, block_r), TUNING["shrink_stages"], persistent, bool(TUNING["shrink_sum_after"]))
    units = rows * split * r_programs
    grid = (min(units, TUNING["shrink_persistent"] * sms), 1, 1) if persistent else (rows, split, r_programs)
    return grid, args, TUNING["shrink_warps"], split


@functools.lru_cache(maxsize=4096)
def _expand_config(tiling: tuple, slice_offsets: tuple[int, ...], R: int, sms: int, counted: bool = False) -> tuple:
    """(grid, kernel args from R on, num_warps); `counted`: a work list with item counts on the device, which
    the persistent kernel (TUNING["expand_persistent"]) takes."""
    mode, block_m, rows, seg_blocks = _row_tiling(*tiling)
    widths = [b - a for a, b in zip(slice_offsets, slice_offsets[1:])]
    block_r = min(max(16, _pow2(R)), 64)
    block_n, per_program = TUNING["expand_block_n"], TUNING["expand_tiles"]
    if mode == TOKEN:  # the largest power of two whose [block_n, block_r] tile fits
        block_n = max(block_n, _pow2(TUNING["bgmv_expand_tile"] // block_r + 1) // 2)
    while block_n > 32 and rows * sum(_cdiv(w, block_n) for w in widths) < TUNING["expand_waves"] * sms:
        block_n //= 2
    tiles = [_cdiv(w, block_n) for w in widths] + [1 << 30] * (3 - len(widths))
    offsets = list(slice_offsets[1:]) + [slice_offsets[-1]] * (3 - len(widths))
    cols = _cdiv(sum(tiles[:len(widths)]), per_program)
    persistent = bool(counted and TUNING["expand_persistent"] and mode in (WORKLIST, HYBRID))
    args = (R, seg_blocks, slice_offsets[-1], offsets[0], offsets[1], tiles[0], tiles[0] + tiles[1], tiling[-1],
            cols, mode, block_m, block_n, block_r, _cdiv(R, block_r), per_program, TUNING["expand_stages"],
            persistent)
    grid = (min(rows * cols, TUNING["expand_persistent"] * sms), 1, 1) if persistent else (rows, cols, 1)
    return grid, args, TUNING["expand_warps"]


def _lock_buffer(device: torch.device, owner: str = "sgmv") -> torch.Tensor:
    """Split-K counters, zero between launches (each launch resets those it used); one buffer per owning op,
    since SGMV and the GEMM may run at the same time on two streams. Allocated on first use: run one eager
    call before capturing a CUDA graph."""
    if (owner, device) not in _locks:
        _locks[owner, device] = torch.zeros(_MAX_LOCKS, dtype=torch.int32, device=device)
    return _locks[owner, device]


def _launch_hooks() -> bool:
    """Whether a profiler (proton, say) has set Triton's launch hooks, which only Triton's own path calls."""
    if knobs is None:
        return False
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)  # HookChain or a callable


def _launch(kernel, grid: tuple, tensors: tuple, strides: tuple, free: tuple, tail: tuple, num_warps: int) -> None:
    """kernel[grid](*tensors, *strides, *free, *tail). Once a specialization (dtypes, 16-byte alignment,
    every int but the `free` ones) has compiled, later launches go straight to its launcher: Triton's JIT
    entry costs about 38 us of Python a launch on the H200's host, its compiled kernel's `[grid]` 15, the
    launcher alone 11 (bench_sgmv --profile-host)."""
    global _direct
    first = tensors[0]
    if not first.is_cuda:  # the interpreter
        kernel[grid](*tensors, *strides, *free, *tail, False, num_warps=num_warps)
        return
    device = first.get_device()
    use_pdl = pdl.active(device)
    args = (*tensors, *strides, *free, *tail, use_pdl)  # PDL: every kernel's last constexpr
    key = (kernel, device, num_warps, strides, tail, use_pdl, *[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors])
    launcher = _launchers.get(key) if _direct else None
    if launcher is not None:
        run, function, metadata = launcher
        if not _launch_hooks():
            try:
                run(*grid, _current_stream(device), function, metadata, None, None, None, *args)
                return
            except TypeError:  # a Triton whose launcher takes other arguments: stay on the JIT entry
                _direct = False
    compiled = kernel[grid](*args, num_warps=num_warps, **({"launch_pdl": True} if use_pdl else {}))
    if compiled is not None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        _launchers[key] = compiled.run, compiled.function, compiled.packed_metadata
