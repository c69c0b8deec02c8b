"""Ops timed at the power-limited clock: each point replayed between replays of a heater on all SMs.

A replayed schedule keeps an H100/H200 at its power limit, and the SM clock is one for the whole
chip: the GEMMs that fill most of a layer set it, and every op runs at it, decode attention too.
In a benchmark of llama3-70b TP 4 (RESULTS.md, 22:42) decode attention ran 1.13-1.18x its burst
point, and held back to back on its own it runs 1.00x (session 8): alone it never draws enough
power to pull the clock down. So a point is timed here between two replays of a heater, each replay
timed alone by events, the median of the second half; the heater runs HEAT_S first so the die is
as warm as in a benchmark. The heater (`ProfileGrid.heat`) is the model's own layer on a workload's
batch (`nfsearch.profiler.grid.heat_points`), whose power draw is the pipeline's, or two bf16
8192^3 GEMMs (denser in power than a layer with decode attention in it: RESULTS.md, session 11).
The burst time beside each held point (timed just before it) only sizes the replay count: the
factor divides by the profile's own latency (`nfsearch.profiler.sustained.measured_factors`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from nfsearch.profiler.grid import heat_points

HEAT_GEMMS = 2  # GEMMs of 8192^3 per GEMM-heater replay (~1.4 ms each at boost)
HEAT_S = 2.0  # seconds of heater before the first point


def held_points(timer: Any, num_sms: int, points: list[tuple[str, int, int]],
                tick: Callable[[int], None]) -> list[tuple[float, float]]:
    """(burst us, held us) per launch of each (op, tokens, context) on a partition of `num_sms` SMs."""
    heat, heat_stream, _buffers = heater(timer)  # the buffers live as long as the graph
    with timer.on_partition(num_sms) as stream:
        heat_us = timer.agree([run_for(heat, heat_stream, HEAT_S)])[0]
        out = []
        for op, t, c in points:
            burst, _ = timer._time_point(stream, op, t, c, num_sms)
            est = timer.agree([burst])[0]  # the same launch and replay counts on every rank
            n = timer._launches(est)
            g = timer._capture(stream, timer._launcher(op, t, c), n)
            k = int(timer.agree([max(8, timer.grid.sustained_s * 1e6 / (heat_us + est * n))])[0])
            held = between(g, stream, heat, heat_stream, k) / n
            del g
            out.append((burst, held))
            tick(1)
        return out


def heater(timer: Any) -> tuple[torch.cuda.CUDAGraph, torch.cuda.Stream, tuple[Any, ...]]:
    """(graph, its stream, what it reads): the grid's heater on all SMs on an ordinary stream,
    captured with the timer's `_capture` into a private pool (it replays beside the point's)."""
    hs = torch.cuda.Stream(timer.dev)
    points = heat_points(timer.model, timer.tp, timer.grid)
    if not points:
        a, b = (torch.randn(8192, 8192, device=timer.dev, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        g = timer._capture(hs, lambda i: torch.mm(a, b, out=c), HEAT_GEMMS, shared_pool=False)
        return g, hs, (a, b, c)
    # The layer runs on a model copy with activations of its own, so it never rewrites what the
    # points read (a heater's router once rewrote the routing the expert points timed, RESULTS.md
    # 22:2x; held on the timer's own activations, mixtral's expert factors came out 4-6% lower and
    # its prediction 15% short, session 12). Each replay starts from the same random hidden and
    # residual: fed back, the activations drift (mean |cos| between tokens' normed rows 0.018 to
    # 0.035-0.037 over ~970 mixtral replays, benchmarks/probes/heater_state.py), which a pipeline's,
    # one pass per layer, never do.
    m = timer.model_copy()
    start = (m.hidden.clone(), m.residual.clone())
    runs = []
    for op, t, c in points:
        buf = timer.batch_of(op, c)
        m.bind(buf)  # eagerly: a first bind may allocate
        runs.append((buf, op, t))

    def layer(i: int) -> None:
        m.hidden.copy_(start[0])
        m.residual.copy_(start[1])
        for buf, op, t in runs:
            m.batch = buf  # not Model.bind: that may reallocate the logits, which no layer op reads
            m.run_op(0, op, 0, t)
    g = timer._capture(hs, layer, 1, shared_pool=False)
    return g, hs, (m, start)


def run_for(g: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, seconds: float) -> float:
    """Replay `g` back to back for about `seconds` (sized by its first replay), wait, and return
    the first replay's time (us)."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    with torch.cuda.stream(stream):
        ev[0].record(stream)
        g.replay()
        ev[1].record(stream)
    stream.synchronize()
    first_ms = ev[0].elapsed_time(ev[1])
    with torch.cuda.stream(stream):
        for _ in range(max(1, int(seconds * 1e3 / max(first_ms, 1e-3)))):
            g.replay()
    stream.synchronize()
    return first_ms * 1e3


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
