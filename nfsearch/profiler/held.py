"""Ops timed at the power-limited clock: each point replayed between heater GEMMs on all SMs.

A replayed schedule keeps an H100/H200 at its power limit, and the SM clock is one for the whole
chip: the GEMMs that fill most of a layer set it, and every op runs at it, decode attention too.
In a benchmark of llama3-70b TP 4 (RESULTS.md, 22:42) decode attention ran 1.13-1.18x its burst
point, and held back to back on its own it runs 1.00x (session 8): alone it never draws enough
power to pull the clock down. So a point is timed here between two replays of a heater (bf16
8192^3 GEMMs on all SMs, about 2.8 ms), each replay timed alone by events, the median of the second
half; the heater runs GEMM_HEAT_S first so the die is as warm as in a benchmark. The burst time
beside it is the profile's own timing, the better of one before and one after.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

HEAT_GEMMS = 2  # GEMMs of 8192^3 per heater replay (~1.4 ms each at boost)
HEAT_US = 2800.0
GEMM_HEAT_S = 2.0


def held_points(timer: Any, num_sms: int, points: list[tuple[str, int, int]],
                tick: Callable[[int], None]) -> list[tuple[float, float]]:
    """(burst us, held us) per launch of each (op, tokens, context) on a partition of `num_sms` SMs."""
    heat, heat_stream, _buffers = heater(timer.dev, timer._capture)  # the buffers live as long as the graph
    with timer.on_partition(num_sms) as stream:
        run_for(heat, heat_stream, GEMM_HEAT_S)
        out = []
        for op, t, c in points:
            burst, _ = timer._time_point(stream, op, t, c, num_sms)
            est = timer.agree([burst])[0]  # the same launch and replay counts on every rank
            n = timer._launches(est)
            g = timer._capture(stream, timer._launcher(op, t, c), n)
            k = int(timer.agree([max(8, timer.grid.sustained_s * 1e6 / (HEAT_US + est * n))])[0])
            held = between(g, stream, heat, heat_stream, k) / n
            del g
            again, _ = timer._time_point(stream, op, t, c, num_sms)
            out.append((min(burst, again), held))
            tick(1)
        return out


def heater(dev: torch.device, capture: Callable[..., torch.cuda.CUDAGraph]
           ) -> tuple[torch.cuda.CUDAGraph, torch.cuda.Stream, tuple[torch.Tensor, ...]]:
    """(graph, its stream, its buffers): HEAT_GEMMS bf16 8192^3 GEMMs on all SMs on an ordinary
    stream, captured with the timer's `capture` (a private pool: it replays beside the point's)."""
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    hs = torch.cuda.Stream(dev)
    g = capture(hs, lambda i: torch.mm(a, b, out=c), HEAT_GEMMS, shared_pool=False)
    return g, hs, (a, b, c)


def run_for(g: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, seconds: float) -> None:
    """Replay `g` back to back for about `seconds` (sized by its first replay) and wait."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    with torch.cuda.stream(stream):
        ev[0].record(stream)
        g.replay()
        ev[1].record(stream)
    stream.synchronize()
    with torch.cuda.stream(stream):
        for _ in range(max(1, int(seconds * 1e3 / max(ev[0].elapsed_time(ev[1]), 1e-3)))):
            g.replay()
    stream.synchronize()


def between(g: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, heat: torch.cuda.CUDAGraph,
            heat_stream: torch.cuda.Stream, k: int) -> float:
    """Median time (us) of `g` replayed k times, each after a replay of `heat` and before the next
    (no overlap: each side waits for the other by events), over the second half of the replays."""
    start = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
    hot = [torch.cuda.Event() for _ in range(k)]
    for i in range(k):
        with torch.cuda.stream(heat_stream):
            if i:
                heat_stream.wait_event(end[i - 1])
            heat.replay()
            hot[i].record(heat_stream)
        with torch.cuda.stream(stream):
            stream.wait_event(hot[i])
            start[i].record(stream)
            g.replay()
            end[i].record(stream)
    torch.cuda.synchronize(stream.device)
    return statistics.median(start[i].elapsed_time(end[i]) * 1e3 for i in range(k // 2, k))
