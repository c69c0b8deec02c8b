"""The profiling loop: walk the grid with a timer, keep partial results, build the profile.

Pure Python (no torch): the timer does the GPU work (`nfsearch.profiler.measure.GpuTimer`), so the
loop, the partial file behind `--resume` and the table building are testable on a CPU with a fake
timer. Results are written atomically to `<out>.partial.json` after the ceilings, after each SM
size and after each interference split; `--resume` reloads it and skips what it holds.

Under tensor parallelism every rank runs this loop, in lockstep: the timer issues the same
collectives in the same order on every rank, so every rank must walk the same points. Each rank
reads the same partial file at the start (then all meet at `barrier`, before the leader can write
it again); only the leader (rank 0) writes files, and its numbers are the profile.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from nfrt.atomic import atomic_write_text
from nfrt.config import ModelConfig

import nfsearch
from nfsearch.errors import NfsearchError
from nfsearch.profile import (
    CLOCK_COLUMN,
    INTERFERENCE_COLUMNS,
    LATENCY_COLUMNS,
    Profile,
    ProfileMeta,
    save_profile,
)
from nfsearch.profiler.grid import (
    CORUN_KINDS,
    Point,
    ProfileGrid,
    corun_sets,
    grid_point_count,
    heat_label,
    op_points,
    profiles_gather,
    split_pairs,
)
from nfsearch.profiler.sustained import (
    measure_sustained,
    profile_reference,
    sustained_table,
    with_sustained,
)

PARTIAL_FORMAT = "nfsearch-profile-partial"
NVLINK_PROBE_MIB = 512  # the all-reduce that measures meta.nvlink_gbps under TP
Tick = Callable[[int], None]
# (bottom op, top op, bottom SMs, top SMs, bottom slowdown, top slowdown, bottom solo us per op,
# top solo us per op); slowdowns unclamped. Bottom: SM slots [0, c); top: the top m placed slots.
CoRun = tuple[str, str, int, int, float, float, float, float]


class Timer(Protocol):
    """What the loop needs from the GPU side."""

    def stamp(self) -> dict[str, Any]:
        """gpu_name, num_sms, driver, cuda, torch, triton."""

    def ceilings(self) -> dict[str, float]:
        """peak_tflops (bf16 GEMM 8192^3) and hbm_gbps (device copy, read + write); under TP also
        nvlink_gbps (all-reduce bus bandwidth)."""

    def solo(self, num_sms: int, points: list[Point], tick: Tick) -> list[float] | list[tuple[float, float]]:
        """Solo latency (us) of each point on a partition of `num_sms` SMs, or (us, SM clock MHz)."""

    def sustained(self, num_sms: int, points: list[Point], tick: Tick) -> list[tuple[float, float]]:
        """(burst us, sustained us) per launch of each point on a partition of `num_sms` SMs."""

    def corun(self, top_sms: int, bottom_sms: int, bottom_ops: tuple[str, ...],
              top_ops: tuple[str, ...], tick: Tick) -> list[CoRun]:
        """Each bottom op on SMs [0, bottom_sms) beside each top op on the top `top_sms` placed SMs
        (memory or network), both sustained; one row per pair."""

    def describe(self) -> str:
        """One sentence on the method, for meta.notes."""


def partial_path(out: str | os.PathLike[str]) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".partial.json")


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj))


def _load_state(path: Path, key: dict[str, Any], resume: bool) -> dict[str, Any]:
    fresh = {"format": PARTIAL_FORMAT, "key": key, "ceilings": None, "solo": {}, "interference": {},
             "sustained": {}}
    if not resume or not path.is_file():
        return fresh
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NfsearchError(f"--resume: cannot read the partial file {path} ({e}); delete it to start "
                            "over") from None
    if not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT:
        raise NfsearchError(f"--resume: {path} is not a partial profile; delete it to start over")
    if state.get("key") != key:
        diff = sorted(k for k in set(key) | set(state.get("key") or {})
                      if key.get(k) != (state.get("key") or {}).get(k))
        raise NfsearchError(f"--resume: {path} was made for another run (differs in {', '.join(diff)}); "
                            "delete it or drop --resume")
    return state


def run_profile(model: ModelConfig, tp: int, grid: ProfileGrid, timer: Timer, out: str | os.PathLike[str],
                gpu_slug: str, sm_granularity: int, nvlink_gbps: float, resume: bool = False,
                progress: Callable[[int, int], Any] | None = None, grid_name: str = "full",
                leader: bool = True, barrier: Callable[[], None] | None = None) -> Profile:
    """Measure everything the grid names (skipping what a resumed partial file holds) and save the profile.

    `progress(total, done)` returns an object with `update(n)` and `close()` (a tqdm bar), or None.
    Under TP: `leader` is False on every rank but 0 (it writes no file), and `barrier()` waits for
    every rank (called once all have read the partial file). `nvlink_gbps` is the datasheet value,
    used unless the timer's ceilings measure one.
    """
    stamp = timer.stamp()
    if stamp["num_sms"] != grid.num_sms:
        raise NfsearchError(f"the grid ends at {grid.num_sms} SMs but the GPU has {stamp['num_sms']}")
    points = op_points(model, tp, grid)
    key = {"model": model.name, "model_config": model.to_dict(), "tp": tp, "gpu_name": stamp["gpu_name"],
           "num_sms": stamp["num_sms"], "grid": grid.to_dict()}
    if profiles_gather(model, tp):  # a partial file from before the gather-form ops lacks them
        key["gather_form"] = True
    ppath = partial_path(out)
    state = _load_state(ppath, key, resume)
    if barrier is not None:
        barrier()  # every rank holds the same state before the leader writes the file again

    def checkpoint() -> None:
        if leader:
            _write_json_atomic(ppath, state)

    n_solo, n_co, n_sus = grid_point_count(model, tp, grid)
    done = (len(points) * len(state["solo"]) + sum(len(v) for v in state["interference"].values())
            + sum(len(v) for v in state["sustained"].values()))
    bar = progress(n_solo + n_co + n_sus, done) if progress and leader else None
    tick: Tick = bar.update if bar is not None else (lambda n: None)
    try:
        if state["ceilings"] is None:
            state["ceilings"] = timer.ceilings()
            checkpoint()
        # all SMs first: the numbers every schedule uses, and a quick sanity check of the setup
        for s in sorted(grid.sms, reverse=True):
            if str(s) in state["solo"]:
                continue
            lat = timer.solo(s, points, tick)
            if len(lat) != len(points):
                raise NfsearchError(f"timer returned {len(lat)} latencies for {len(points)} points")
            state["solo"][str(s)] = [[op, t, c] + ([float(v) for v in x] if isinstance(x, tuple | list)
                                                    else [float(x)])
                                     for (op, t, c), x in zip(points, lat, strict=True)]
            checkpoint()
        for top, bottom in split_pairs(grid):
            if str(top) in state["interference"]:
                continue
            rows: list[CoRun] = []
            for bottom_ops, top_ops in corun_sets(model, tp):
                rows += timer.corun(top, bottom, bottom_ops, top_ops, tick)
            state["interference"][str(top)] = [list(r) for r in rows]
            checkpoint()
        measure_sustained(model, tp, grid, timer, tick, state["sustained"], checkpoint)
    finally:
        if bar is not None:
            bar.close()
    profile = build_profile(model, tp, grid, state, stamp, gpu_slug, sm_granularity, nvlink_gbps,
                            timer.describe(), grid_name)
    if leader:
        save_profile(profile, out)
        ppath.unlink(missing_ok=True)
    return profile


def corun_kind(op: str) -> str:
    kind = CORUN_KINDS.get(op)
    if kind is None:
        raise NfsearchError(f"interference row names op {op!r}, which does not co-run; valid: "
                            f"{', '.join(CORUN_KINDS)}")
    return kind


def aggregate_interference(rows: list[CoRun], sm_grid: tuple[int, ...]) -> tuple[list[list[Any]], str]:
    """Slowdown per (kind, other_kind, num_sms), clamped at 1.0, edges filled.

    Each co-run row gives two sides: the bottom op's slowdown (kind of the bottom op beside the kind
    of the top op, on the bottom SMs) and the top op's (the other way round, on the top SMs). Per
    (kind, other_kind, SMs): first the max over an op's partners of that other kind (the partner
    that hurts it most), then the solo-latency-weighted mean over the kind's ops, i.e. sum(co-run
    time) / sum(solo time). Compute beside memory is thus the slowdown of the layer's GEMM chain
    that an overlapped stretch of compute nano-ops runs (a max would charge every compute nano-op
    the worst small GEMM's factor); memory (one op, decode attention) beside compute is the max over
    its GEMM partners; network (one op) likewise. Each split is complementary (bottom + top = the
    placed SMs), the partner size the schedules use. The SM axis is extended to the latency grid's
    ends by copying the nearest measured value (a lookup outside a pair's range would raise).
    Returns the table rows and a sentence for meta.notes.
    """
    # (kind, other kind, SMs) -> op -> (worst slowdown over partners, solo us per op)
    sides: dict[tuple[str, str, int], dict[str, tuple[float, float]]] = {}

    def add(op: str, other: str, sms: int, slow: float, us: float) -> None:
        by_op = sides.setdefault((corun_kind(op), corun_kind(other), int(sms)), {})
        prev = by_op.get(op)
        by_op[op] = (slow, us) if prev is None else (max(prev[0], slow), prev[1])

    raw: list[float] = []
    for r in rows:
        a, b, a_sms, b_sms, a_slow, b_slow = r[:6]
        a_us, b_us = (float(r[6]), float(r[7])) if len(r) > 7 else (1.0, 1.0)
        add(a, b, a_sms, float(a_slow), a_us)
        add(b, a, b_sms, float(b_slow), b_us)
        raw += [float(a_slow), float(b_slow)]
    clamped = sum(1 for x in raw if x < 1.0)
    agg: dict[tuple[str, str], dict[int, float]] = {}
    for (k, o, sms), by_op in sorted(sides.items()):
        agg.setdefault((k, o), {})[sms] = (sum(x * w for x, w in by_op.values())
                                           / sum(w for _, w in by_op.values()))
    table: list[list[Any]] = []
    filled: set[int] = set()
    for pair, by in agg.items():
        pts = sorted((s, max(1.0, x)) for s, x in by.items())
        if pts[0][0] > sm_grid[0]:
            filled.add(sm_grid[0])
            pts.insert(0, (sm_grid[0], pts[0][1]))
        if pts[-1][0] < sm_grid[-1]:
            filled.add(sm_grid[-1])
            pts.append((sm_grid[-1], pts[-1][1]))
        table += [[pair[0], pair[1], s, x] for s, x in pts]
    pairs = ", ".join(f"{k}/{o}" for k, o in agg)
    bottoms = sorted({r[0] for r in rows})
    tops = sorted({r[1] for r in rows})
    note = (f"interference ({pairs or 'none'}): sustained co-runs of {', '.join(bottoms) or 'no ops'} "
            f"beside {', '.join(tops) or 'no ops'} (top of the placed SMs) on complementary placed "
            f"partitions; per kind and SMs, slowdown = co-run / solo time on the same partition, the "
            f"max over an op's partners, then the solo-latency-weighted mean over the kind's ops; "
            f"{clamped} of {len(raw)} raw ratios were below 1.0 and are clamped")
    if raw:
        note += f"; raw range {min(raw):.3f}..{max(raw):.3f}"
    if filled:
        where = ", ".join(map(str, sorted(filled)))
        note += f"; values at {where} SMs copied from the nearest measured split"
    per_op = "; ".join(f"{r[0]}@{int(r[2])} {float(r[4]):.2f} / {r[1]}@{int(r[3])} {float(r[5]):.2f}"
                       for r in sorted(rows, key=lambda r: (int(r[3]), str(r[1]), str(r[0]))))
    if per_op:
        note += f"; raw per pair (bottom@SMs slowdown / top@SMs slowdown): {per_op}"
    return table, note


def build_profile(model: ModelConfig, tp: int, grid: ProfileGrid, state: dict[str, Any],
                  stamp: dict[str, Any], gpu_slug: str, sm_granularity: int, nvlink_gbps: float, method: str,
                  grid_name: str = "full") -> Profile:
    solo = [r for rows in state["solo"].values() for r in rows]
    clocked = bool(solo) and all(len(r) > 4 for r in solo)
    lat_rows = [[r[0], int(r[1]), int(r[2]), int(s), float(r[3])] + ([float(r[4])] if clocked else [])
                for s, rows in state["solo"].items() for r in rows]
    co_rows = [tuple(r) for rows in state["interference"].values() for r in rows]
    inter, inter_note = aggregate_interference(co_rows, grid.sms)
    ceil = state["ceilings"]
    if "nvlink_gbps" in ceil:
        nvlink_gbps = float(ceil["nvlink_gbps"])
        nv_note = (f"nvlink_gbps is measured: the bus bandwidth 2 (n - 1) / n * bytes / time of a "
                   f"{NVLINK_PROBE_MIB} MiB bf16 all-reduce over the {tp} GPUs (median)")
    else:
        nv_note = "nvlink_gbps is the datasheet value (not measured)"
    notes = (f"measured by nfsearch profile ({grid_name} grid); {method} Ceilings: bf16 GEMM 8192^3 and a "
             f"1 GiB device copy (read + write). {nv_note}. {inter_note}.")
    meta = ProfileMeta(
        source="measured", model=model.name, tp=tp, gpu=gpu_slug, gpu_name=stamp["gpu_name"],
        num_sms=int(stamp["num_sms"]), sm_granularity=sm_granularity, peak_tflops=float(ceil["peak_tflops"]),
        hbm_gbps=float(ceil["hbm_gbps"]), nvlink_gbps=float(nvlink_gbps), driver=stamp.get("driver", ""),
        cuda=stamp.get("cuda", ""), torch=stamp.get("torch", ""), triton=stamp.get("triton", ""),
        date=stamp.get("date") or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        nfsearch_version=nfsearch.__version__, notes=notes)
    columns = list(LATENCY_COLUMNS) + ([CLOCK_COLUMN] if clocked else [])
    burst = Profile(meta, pd.DataFrame(lat_rows, columns=columns),
                    pd.DataFrame(inter, columns=list(INTERFERENCE_COLUMNS)))
    # the factors are over the latencies they multiply: this profile's own points
    sus, sus_note = sustained_table(state["sustained"], profile_reference(burst), heat_label(grid))
    if sus.empty:
        return burst
    return with_sustained(burst, sus, sus_note)
