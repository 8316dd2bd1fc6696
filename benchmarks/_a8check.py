import torch
from punica.ops import gemm
for d in range(3):
    gemm.CONFIG["fp8_dot"] = d; gemm.LARGE_CONFIG["fp8_dot"] = d
    for T in (1, 32, 256):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(T, 4096, device="cuda", generator=g).bfloat16()
        w = torch.randn(11008, 4096, device="cuda", generator=g) / 64
        q, s = gemm.quantize_rows_fp8(w)
        ref = x.float() @ gemm.dequantize_rows(q, s, torch.float32).T
        y = gemm.gemm_triton(x, q, None, s).float()
        print("fp8_dot", gemm.FP8_DOTS[d], "T", T, "rel err", ((y - ref).norm() / ref.norm()).item())
