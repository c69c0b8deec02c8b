"""Does telling cuBLAS how many SMs it has (torch._C._set_sm_carveout_experimental, i.e.
CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET) keep a GEMM fenced to a green-context partition fast?

Times torch.mm (bf16) on partitions of s SMs (nfrt.partition.make_layout), with cuBLAS and cuBLASLt
as torch's BLAS backend, without and with the carve-out 132 - s, and prints P(s) = t(all SMs) /
t(s). Shapes: llama3-70b TP-4 layer GEMMs at 2048 tokens and llama3-8b's at 1024.

    python benchmarks/probes/gemm_sm_target.py > gemm_sm_target.txt
"""

from __future__ import annotations

import statistics

import torch
from nfrt.partition import make_layout

SHAPES = {"70b-tp4 qkv": (2048, 8192, 2560), "70b-tp4 gate_up": (2048, 8192, 14336),
          "70b-tp4 down": (2048, 3584, 8192), "70b-tp4 o_proj": (2048, 2048, 8192),
          "8b qkv 1024": (1024, 4096, 6144), "8b gate_up 1024": (1024, 4096, 28672)}
SIZES = (120, 112, 104, 96, 88, 64)


def timed(fn, stream, reps: int = 20) -> float:
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(10):
                fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record()
            g.replay()
            b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 100)  # us per mm
    return statistics.median(out)


def main() -> None:
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    has = hasattr(torch._C, "_set_sm_carveout_experimental")
    print(torch.__version__, torch.cuda.get_device_name(0), "carveout API:", has)
    layout = make_layout(0)
    full = torch.cuda.Stream()
    for backend in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(backend)
        for name, (m, k, n) in SHAPES.items():
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def fn(a=a, w=w, out=out):
                torch.mm(a, w.t(), out=out)

            if has:
                torch._C._set_sm_carveout_experimental(None)
            t_full = timed(fn, full)
            row = [f"{backend:8s} {name:16s} all {t_full:7.1f}us"]
            for s in SIZES:
                st = layout.stream(0, s)
                cells = []
                for carve in ((None, n_sms - s) if has else (None,)):
                    if has:
                        torch._C._set_sm_carveout_experimental(carve)
                    cells.append(t_full / timed(fn, st))
                if has:
                    torch._C._set_sm_carveout_experimental(None)
                row.append(f"{s}:" + "/".join(f"{p:.2f}" for p in cells))
            print("  ".join(row), flush=True)
    layout.close()


if __name__ == "__main__":
    main()
