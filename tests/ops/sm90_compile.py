"""Compile the Triton kernels for sm_90 (H100/H200) without a GPU, with Triton's bundled LLVM and ptxas.

The CPU tier runs kernels in the interpreter, which never compiles them: a construct the compiler rejects
would first fail on the GPU. Run as a script with TRITON_INTERPRET unset (test_compile_sm90.py does);
prints one line per variant and exits non-zero on the first failure; `--registers` adds ptxas's register and
spill counts of each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from punica.ops import attention, gemm, kv_store, norm_rope, sgmv

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(fn, args: list[tuple[str, str]], consts: dict, divisible: tuple[str, ...] = (), **options):
    """Compile fn for TARGET with typed args and constexprs (options: num_warps 4 unless given). `divisible`: args
    known to be multiples of 16 (pointers: 16-byte aligned), as the JIT specializes them when they are; without
    that, loads with such strides cannot be vectorized."""
    signature = dict(args) | {name: "constexpr" for name in consts}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs), target=TARGET,
                          options=dict(num_warps=4) | options)


def registers(kernel) -> str:
    """ptxas's register and spill report for a compiled kernel (Triton's bundled ptxas, -v): registers a
    thread bound how many programs an SM holds at once, which memory-bound kernels need many of."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{TARGET.arch}a", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return "; ".join(line.split("info    : ")[-1].strip() for line in out.splitlines()
                     if "registers" in line or "spill" in line)


def ints(*names: str) -> list[tuple[str, str]]:
    return [(n, "i32") for n in names]


SHRINK = ([("x_ptr", "*bf16"), ("a_ptr", "*bf16"), ("rank_ptr", "*i32"), ("indptr_ptr", "*i32"),
           ("seg_slot_ptr", "*i32"), ("token_slot_ptr", "*i32"), ("v_ptr", "*fp32"), ("ws_ptr", "*fp32"),
           ("lock_ptr", "*i32")]
          + [("count_ptr", "*i32")]
          + ints("stride_xt", "stride_as", "stride_ar", "stride_vt", "T", "H_IN", "R", "NR", "seg_blocks",
                 "k_per_split", "n_single", "n_r"))
EXPAND = ([("v_ptr", "*fp32"), ("b_ptr", "*bf16"), ("rank_ptr", "*i32"), ("indptr_ptr", "*i32"),
           ("seg_slot_ptr", "*i32"), ("token_slot_ptr", "*i32"), ("count_ptr", "*i32"), ("y_ptr", "*bf16"),
           ("s_ptr", "*bf16")]
          + ints("stride_vt", "stride_bs", "stride_bn", "stride_yt", "stride_ss", "R", "seg_blocks", "N", "O1", "O2",
                 "TILES1", "TILES2", "n_single", "COLS"))
