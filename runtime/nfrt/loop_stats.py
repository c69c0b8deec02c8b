"""Accounting of the serving loop (`nfrt.LLM`): where the time of an iteration goes.

Always kept (a few integer adds per iteration): iterations, tokens and slots (the tokens the
batch's shape computes) per shape — `dense` (the schedule's batch) and `decode_only` (the drain's
decode slots) — and per phase:

- `ramp_up`: the iterations before the first one with no padding;
- `steady`: from that one until the drain;
- `drain`: iterations planned with no request waiting or still in its prompt (`Plan.drain`).

Padding slots = slots - tokens.

With `instrument=True`, per iteration also (the `rows` columns, in `COLUMNS` order):

- the batch's make-up: real decode tokens and prompt tokens in the decode slots, single-token
  decode runs and prompt tokens in the prefill region, the sum of decode-slot context lengths and
  of prefill-token positions + 1 (what decode and prefill attention read);
- host wall time (`perf_counter`) of the loop's phases: `plan` (the scheduler), `fill` (writing
  pinned staging), `enqueue` (issuing upload, forward, sampling and read-back), `wait` (blocked
  until this iteration's sampled ids were back), `collect` (appending them and handing finished
  requests to the caller, the caller's own time included);
- on CUDA, four timing events recorded on the loop's stream — e0 before the upload, e1 before the
  forward, e2 after it, e3 after sampling and the read-back — and read only once the run is over
  (no host sync per iteration). Device times: `upload` = e1 - e0, `forward` = e2 - e1 (the graph
  replay), `sample` = e3 - e2, `idle` = e0[k] - e3[k - 1] (the device had nothing queued: the host
  was late), `period` = e0[k + 1] - e0[k] (start to start).

`summary()` gives per shape the medians (`median_us`) and sums (`total_s`) of those times and the
medians of the make-up (`median_counts`), and the dense forward's median split by whether the
prefill region held decode runs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

SHAPES = ("dense", "decode_only")
PHASES = ("ramp_up", "steady", "drain")
COUNTS = ("decode_slot_decodes", "decode_slot_prompt", "prefill_decodes", "prefill_prompt",
          "decode_context_sum", "prefill_position_sum")
HOST = ("plan", "fill", "enqueue", "wait", "collect")
DEVICE = ("upload", "forward", "sample", "idle", "period")
COLUMNS = ("iteration", "shape", "phase", "tokens", "slots", *COUNTS, *(f"{h}_us" for h in HOST),
           *(f"{d}_us" for d in DEVICE))
MAX_LOGGED = 1 << 18  # iterations logged per run at most (bounded memory on endless streams)


def _blank() -> dict[str, int]:
    return {"iterations": 0, "tokens": 0, "slots": 0}


class LoopStats:
    """One `LLM.stream` call's accounting (see the module docstring)."""

    def __init__(self, instrument: bool = False, cuda: bool = False) -> None:
        self.instrument = instrument
        self.cuda = cuda
        self.shapes = {s: _blank() for s in SHAPES}
        self.phases = {p: _blank() for p in PHASES}
        self._full_seen = False
        self.rows: dict[str, list] = {c: [] for c in COLUMNS}
        self._events: list[tuple[Any, ...]] = []  # (e0, e1, e2, e3) per logged iteration
        self._row_of: dict[int, int] = {}  # iteration -> row
        self._device_read = False
        self.device_span_s: float | None = None  # first upload's start to the last read-back's end

    # ---- counting ---------------------------------------------------------------------------------
    def add(self, plan, shape: str, slots: int) -> int | None:
        """Count `plan` (run in `shape` of `slots` tokens); returns its row when logged, else None."""
        tokens = plan.num_tokens
        if plan.drain:
            phase = "drain"
        else:
            self._full_seen |= tokens == slots
            phase = "steady" if self._full_seen else "ramp_up"
        for d in (self.shapes[shape], self.phases[phase]):
            d["iterations"] += 1
            d["tokens"] += tokens
            d["slots"] += slots
        if not self.instrument or len(self.rows["iteration"]) >= MAX_LOGGED:
            return None
        c = dict.fromkeys(COUNTS, 0)
        for it in plan.decode:
            c["decode_slot_decodes" if it.start >= it.request.prompt_len else "decode_slot_prompt"] += 1
            c["decode_context_sum"] += it.start + 1
        for it in plan.prefill:
            if it.start >= it.request.prompt_len:
                c["prefill_decodes"] += 1
            else:
                c["prefill_prompt"] += it.length
            c["prefill_position_sum"] += it.length * it.start + it.length * (it.length + 1) // 2
        row = len(self.rows["iteration"])
        values = {"iteration": plan.iteration, "shape": shape, "phase": phase, "tokens": tokens,
                  "slots": slots, **c}
        for col in COLUMNS:
            self.rows[col].append(values.get(col, float("nan")))
        self._row_of[plan.iteration] = row
        return row

    def host(self, row: int | None, phase: str, seconds: float) -> None:
        if row is not None:
            self.rows[f"{phase}_us"][row] = seconds * 1e6

    def row(self, iteration: int) -> int | None:
        return self._row_of.get(iteration)

    # ---- device events ------------------------------------------------------------------------------
    def events(self, row: int | None):
        """Four fresh timing events for `row` (None when not logged or not on CUDA)."""
        if row is None or not self.cuda:
            return None
        import torch

        ev = tuple(torch.cuda.Event(enable_timing=True) for _ in range(4))
        self._events.append((row, *ev))
        return ev

    def read_device(self) -> None:
        """Fill the device columns; call after the device is done with every logged iteration."""
        if self._device_read:
            return
        self._device_read = True
        prev = first = None
        r = self.rows
        for row, e0, e1, e2, e3 in self._events:
            try:
                times = (e0.elapsed_time(e1), e1.elapsed_time(e2), e2.elapsed_time(e3))
                follows = prev is not None and prev[0] == row - 1
                gap = (prev[4].elapsed_time(e0), prev[1].elapsed_time(e0)) if follows else None
            except RuntimeError:  # an event never recorded: its launch raised; skip the iteration
                prev = None
                continue
            r["upload_us"][row], r["forward_us"][row], r["sample_us"][row] = (t * 1e3 for t in times)
            if gap is not None:
                r["idle_us"][row] = max(0.0, gap[0] * 1e3)
                r["period_us"][row - 1] = gap[1] * 1e3
            prev = (row, e0, e1, e2, e3)
            if first is None:
                first = e0
            self.device_span_s = first.elapsed_time(e3) * 1e-3
        self._events = []

    # ---- summary ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shapes": {s: dict(d) for s, d in self.shapes.items()},
                               "phases": {p: {**d, "padding": d["slots"] - d["tokens"]}
                                          for p, d in self.phases.items()}}
        if not self.instrument:
            return out
        out["device_span_s"] = self.device_span_s
        shape = np.asarray(self.rows["shape"], dtype=object)
        for s in SHAPES:
            mask = shape == s
            med, tot = {}, {}
            for name in (*HOST, *DEVICE):
                v = np.asarray(self.rows[f"{name}_us"], dtype=float)[mask]
                v = v[~np.isnan(v)]
                med[name] = float(np.median(v)) if v.size else None
                tot[name] = float(v.sum()) * 1e-6 if v.size else None
            counts = {c: _median(np.asarray(self.rows[c], dtype=float)[mask]) for c in ("tokens", *COUNTS)}
            out["shapes"][s].update(median_us=med, total_s=tot, median_counts=counts)
        fwd = np.asarray(self.rows["forward_us"], dtype=float)
        over = np.asarray(self.rows["prefill_decodes"]) > 0
        dense = shape == "dense"
        # Single-token decode runs in the prefill region go through prefill attention: is that slower?
        out["dense_forward_median_us"] = {
            "prefill_decode_runs": _median(fwd[dense & over]), "iterations_with": int((dense & over).sum()),
            "no_prefill_decode_runs": _median(fwd[dense & ~over]),
            "iterations_without": int((dense & ~over).sum())}
        return out

    def csv_text(self) -> str:
        """The logged rows, one line per iteration, `COLUMNS` as the header."""
        lines = [",".join(COLUMNS)]
        cols = [self.rows[c] for c in COLUMNS]
        for vals in zip(*cols, strict=True):
            lines.append(",".join(_cell(v) for v in vals))
        return "\n".join(lines) + "\n"


def _median(v: np.ndarray) -> float | None:
    v = v[~np.isnan(v)]
    return float(np.median(v)) if v.size else None


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.1f}"
    return str(v)


class Stopwatch:
    """perf_counter laps: `lap()` returns the seconds since the previous lap (or the start)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
