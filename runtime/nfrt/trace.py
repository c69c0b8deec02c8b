"""Timestamps taken inside a CUDA graph replay: where one layer's time goes, per stream.

A `Tracer` owns a device buffer of int64 slots and a one-program kernel that writes the GPU's
`%globaltimer` (ns) into one slot. The engine (built with `trace=True`) launches it on a nano-op's
stream after the nano-op's event waits (its real start) and after its ops (its end), so the stamps
are captured with the graph and rewritten by every replay; `read()` copies them back. On the CPU
the stamps are host `perf_counter_ns` readings (the CPU executor is synchronous), which keeps the
bookkeeping testable without a GPU.

Slots: 0 = iteration start (origin stream, before the fork), 1 = iteration end (after the tail),
then per layer and per nano-op (in the engine's issue order) a start and an end slot.

The analysis half (`layer_rows`, `stream_stats`, `compare`) is plain Python over the read-back
numbers: per nano-op measured start/end/duration relative to the layer's first start, per stream
the busy time and the idle gaps (a gap before a nano-op that waits on events is waiting; one
before a nano-op with no cross-stream wait is launch/stream latency), and measured vs predicted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from nfrt.errors import NfrtError

ITER_START, ITER_END, FIRST_OP_SLOT = 0, 1, 2

_KERNEL: Any = None


def _stamp_kernel() -> Any:
    """The Triton kernel (built once, lazily: importing this module needs no Triton)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit(do_not_specialize=["slot"])
        def stamp(buf_ptr, slot):
            # one program, one thread's value: the global nanosecond timer, shared by all SMs
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                          is_pure=False, pack=1)
            tl.store(buf_ptr + slot, t)

        _KERNEL = stamp
    return _KERNEL


class Tracer:
    """`num_layers` x `num_nano_ops` start/end slots plus the iteration's start and end."""

    def __init__(self, num_layers: int, num_nano_ops: int, device: torch.device | str) -> None:
        if num_layers < 1 or num_nano_ops < 1:
            raise NfrtError(f"tracer: num_layers {num_layers} and num_nano_ops {num_nano_ops} must be >= 1")
        self.num_layers, self.num_nano_ops = num_layers, num_nano_ops
        self.device = torch.device(device)
        self.num_slots = FIRST_OP_SLOT + 2 * num_layers * num_nano_ops
        if self.device.type == "cuda":
            self.buf = torch.zeros(self.num_slots, dtype=torch.int64, device=self.device)
        else:
            self.buf = torch.zeros(self.num_slots, dtype=torch.int64)

    def slot(self, layer: int, index: int, end: bool) -> int:
        """Slot of nano-op `index` (issue order) of `layer`: its start, or its end when `end`."""
        if not (0 <= layer < self.num_layers and 0 <= index < self.num_nano_ops):
            raise NfrtError(f"tracer: layer {layer} / nano-op {index} outside {self.num_layers} x "
                            f"{self.num_nano_ops}")
        return FIRST_OP_SLOT + 2 * (layer * self.num_nano_ops + index) + int(end)

    def stamp(self, slot: int) -> None:
        """Write the time into `slot` on the current stream (CUDA: a 1-program kernel launch)."""
        if self.device.type == "cuda":
            _stamp_kernel()[(1,)](self.buf, slot, num_warps=1)
        else:
            self.buf[slot] = time.perf_counter_ns()

    def clear(self) -> None:
        self.buf.zero_()

    def read(self) -> list[int]:
        """The stamps in ns (synchronizes the device)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [int(x) for x in self.buf.cpu().tolist()]


# ---- analysis (plain Python) --------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    nano_op: str
    stream: str
    start_us: float  # relative to the layer's first nano-op start
    end_us: float
    waits: bool  # the nano-op waits on a cross-stream event

    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us


def layer_rows(stamps: list[int], layer: int, order: list[tuple[str, str, bool]],
               num_layers: int) -> list[Row]:
    """Rows of one layer; `order[i]` = (nano-op, stream, waits) of issue index i."""
    n = len(order)
    if len(stamps) != FIRST_OP_SLOT + 2 * num_layers * n:
        raise NfrtError(f"trace: {len(stamps)} stamps do not fit {num_layers} layers x {n} nano-ops")
    base = FIRST_OP_SLOT + 2 * layer * n
    raw = [(stamps[base + 2 * i], stamps[base + 2 * i + 1]) for i in range(n)]
    if any(s == 0 or e == 0 or e < s for s, e in raw):
        raise NfrtError(f"trace: layer {layer} has unwritten or reversed stamps (was the graph replayed?)")
    t0 = min(s for s, _ in raw)
    return [Row(name, st, (s - t0) / 1e3, (e - t0) / 1e3, waits)
            for (name, st, waits), (s, e) in zip(order, raw, strict=True)]


def stream_stats(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per stream: busy time, idle gaps between its nano-ops (waiting on events, or not), span."""
    out: dict[str, dict[str, float]] = {}
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.stream, []).append(r)
    for st, rs in by.items():
        rs = sorted(rs, key=lambda r: r.start_us)
        wait = launch = 0.0
        for prev, cur in zip(rs, rs[1:], strict=False):
            gap = max(0.0, cur.start_us - prev.end_us)
            if cur.waits:
                wait += gap
            else:
                launch += gap
        out[st] = {"busy_us": sum(r.duration_us for r in rs), "event_wait_gap_us": wait,
                   "other_gap_us": launch, "first_start_us": rs[0].start_us, "last_end_us": rs[-1].end_us}
    return out


def compare(rows: list[Row], predicted: dict[str, tuple[float, float]] | None) -> list[dict[str, Any]]:
    """Per nano-op measured vs predicted (start, end) of one layer; predicted times shifted so that
    the first predicted start is 0, like the measured ones."""
    p0 = min((s for s, _ in predicted.values()), default=0.0) if predicted else 0.0
    out = []
    for r in rows:
        d: dict[str, Any] = {"nano_op": r.nano_op, "stream": r.stream, "start_us": r.start_us,
                             "end_us": r.end_us, "duration_us": r.duration_us, "waits": r.waits}
        p = predicted.get(r.nano_op) if predicted else None
        if p is not None:
            ps, pe = p[0] - p0, p[1] - p0
            d.update(predicted_start_us=ps, predicted_end_us=pe, predicted_duration_us=pe - ps,
                     measured_over_predicted=r.duration_us / (pe - ps) if pe > ps else None)
        out.append(d)
    return out
