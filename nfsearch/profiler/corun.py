"""Sustained interference co-runs: the slowdown a schedule's overlapped nano-ops actually see.

A replayed schedule overlaps long stretches of GEMMs with decode attention and runs the GPU at its
power limit, where the SM clock drops 5-8% (benchmarks/RESULTS.md, 09:0x UTC). One-millisecond
co-run bursts at boost clock miss both. So each point here places the two ops exactly as the engine
does (`nfrt.partition.make_layout`: compute on SM slots [0, c), memory on [top - m, top), `top` the
placed SMs, 120 of 132 on an H200), captures each op looped in its own CUDA graph (a few ms per
replay), replays both graphs concurrently for `seconds`, and times every replay with events. Only
replays that run entirely while both sides run, after the first quarter (clock settling), count.
Solo times are taken the same way, one graph alone on the same stream; slowdown = co-run / solo.

Under tensor parallelism the top op may be a network op (an all-reduce on the communicator of the
top partition's size), and its graphs synchronise the ranks at every collective: every count that
decides how many collectives run (launches per graph, replays) goes through `timer.agree` (the max
over the ranks) so each rank issues the same sequence.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from nfrt.model import NETWORK_OPS
from nfrt.partition import make_layout

from nfsearch.errors import NfsearchError

LOOP_US = 3000.0  # target replay length of each looped graph
MAX_LOOP = 512
Agree = Callable[[list[float]], list[float]]


def _same(values: list[float]) -> list[float]:
    return list(values)


def _looped(timer: Any, stream: torch.cuda.Stream, op: str, tokens: int, context: int):
    """(graph, launches per replay) of `op` looped for about LOOP_US on `stream` (private pool)."""
    return looped(timer, stream, timer._launcher(op, tokens, context))


def looped(timer: Any, stream: torch.cuda.Stream, fn: Callable[[int], Any]):
    """(graph, launches per replay) of launcher `fn` (fn(i) issues launch i) looped for about
    LOOP_US on `stream` (private pool): one launch is timed first to choose the count."""
    g1 = timer._capture(stream, fn, 1, shared_pool=False)
    one = statistics.median(timer._replays_us(g1, stream, 5))
    del g1
    one = timer.agree([one])[0]
    n = max(1, min(MAX_LOOP, math.ceil(LOOP_US / max(one, 1.0))))
    return timer._capture(stream, fn, n, shared_pool=False), n


def _point(grid: Any, op: str) -> tuple[int, int]:
    """(tokens, context) of `op` in the co-runs."""
    if op == "attn_decode":
        return tuple(grid.interference_decode)
    t = grid.interference_tokens
    return (t, t) if op == "attn_prefill" else (t, 0)


def _issue(g: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, ev: torch.cuda.Event) -> None:
    with torch.cuda.stream(stream):
        g.replay()
        ev.record(stream)


def solo_us(g: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, seconds: float,
            agree: Agree = _same) -> float:
    """Median replay time (us) of `g` alone, sustained for about `seconds`, first quarter dropped."""
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    probe[0].record(stream)
    _issue(g, stream, probe[1])
    stream.synchronize()
    k = max(8, math.ceil(seconds * 1e3 / max(probe[0].elapsed_time(probe[1]), 1e-3)))
    k = int(agree([k])[0])
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(k + 1)]
    ev[0].record(stream)
    for i in range(k):
        _issue(g, stream, ev[i + 1])
    stream.synchronize()
    d = [ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(k)]
    return statistics.median(d[k // 4:])


def alternating_us(graphs: list[tuple[torch.cuda.CUDAGraph, float]], stream: torch.cuda.Stream,
                   seconds: float, agree: Agree = _same) -> float:
    """Median time (us) of one round of `graphs` (graph, us per replay alone) replayed one after the
    other on `stream`, rounds back to back for about `seconds`, first quarter dropped: the
    sequential schedule's way of running them. The round count goes through `agree` (collectives)."""
    k = int(agree([max(8, int(seconds * 1e6 / sum(us for _, us in graphs)))])[0])
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(k + 1)]
    ev[0].record(stream)
    with torch.cuda.stream(stream):
        for i in range(k):
            for g, _ in graphs:
                g.replay()
            ev[i + 1].record(stream)
    stream.synchronize()
    return statistics.median(ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(k // 4, k))


def corun_us(ga: torch.cuda.CUDAGraph, sa: torch.cuda.Stream, a_us: float,
             gb: torch.cuda.CUDAGraph, sb: torch.cuda.Stream, b_us: float,
             seconds: float, agree: Agree = _same) -> tuple[float, float]:
    """Median replay times (us) of graphs a and b replayed concurrently for about `seconds`
    (`corun_many_us` on two sides)."""
    a, b = corun_many_us([(ga, sa, a_us), (gb, sb, b_us)], seconds, agree)
    return a, b


def corun_many_us(sides: list[tuple[torch.cuda.CUDAGraph, torch.cuda.Stream, float]],
                  seconds: float, agree: Agree = _same) -> list[float]:
    """Median replay times (us) of each side's graph, all replayed concurrently for about `seconds`;
    a side is (graph, its stream, us per replay alone).

    Replays are issued in order of their solo start times so no queue runs far ahead; a replay
    counts when it starts after the first quarter of the common window and ends before any side
    runs out of work."""
    ks = [int(k) for k in agree([max(8, math.ceil(seconds * 1e6 / us)) for _, _, us in sides])]
    evs = [[torch.cuda.Event(enable_timing=True) for _ in range(k + 1)] for k in ks]
    for (_, stream, _), ev in zip(sides, evs, strict=True):
        ev[0].record(stream)
    done = [0] * len(sides)
    while any(i < k for i, k in zip(done, ks, strict=True)):
        # the side whose next replay would start first alone (ties: the earlier side)
        s = min((x for x in range(len(sides)) if done[x] < ks[x]), key=lambda x: done[x] * sides[x][2])
        g, stream, _ = sides[s]
        _issue(g, stream, evs[s][done[s] + 1])
        done[s] += 1
    torch.cuda.synchronize()
    ref = evs[0][0]
    ts = [[ref.elapsed_time(e) for e in ev] for ev in evs]  # ms from the first side's first record
    begin = max(t[0] for t in ts)
    end = min(t[-1] for t in ts)
    skip = begin + (end - begin) / 4

    def kept(t: list[float]) -> list[float]:
        d = [(t[k + 1] - t[k]) * 1e3 for k in range(len(t) - 1) if t[k] >= skip and t[k + 1] <= end]
        if len(d) < 3:  # a window too short to drop the warm-up: every replay inside the overlap
            d = [(t[k + 1] - t[k]) * 1e3 for k in range(len(t) - 1) if t[k + 1] <= end]
        if not d:
            raise NfsearchError("interference co-run: the sides did not overlap; raise corun_s")
        return d

    return [statistics.median(kept(t)) for t in ts]


def sustained_corun(timer: Any, top_sms: int, bottom_sms: int, bottom_ops: tuple[str, ...],
                    top_ops: tuple[str, ...], tick: Callable[[int], None]) -> list[tuple]:
    """Rows (bottom op, top op, bottom SMs, top SMs, bottom slowdown, top slowdown, bottom solo us
    per op, top solo us per op) for every pair, on one placed split: bottom ops on SM slots
    [0, bottom_sms), top ops (memory, or network under TP) on the top `top_sms` placed slots."""
    seconds = timer.grid.corun_s
    agree = timer.agree
    layout = make_layout(device=timer.dev.index or 0)
    rows: list[tuple] = []
    try:
        top = layout.aligned
        if bottom_sms + top_sms > top:
            raise NfsearchError(f"interference split {bottom_sms} + {top_sms} SMs exceeds the "
                                f"{top} placed SMs of this GPU's layout")
        bs = layout.stream(0, bottom_sms)
        ts = layout.stream(top - top_sms, top_sms)
        tops = {}
        for op in top_ops:
            if op in NETWORK_OPS:  # NCCL's CTAs capped at the partition it runs on
                timer.use_comm(top_sms)
            g, n = _looped(timer, ts, op, *_point(timer.grid, op))
            tops[op] = (g, n, solo_us(g, ts, seconds / 2, agree))
        warmed = False
        for b_op in bottom_ops:
            if b_op in NETWORK_OPS:
                timer.use_comm(bottom_sms)
            gb, nb = _looped(timer, bs, b_op, *_point(timer.grid, b_op))
            b_solo = solo_us(gb, bs, seconds / 2, agree)
            for t_op, (gt, nt, t_solo) in tops.items():
                if not warmed:  # reach the power-capped steady state before the first timed co-run
                    corun_us(gb, bs, b_solo, gt, ts, t_solo, max(0.5, seconds), agree)
                    warmed = True
                b_co, t_co = corun_us(gb, bs, b_solo, gt, ts, t_solo, seconds, agree)
                rows.append((b_op, t_op, bottom_sms, top_sms, b_co / b_solo, t_co / t_solo,
                             b_solo / nb, t_solo / nt))
                tick(1)
            del gb
        del tops
    finally:
        torch.cuda.synchronize(timer.dev)
        layout.close()
        gc.collect()
        torch.cuda.empty_cache()
    return rows
