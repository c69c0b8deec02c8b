"""Why does a GEMM slow down beside decode attention on disjoint SMs?

The sustained co-runs of the profiler (nfsearch.profiler.corun) find llama3-8b's gate_up on 88 SMs
1.3-1.4x slower beside decode attention on 32 others, and the attention 1.4-1.6x slower too. Three
shared resources could do it: the power limit (both sides draw from 700 W, the clock drops), HBM
bandwidth, and L2 (the attention streams GBs of KV pages through the 50 MB L2 that the GEMM relies
on to reuse its weight tiles). This probe co-runs the GEMM, exactly as the profiler does (same
placed split, looped CUDA graphs, sustained for `SECONDS`), beside partners that each load one
resource:
  attn          the runtime's decode attention (TMA kernel)
  read          a plain streaming read of 1 GiB, default L2 policy
  read-evict    the same with `eviction_policy="evict_first"`
  mma           tensor-core work on registers only (power, no memory traffic)
and prints each side's slowdown (co-run / solo, sustained), the read rate and the SM clock the
GEMM's SMs ran at right after. It also prints whether the compiled kernels carry the hints
(`L2::cache_hint` / `evict_first` in the PTX).

    python benchmarks/probes/interference_cause.py > interference_cause.txt

Its run on an H100 (benchmarks/runs/interference_cause-h100-20261121T1632.txt) also co-ran the
attention with an `evict_first` hint passed to its TMA loads (a builtin over the semantic layer's
descriptor_load, since taken out): Triton 3.6 compiled it without any cache hint (0
`L2::cache_hint` in the PTX) and it measured the same as `attn`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nfrt.kernels import triton_attention as TA
from nfrt.partition import make_layout

from nfsearch.models import resolve_model
from nfsearch.profiler.clock import ClockProbe
from nfsearch.profiler.corun import _looped, corun_us, solo_us
from nfsearch.profiler.grid import full_grid
from nfsearch.profiler.measure import GpuTimer

SECONDS = 0.6
BOTTOM_SMS, TOP_SMS = 88, 32
READ_BYTES = 1 << 30


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, EVICT: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, step):
        acc += tl.load(x_ptr + start + offs, eviction_policy=EVICT).to(tl.float32)  # [BLOCK]
    tl.store(out_ptr + pid * BLOCK + offs, acc)


@triton.jit
def _mma_kernel(out_ptr, iters, M: tl.constexpr):
    offs = tl.arange(0, M)
    a = (offs[:, None] * 0.001 + offs[None, :] * 0.002).to(tl.bfloat16)  # [M, M]
    acc = tl.zeros([M, M], tl.float32)
    for _ in range(iters):
        acc = tl.dot(a, a, acc)
        a = (acc * 1e-6).to(tl.bfloat16)
    tl.store(out_ptr + tl.program_id(0) * M * M + offs[:, None] * M + offs[None, :], acc)


def _graph(stream: torch.cuda.Stream, fn, n: int) -> torch.cuda.CUDAGraph:
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(n):
                fn()
    torch.cuda.synchronize()
    return g


def _ptx(obj, depth: int = 0) -> str:
    """Every PTX text compiled for a @triton.jit function (walks its per-device kernel caches)."""
    if depth > 4:
        return ""
    if hasattr(obj, "asm") and isinstance(obj.asm, dict):
        return obj.asm.get("ptx", "")
    if isinstance(obj, dict):
        return "".join(_ptx(v, depth + 1) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return "".join(_ptx(v, depth + 1) for v in obj)
    return ""


def main() -> None:
    dev = torch.device("cuda", 0)
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0), flush=True)
    timer = GpuTimer(resolve_model("llama3-8b"), 1, full_grid())
    clock = ClockProbe(dev)
    layout = make_layout(0)
    top = layout.aligned
    bs = layout.stream(0, BOTTOM_SMS)
    ts = layout.stream(top - TOP_SMS, TOP_SMS)
    x = torch.randn(READ_BYTES // 2, device=dev, dtype=torch.bfloat16)
    read_out = torch.empty(TOP_SMS * 16 * 4096, device=dev, dtype=torch.float32)
    mma_out = torch.empty(TOP_SMS * 4 * 128 * 128, device=dev, dtype=torch.float32)

    def read(evict: str):
        return lambda: _read_kernel[(TOP_SMS * 16,)](x, read_out, x.numel(), BLOCK=4096, EVICT=evict,
                                                      num_warps=8)

    partners = {
        "attn": lambda: _looped(timer, ts, "attn_decode", *timer.grid.interference_decode),
        "read": lambda: (_graph(ts, read(""), 3), 3),
        "read-evict": lambda: (_graph(ts, read("evict_first"), 3), 3),
        "mma": lambda: (_graph(ts, lambda: _mma_kernel[(TOP_SMS * 4,)](mma_out, 20000, M=128, num_warps=4),
                               1), 1),
    }
    for op in ("gate_up", "o_proj"):
        gb, nb = _looped(timer, bs, op, timer.grid.interference_tokens, 0)
        b_solo = solo_us(gb, bs, SECONDS)
        b_clock = clock.mhz(bs)
        print(f"\n{op} x{nb} on {BOTTOM_SMS} SMs: solo {b_solo / nb:.1f} us/launch at {b_clock:.0f} MHz",
              flush=True)
        for name, make in partners.items():
            gt, nt = make()
            t_solo = solo_us(gt, ts, SECONDS)
            t_clock = clock.mhz(ts)
            corun_us(gb, bs, b_solo, gt, ts, t_solo, SECONDS)  # warm to the power-capped steady state
            b_co, t_co = corun_us(gb, bs, b_solo, gt, ts, t_solo, SECONDS)
            co_clock = clock.mhz(bs)
            extra = ""
            if name.startswith("read"):
                extra = (f"  read {nt * READ_BYTES / t_solo / 1e3:.0f} GB/s solo, "
                         f"{nt * READ_BYTES / t_co / 1e3:.0f} co-run")
            print(f"  {name:11s} {op} x{b_co / b_solo:.3f}  partner x{t_co / t_solo:.3f} "
                  f"(partner solo {t_solo / nt:.1f} us at {t_clock:.0f} MHz)  clock after co-run "
                  f"{co_clock:.0f} MHz{extra}", flush=True)
            del gt
            torch.cuda.synchronize()
        del gb
    for name, kern in (("read", _read_kernel), ("decode_tma", TA._decode_kernel_tma)):
        ptx = _ptx(getattr(kern, "device_caches", {}))
        print(f"PTX {name}: {len(ptx)} chars, L2::cache_hint x{ptx.count('L2::cache_hint')}, "
              f"evict_first x{ptx.count('evict_first')}, createpolicy x{ptx.count('createpolicy')}",
              flush=True)
    layout.close()


if __name__ == "__main__":
    main()
