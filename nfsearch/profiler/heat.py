"""Profile points at the clock a replayed schedule runs at: a heater before every point.

An H100/H200 serving at full load sits at its power limit, and its SM clock is whatever keeps the
board at that limit: on an H200, about 1700 MHz under llama3-8b's sequential layers where the idle
clock is 1980 (benchmarks/RESULTS.md, 14:2x). The power controller is slow: a GEMM loop started on
an idle GPU holds boost for about 50 ms and settles after about 100 ms (session 8's
`benchmarks/probes/sustained_points.py`). A profile point timed in a burst of a few ms therefore
runs at whatever clock the previous points left, boost for most, and the profile mixed points at
1980 MHz with points at 1680 (14:2x), which the search then charged as if they were one machine.

So every point is timed right after a heater: one layer of the profiled model, every op of the
layer but its collectives, in layer order, at the interference batch (`interference_tokens` tokens;
decode attention at `interference_decode`), captured in one CUDA graph on the ordinary stream (all
SMs) and replayed back to back. The first point on each partition size gets `heat_ms` of it (from
whatever state the GPU was in to the layer loop's steady state), every other point `reheat_ms`
(holding that state across the host's capture gap). The point's own graph is enqueued behind the
heater with no host round trip between them, and its few ms of timed replays are short against
the controller's ~50 ms, so the point runs at the layer loop's clock whatever its own power draw:
a GEMM on 64 SMs, which alone would stay at boost, is charged the clock it gets inside the pipeline.
`sm_clock_mhz` (read after each point) records the clock each point saw.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from nfrt.gemm_target import sized_for

from nfsearch.opgraph import layer_ops

FOLLOW_MS = 10.0  # heat after the first heat's clock reading, before the point


class Heater:
    """One layer of the timer's model as a CUDA graph; `heat(stream, ms)` runs it for `ms` on all
    SMs and makes `stream` wait for it. Built lazily (first call), kept for the timer's life."""

    def __init__(self, timer: Any) -> None:
        self.timer = timer
        self.stream = torch.cuda.Stream(timer.dev)  # ordinary stream: every SM heats
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replay_us = 0.0
        self.mhz = float("nan")  # the clock at the end of the first full heat

    def ops(self) -> list[tuple[str, int, int]]:
        """(op, tokens, context) of one layer, collectives left out (ranks heat independently)."""
        grid, t = self.timer.grid, self.timer.grid.interference_tokens
        out = []
        for op in layer_ops(self.timer.model, self.timer.tp):
            if op.kind == "network":
                continue
            if op.name == "attn_decode":
                out.append((op.name, *grid.interference_decode))
            elif op.name == "attn_prefill":
                out.append((op.name, t, t))
            else:
                out.append((op.name, t, 0))
        return out

    def _build(self) -> None:
        timer = self.timer
        ops = self.ops()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream), sized_for(self.stream):
            for op, t, c in ops:  # eager first: Triton JIT, cuBLAS workspaces; the router fills topk ids
                timer._launcher(op, t, c)(0)
            g.capture_begin()  # private pool: the heater lives beside the solo graphs
            try:
                for op, t, c in ops:
                    timer._launcher(op, t, c)(0)  # binds the op's batch before its launch is captured
            finally:
                g.capture_end()
        self.graph = g
        self.replay_us = statistics.median(timer._replays_us(g, self.stream, 3))

    def heat(self, stream: torch.cuda.Stream, ms: float) -> None:
        """Replay the layer for about `ms` on all SMs; work enqueued on `stream` afterwards waits for
        it (no host synchronisation, so the point follows the heat without a gap)."""
        if ms <= 0:
            return
        if self.graph is None:
            self._build()
            self._replay(stream, ms)
            self.mhz = self.timer.clock.mhz(self.stream)  # the steady state the heater holds
            ms = FOLLOW_MS  # the clock read synchronised the host: close that gap again
        self._replay(stream, ms)
        stream.wait_stream(self.stream)

    def _replay(self, stream: torch.cuda.Stream, ms: float) -> None:
        assert self.graph is not None
        k = max(1, math.ceil(ms * 1e3 / max(self.replay_us, 1.0)))
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(stream)  # after what `stream` ran before: one GPU, one load at a time
            for _ in range(k):
                self.graph.replay()
