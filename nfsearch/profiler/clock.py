"""The GPU's SM clock right now, measured on the GPU itself.

A power-capped H100/H200 runs its SM clock anywhere between ~1.4 and 1.98 GHz depending on what ran
in the last few milliseconds (benchmarks/RESULTS.md, 13:08 UTC), so a latency is only comparable to
another once both carry the clock they ran at. `nvidia-smi` samples every ~100 ms and averages;
this probe reads the clock where the work ran: one warp spins on `%clock64` (SM cycles) for a fixed
number of cycles between CUDA events. Two spins of different lengths are timed back to back and
the clock is their cycle difference over their time difference, so launch and event overheads,
equal in both, cancel. Run after other work on the same stream, the ~150 us probe reads the
clock that work left (the profiler reads it after every timed point). Reading the clock *beside*
running work, on SMs of its own, was tried and is not here: its first run on an H200
(2026-11-21 14:3x UTC) timed the long spin no longer than the short one (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl
from nfrt.probe import spin

SHORT_CYCLES = 50_000
LONG_CYCLES = 250_000
FILL_CYCLES = 2_000_000  # ~1 ms: longer than the host takes to enqueue the timed spins


@triton.jit
def _spin_kernel(out_ptr, cycles):
    tl.store(out_ptr, spin(cycles))  # the cycles really spun (>= cycles)


class ClockProbe:
    """`mhz(stream)`: the SM clock (MHz) on the SMs `stream` runs on, now (synchronizes the stream)."""

    def __init__(self, device: torch.device | int, repeats: int = 3) -> None:
        self.dev = torch.device("cuda", device) if isinstance(device, int) else device
        self.repeats = repeats

    def _once(self, stream: torch.cuda.Stream) -> float:
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        with torch.cuda.stream(stream):
            out = torch.zeros(2, dtype=torch.int64, device=self.dev)  # [short, long] cycles spun
            _spin_kernel[(1,)](out[0:], FILL_CYCLES, num_warps=1)  # busy while the host enqueues the rest
            ev[0].record(stream)
            _spin_kernel[(1,)](out[0:], SHORT_CYCLES, num_warps=1)
            ev[1].record(stream)
            _spin_kernel[(1,)](out[1:], LONG_CYCLES, num_warps=1)
            ev[2].record(stream)
        stream.synchronize()
        short_c, long_c = (int(x) for x in out.tolist())
        dt_us = (ev[1].elapsed_time(ev[2]) - ev[0].elapsed_time(ev[1])) * 1e3
        if dt_us <= 0:
            raise RuntimeError("clock probe: the long spin did not take longer than the short one")
        return (long_c - short_c) / dt_us  # cycles per us = MHz

    def mhz(self, stream: torch.cuda.Stream) -> float:
        """The clock right after what `stream` ran before (median of `repeats` readings; syncs)."""
        return statistics.median(self._once(stream) for _ in range(self.repeats))
