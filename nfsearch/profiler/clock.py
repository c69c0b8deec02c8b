"""The GPU's SM clock right now, measured on the GPU itself.

A power-capped H100/H200 runs its SM clock anywhere between ~1.5 and 1.98 GHz depending on what ran
in the last few milliseconds (benchmarks/RESULTS.md, 13:08 UTC), so a latency is only comparable to
another once both carry the clock they ran at. `nvidia-smi` samples every ~100 ms and averages;
this probe reads the clock where the work ran: one warp spins on `%clock64` (SM cycles) for a fixed
number of cycles between CUDA events. Two spins of different lengths are timed back to back and
the clock is their cycle difference over their time difference, so launch and event overheads,
equal in both, cancel. After other work on the same stream (`mhz`), the ~150 us probe reads the
clock that work left (the profiler reads it after every timed point). Reading the clock *beside*
running work (`enqueue` after an event of that work, on SMs of its own) is not validated: its
first run on an H200 (2026-11-21 14:3x UTC) returned a long spin no longer than the short one.
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

SHORT_CYCLES = 50_000
LONG_CYCLES = 250_000
FILL_CYCLES = 2_000_000  # ~1 ms: longer than the host takes to enqueue the timed spins


@triton.jit
def _clock64():
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _spin_kernel(out_ptr, cycles):
    t0 = _clock64()
    t = t0
    while t - t0 < cycles:
        t = _clock64()
    tl.store(out_ptr, t - t0)  # the cycles really spun (>= cycles)


class Reading:
    """A probe enqueued on the GPU; `mhz()` (after the stream has run it) is the mean SM clock over
    the long spin's window."""

    def __init__(self, out: torch.Tensor, ev: list[torch.cuda.Event], stream: torch.cuda.Stream) -> None:
        self.out, self.ev, self.stream = out, ev, stream

    def mhz(self) -> float:
        self.stream.synchronize()
        short_c, long_c = (int(x) for x in self.out.tolist())
        dt_us = (self.ev[1].elapsed_time(self.ev[2]) - self.ev[0].elapsed_time(self.ev[1])) * 1e3
        if dt_us <= 0:
            raise RuntimeError("clock probe: the long spin did not take longer than the short one")
        return (long_c - short_c) / dt_us  # cycles per us = MHz


class ClockProbe:
    """`mhz(stream)`: the SM clock (MHz) on the SMs `stream` runs on, now (synchronizes the stream)."""

    def __init__(self, device: torch.device | int, repeats: int = 3) -> None:
        self.dev = torch.device("cuda", device) if isinstance(device, int) else device
        self.repeats = repeats

    def enqueue(self, stream: torch.cuda.Stream, after: torch.cuda.Event | None = None,
                short_cycles: int = SHORT_CYCLES, long_cycles: int = LONG_CYCLES) -> Reading:
        """Enqueue one reading on `stream` (after `after`, when given) without waiting for it: run
        on SMs no other work uses (`SmLayout.remainder_stream`), it reads the clock other streams'
        work runs at, averaged over the long spin."""
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        with torch.cuda.stream(stream):
            out = torch.zeros(2, dtype=torch.int64, device=self.dev)  # [short, long] cycles spun
            if after is not None:
                stream.wait_event(after)
            else:  # keep the GPU busy while the host enqueues the timed spins
                _spin_kernel[(1,)](out[0:], FILL_CYCLES, num_warps=1)
            ev[0].record(stream)
            _spin_kernel[(1,)](out[0:], short_cycles, num_warps=1)
            ev[1].record(stream)
            _spin_kernel[(1,)](out[1:], long_cycles, num_warps=1)
            ev[2].record(stream)
        return Reading(out, ev, stream)

    def mhz(self, stream: torch.cuda.Stream) -> float:
        """The clock right after what `stream` ran before (median of `repeats` readings; syncs)."""
        return statistics.median(self.enqueue(stream).mhz() for _ in range(self.repeats))
