"""Probe: the Triton grouped GEMM (nfrt.kernels.triton_grouped_gemm) against torch._grouped_mm on
mixtral-8x7b's expert shapes (one H200 / H100): correctness on fresh random routing, capture in a
CUDA graph, and the time of each at the token counts a mixtral batch has (top-2 of 8 experts).

    python benchmarks/probes/grouped_gemm.py [--configs]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from nfrt.kernels.triton_grouped_gemm import grouped_mm

E, TOP_K, H, I = 8, 2, 4096, 14336  # mixtral-8x7b


def routing(tokens: int, gen: torch.Generator) -> torch.Tensor:
    """offs [E] int32: group ends of tokens*TOP_K rows over E experts (uniform top-2 routing)."""
    scores = torch.rand(tokens, E, generator=gen)
    ids = scores.topk(TOP_K, dim=1).indices.flatten()
    counts = torch.bincount(ids, minlength=E)
    return counts.cumsum(0).to(torch.int32).cuda()


def time_us(fn, reps: int = 20) -> float:
    g = torch.cuda.CUDAGraph()
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(5):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        ts.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ts) / 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", action="store_true", help="also time other tile configurations")
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(0), torch.__version__)
    w_up = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02  # [E, N, K]
    w_down = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
    for tokens in (64, 256, 512, 960, 1024, 1216, 1536, 2048, 4096):
        m = tokens * TOP_K
        offs = routing(tokens, gen)
        for name, w in (("gate_up", w_up), ("down", w_down)):
            x = torch.randn(m, w.shape[2], device=dev, dtype=torch.bfloat16)
            ref = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
            got = grouped_mm(x, w, offs)
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            out = torch.empty_like(ref)
            t_ref = time_us(lambda x=x, w=w, offs=offs: torch._grouped_mm(x, w.transpose(1, 2), offs=offs))
            t_tri = time_us(lambda x=x, w=w, offs=offs, out=out: grouped_mm(x, w, offs, out=out))
            line = (f"{name:7s} tokens {tokens:5d} rows {m:5d}: torch {t_ref:8.1f} us, "
                    f"triton {t_tri:8.1f} us ({t_ref / t_tri:.2f}x), max rel err {err:.2e}")
            if a.configs:
                for cfg in ((64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                            (64, 256, 64, 8, 4), (128, 128, 128, 8, 3)):
                    try:
                        t = time_us(lambda x=x, w=w, offs=offs, out=out, cfg=cfg:
                                    grouped_mm(x, w, offs, out, cfg))
                        line += f"; {cfg[:3]}/{cfg[3]}w/{cfg[4]}s {t:.1f}"
                    except Exception as exc:  # noqa: BLE001 - a config that does not fit shared memory
                        line += f"; {cfg[:3]} failed ({type(exc).__name__})"
            print(line, flush=True)
    # capture check: one graph, new routing and inputs copied in, replay, compare
    tokens = 1216
    x = torch.randn(tokens * TOP_K, H, device=dev, dtype=torch.bfloat16)
    offs = routing(tokens, gen)
    out = torch.empty(tokens * TOP_K, 2 * I, device=dev, dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    grouped_mm(x, w_up, offs, out=out)
    with torch.cuda.graph(g):
        grouped_mm(x, w_up, offs, out=out)
    x.copy_(torch.randn_like(x))
    offs.copy_(routing(tokens, gen))
    g.replay()
    torch.cuda.synchronize()
    ref = torch._grouped_mm(x, w_up.transpose(1, 2), offs=offs)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    print(f"graph replay on new routing: max rel err {err:.2e}")


if __name__ == "__main__":
    main()