PREFILL = ([(n, "*bf16") for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")]
           + [(n, "*i32") for n in ("cu_q_ptr", "kv_lens_ptr", "bt_ptr", "tiles_ptr")] + [("scale_log2", "fp32")]
           + ints("stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_bt", "stride_ot",
                  "stride_oh"))
DECODE = ([(n, "*bf16") for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")]
          + [("part_o_ptr", "*fp32"), ("part_lse_ptr", "*fp32")]
          + [(n, "*i32") for n in ("cu_q_ptr", "kv_lens_ptr", "bt_ptr", "order_ptr")] + [("scale_log2", "fp32")]
          + ints("stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_bt", "stride_ot",
                 "stride_oh"))
LINEAR = ([(n, "*bf16") for n in ("x_ptr", "w_ptr", "bias_ptr")] + [("scale_ptr", "*fp32"), ("y_ptr", "*bf16"),
                                                                     ("ws_ptr", "*fp32"), ("lock_ptr", "*i32")]
          + ints("stride_xm", "stride_wn", "stride_ym", "M", "N", "K", "k_per_split"))


SMALL = [  # (name, kernel, args, constexprs) of the one-program-per-token kernels
    ("add_rms_norm", norm_rope._rms_norm_kernel,
     [(n, "*bf16") for n in ("x_ptr", "d_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")]
     + ints("stride_x", "stride_r", "H") + [("eps", "fp32")],
     dict(ADD=True, HAS_DELTA=True, ROUND_FIRST=True, BLOCK_H=4096)),
    ("silu_and_mul", norm_rope._silu_and_mul_kernel, [("x_ptr", "*bf16"), ("d_ptr", "*bf16"), ("out_ptr", "*bf16")]
     + ints("stride_x", "inter"), dict(HAS_DELTA=True, BLOCK=1024)),
    ("rope", norm_rope._rope_kernel, [(n, "*bf16") for n in ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr")]
     + [("pos_ptr", "*i64"), ("cos_sin_ptr", "*fp32")] + ints("stride_qt", "stride_qh", "stride_kt", "stride_kh"),
     dict(HQ=32, HKV=8, HALF=64, BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_HALF=64)),
    ("rope_store_kv", kv_store._rope_store_kv_kernel,
     [(n, "*bf16") for n in ("q_ptr", "k_ptr", "v_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "q_out_ptr", "k_cache_ptr",
                              "v_cache_ptr")]
     + [("pos_ptr", "*i64"), ("cos_sin_ptr", "*fp32"), ("slot_ptr", "*i64")]
     + ints("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")
     + [("wq_ptr", "*bf16"), ("wk_ptr", "*bf16"), ("eps", "fp32")],
     dict(HQ=32, HKV=8, HALF=64, BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_HALF=64, HAS_DELTA=True, NORM=True,
          ROUND_FIRST=True)),
    ("store_kv", kv_store._store_kv_kernel, [(n, "*bf16") for n in ("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr")]
     + [("slot_ptr", "*i64")] + ints("stride_kt", "stride_kh", "stride_vt", "stride_vh"),
     dict(H_KV=8, HEAD_DIM=128, BLOCK_H=8)),
    ("combine", attention._combine_kernel, [("part_o_ptr", "*fp32"), ("part_lse_ptr", "*fp32"), ("out_ptr", "*bf16"),
                                            ("cu_q_ptr", "*i32")] + ints("stride_ot", "stride_oh"),
     dict(HQ=32, HEAD_DIM=128, SPLITS=4, BLOCK_S=4)),
]


def fp8_cache(args: list[tuple[str, str]], *names: str) -> list[tuple[str, str]]:
    """`args` with the pointers `names` to float8 e4m3 (the KV pool of kv_cache_dtype "fp8")."""
    return [(n, "*fp8e4nv" if n in names else t) for n, t in args]


def variants():
    """Every kernel's main specializations without PDL (ops/pdl.py), and each kernel once with it."""
    for mode, split, block_m, persistent in [
            (sgmv.SEGMENT, 1, 32, False), (sgmv.SEGMENT, 4, 32, False), (sgmv.TOKEN, 8, 1, False),
            (sgmv.WORKLIST, 4, 32, False), (sgmv.HYBRID, 1, 32, False), (sgmv.HYBRID, 4, 32, False),
            (sgmv.WORKLIST, 4, 32, True), (sgmv.HYBRID, 4, 32, True)]:
        yield f"shrink mode {mode} split {split}{' persistent' if persistent else ''}", sgmv._shrink_kernel, SHRINK, \
            dict(MODE=mode, SPLIT_K=split, BLOCK_M=block_m, BLOCK_K=512 if mode == sgmv.TOKEN else 128,
                 BLOCK_K1=512, BLOCK_R=16, R_BLOCKS=1, STAGES=3, PERSISTENT=persistent, SUM_AFTER=True, IEEE=False,
                 PDL=split == 8 or persistent)
    for mode, block_m, persistent in [(sgmv.SEGMENT, 32, False), (sgmv.TOKEN, 1, False), (sgmv.WORKLIST, 32, False),
                                      (sgmv.HYBRID, 32, False), (sgmv.WORKLIST, 32, True), (sgmv.HYBRID, 32, True)]:
        yield f"expand mode {mode}{' persistent' if persistent else ''}", sgmv._expand_kernel, EXPAND, dict(
            MODE=mode, BLOCK_M=block_m, BLOCK_N=128, BLOCK_R=16, R_CHUNKS=1, TILES_PER_PROGRAM=1, STAGES=2,
            PERSISTENT=persistent, IEEE=False, OVERWRITE=mode == sgmv.TOKEN or persistent,
            HAS_SCALE=mode == sgmv.HYBRID, PDL=mode == sgmv.TOKEN or persistent)
    for tiled in (False, True):
        yield f"prefill attention tiled={tiled}", attention._prefill_kernel, PREFILL, dict(
            GROUP=4, HEAD_DIM=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, PREC="tf32", TILED=tiled, SKIP_SINGLE=tiled,
            FP16_DOT=False, PDL=tiled)
    for pdl in (False, True):
        yield f"decode attention pdl={pdl}", attention._decode_kernel, DECODE, dict(
            GROUP=4, BLOCK_G=16, HEAD_DIM=128, PAGE=16, BLOCK_N=64, SPLITS=4, PREC="tf32", ORDERED=pdl, FP16_DOT=False,
            KV_AS_A=pdl, PDL=pdl)
    # kv_cache_dtype "fp8": the pools in float8 e4m3, read with fp16 dots, written by the store kernels
    yield "prefill attention fp8 cache", attention._prefill_kernel, fp8_cache(PREFILL, "k_ptr", "v_ptr"), dict(
        GROUP=4, HEAD_DIM=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, PREC="tf32", TILED=True, SKIP_SINGLE=True,
        FP16_DOT=True, PDL=True)
    for kv_as_a in (False, True):
        yield f"decode attention fp8 cache kv_as_a={kv_as_a}", attention._decode_kernel, fp8_cache(
            DECODE, "k_ptr", "v_ptr"), dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, PAGE=16, BLOCK_N=64, SPLITS=4,
                                            PREC="tf32", ORDERED=True, FP16_DOT=True, KV_AS_A=kv_as_a, PDL=True)
    for name, fn, args, consts in SMALL:
        if name in ("rope_store_kv", "store_kv"):
            yield f"{name} fp8 cache", fn, fp8_cache(args, "k_cache_ptr", "v_cache_ptr"), consts | dict(PDL=False)
    for split in (1, 4):
        yield f"decode gemm split {split}", gemm._linear_kernel, LINEAR, dict(
            HAS_BIAS=True, HAS_SCALE=False, FP16_DOT=False, A8=False, SPLIT_K=split, BLOCK_M=32,
            BLOCK_N=64, BLOCK_K=128, STAGES=4, PDL=split == 1)
    # quantization "fp8": float8 e4m3 weights converted to fp16 in registers (or, fp8_dot "a8", x rounded to float8)
    fp8_w = [(n, "*fp8e4nv" if n == "w_ptr" else t) for n, t in LINEAR]
    for a8 in (False, True):
        yield f"decode gemm fp8 weights a8={a8}", gemm._linear_kernel, fp8_w, dict(
            HAS_BIAS=False, HAS_SCALE=True, FP16_DOT=not a8, A8=a8, SPLIT_K=2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=256,
            STAGES=4, PDL=True)
    yield "prefill gemm fp8 weights", gemm._linear_kernel, fp8_w, dict(
        HAS_BIAS=False, HAS_SCALE=True, FP16_DOT=True, A8=False, SPLIT_K=1, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64,
        STAGES=3, PDL=True)
    for name, fn, args, consts in SMALL:
        yield f"{name} pdl", fn, args, consts | dict(PDL=True)


def decode_report() -> None:
    """How the decode attention kernel builds for MHA heads of 128 with the engine's launch options, per cache
    dtype and dot orientation (attention.DECODE_KV_AS_A): tensor-core instructions, async copies, registers."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    for fp8 in (False, True):
        for kv_as_a in (False, True):
            options = attention.decode_config(128, 1, torch.bfloat16, device, kv_as_a)
            kernel = compile_variant(attention._decode_kernel, fp8_cache(DECODE, "k_ptr", "v_ptr") if fp8 else DECODE,
                                     dict(GROUP=1, BLOCK_G=options["BLOCK_G"], HEAD_DIM=128, PAGE=16,
                                          BLOCK_N=options["BLOCK_N"], SPLITS=4, PREC="tf32", ORDERED=True,
                                          FP16_DOT=fp8, KV_AS_A=kv_as_a, PDL=True),
                                     divisible=tuple(n for n, t in DECODE if t.startswith("*") or n.startswith("stride")
                                                     and n != "stride_bt"),
                                     num_warps=options["num_warps"], num_stages=options["num_stages"])
            ptx = kernel.asm["ptx"]
            counts = {op: ptx.count(op) for op in ("wgmma.mma_async", "mma.sync", "cp.async", "ldmatrix", "st.shared")}
            print(f"decode {'fp8' if fp8 else 'bf16'} cache, kv_as_a={kv_as_a}: {counts}; {registers(kernel)}",
                  flush=True)


if __name__ == "__main__":
    if "--decode-report" in sys.argv[1:]:
        decode_report()
        sys.exit()
    show_registers = "--registers" in sys.argv[1:]
    for name, fn, args, consts in variants():
        kernel = compile_variant(fn, args, consts)
        extra = f"; {registers(kernel)}" if show_registers else ""
        print(f"{name}: {len(kernel.asm['cubin'])} bytes of cubin{extra}", flush=True)
