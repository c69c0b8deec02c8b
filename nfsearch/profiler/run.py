"""The profiling loop: walk the grid with a timer, keep partial results, build the profile.

Pure Python (no torch): the timer does the GPU work (`nfsearch.profiler.measure.GpuTimer`), so the
loop, the partial file behind `--resume` and the table building are testable on a CPU with a fake
timer. Results are written atomically to `<out>.partial.json` after the ceilings, after each SM
size and after each interference split; `--resume` reloads it and skips what it holds.
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
from nfsearch.profile import INTERFERENCE_COLUMNS, LATENCY_COLUMNS, Profile, ProfileMeta, save_profile
from nfsearch.profiler.grid import (
    Point,
    ProfileGrid,
    grid_point_count,
    interference_ops,
    op_points,
    split_pairs,
)

PARTIAL_FORMAT = "nfsearch-profile-partial"
Tick = Callable[[int], None]
# (compute op, memory op, compute SMs, memory SMs, compute slowdown, memory slowdown, compute solo
# us per op, memory solo us per op); slowdowns unclamped
CoRun = tuple[str, str, int, int, float, float, float, float]


class Timer(Protocol):
    """What the loop needs from the GPU side."""

    def stamp(self) -> dict[str, Any]:
        """gpu_name, num_sms, driver, cuda, torch, triton."""

    def ceilings(self) -> dict[str, float]:
        """peak_tflops (bf16 GEMM 8192^3) and hbm_gbps (device copy, read + write)."""

    def solo(self, num_sms: int, points: list[Point], tick: Tick) -> list[float]:
        """Solo latency (us) of each point on a partition of `num_sms` SMs."""

    def corun(self, memory_sms: int, compute_sms: int, compute_ops: tuple[str, ...],
              memory_ops: tuple[str, ...], tick: Tick) -> list[CoRun]:
        """Each compute op on SMs [0, compute_sms) beside each memory op on the top `memory_sms` placed
        SMs, both sustained; one row per pair."""

    def describe(self) -> str:
        """One sentence on the method, for meta.notes."""


def partial_path(out: str | os.PathLike[str]) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".partial.json")


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj))


def _load_state(path: Path, key: dict[str, Any], resume: bool) -> dict[str, Any]:
    fresh = {"format": PARTIAL_FORMAT, "key": key, "ceilings": None, "solo": {}, "interference": {}}
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
                progress: Callable[[int, int], Any] | None = None, grid_name: str = "full") -> Profile:
    """Measure everything the grid names (skipping what a resumed partial file holds) and save the profile.

    `progress(total, done)` returns an object with `update(n)` and `close()` (a tqdm bar), or None.
    """
    stamp = timer.stamp()
    if stamp["num_sms"] != grid.num_sms:
        raise NfsearchError(f"the grid ends at {grid.num_sms} SMs but the GPU has {stamp['num_sms']}")
    points = op_points(model, tp, grid)
    key = {"model": model.name, "model_config": model.to_dict(), "tp": tp, "gpu_name": stamp["gpu_name"],
           "num_sms": stamp["num_sms"], "grid": grid.to_dict()}
    ppath = partial_path(out)
    state = _load_state(ppath, key, resume)
    n_solo, n_co = grid_point_count(model, tp, grid)
    done = len(points) * len(state["solo"]) + sum(len(v) for v in state["interference"].values())
    bar = progress(n_solo + n_co, done) if progress else None
    tick: Tick = bar.update if bar is not None else (lambda n: None)
    try:
        if state["ceilings"] is None:
            state["ceilings"] = timer.ceilings()
            _write_json_atomic(ppath, state)
        # all SMs first: the numbers every schedule uses, and a quick sanity check of the setup
        for s in sorted(grid.sms, reverse=True):
            if str(s) in state["solo"]:
                continue
            lat = timer.solo(s, points, tick)
            if len(lat) != len(points):
                raise NfsearchError(f"timer returned {len(lat)} latencies for {len(points)} points")
            state["solo"][str(s)] = [[op, t, c, float(x)] for (op, t, c), x in zip(points, lat, strict=True)]
            _write_json_atomic(ppath, state)
        comp, mem = interference_ops(model, tp)
        for msms, csms in split_pairs(grid):
            if str(msms) in state["interference"]:
                continue
            rows = timer.corun(msms, csms, comp, mem, tick)
            state["interference"][str(msms)] = [list(r) for r in rows]
            _write_json_atomic(ppath, state)
    finally:
        if bar is not None:
            bar.close()
    profile = build_profile(model, tp, grid, state, stamp, gpu_slug, sm_granularity, nvlink_gbps,
                            timer.describe(), grid_name)
    save_profile(profile, out)
    ppath.unlink(missing_ok=True)
    return profile


def aggregate_interference(rows: list[CoRun], sm_grid: tuple[int, ...]) -> tuple[list[list[Any]], str]:
    """Slowdown per (kind, other_kind, num_sms), clamped at 1.0, edges filled.

    Compute on c SMs: the solo-latency-weighted mean over the compute ops co-run there, i.e.
    sum(co-run time) / sum(solo time) of the layer's GEMMs at the profiled tokens: the slowdown of
    the GEMM chain that an overlapped stretch of compute nano-ops runs (a max would charge every
    compute nano-op the worst small GEMM's factor). Memory on m SMs: the max over its co-runs (the
    partner that hurts decode attention most). Each split is complementary (c + m = the placed SMs),
    the partner size the schedules use. The SM axis is extended to the latency grid's ends by
    copying the nearest measured value (a lookup outside a pair's range would raise). Returns the
    table rows and a sentence for meta.notes.
    """
    comp: dict[int, list[tuple[float, float]]] = {}
    mem: dict[int, list[float]] = {}
    for r in rows:
        _c, _m, cs, ms, cslow, mslow = r[:6]
        c_us = float(r[6]) if len(r) > 6 else 1.0
        comp.setdefault(int(cs), []).append((float(cslow), c_us))
        mem.setdefault(int(ms), []).append(float(mslow))
    raw = [x for v in comp.values() for x, _ in v] + [x for v in mem.values() for x in v]
    clamped = sum(1 for x in raw if x < 1.0)
    agg = {("compute", "memory"): {s: sum(x * w for x, w in v) / sum(w for _, w in v)
                                   for s, v in comp.items()},
           ("memory", "compute"): {s: max(v) for s, v in mem.items()}}
    table: list[list[Any]] = []
    filled: set[int] = set()
    for pair, by in agg.items():
        pts = sorted((s, max(1.0, x)) for s, x in by.items())
        if not pts:
            continue
        if pts[0][0] > sm_grid[0]:
            filled.add(sm_grid[0])
            pts.insert(0, (sm_grid[0], pts[0][1]))
        if pts[-1][0] < sm_grid[-1]:
            filled.add(sm_grid[-1])
            pts.append((sm_grid[-1], pts[-1][1]))
        table += [[pair[0], pair[1], s, x] for s, x in pts]
    note = (f"interference: sustained co-runs of {len({r[0] for r in rows})} compute ops beside "
            f"{', '.join(sorted({r[1] for r in rows}))} on complementary placed partitions; compute = "
            f"solo-latency-weighted mean over ops of co-run / solo time per op on the same partition, "
            f"memory = max over ops; {clamped} of {len(raw)} raw ratios were below 1.0 and are clamped")
    if raw:
        note += f"; raw range {min(raw):.3f}..{max(raw):.3f}"
    if filled:
        where = ", ".join(map(str, sorted(filled)))
        note += f"; values at {where} SMs copied from the nearest measured split"
    per_op = "; ".join(f"{r[0]}@{int(r[2])} {float(r[4]):.2f} / {r[1]}@{int(r[3])} {float(r[5]):.2f}"
                       for r in sorted(rows, key=lambda r: (int(r[3]), str(r[0]))))
    if per_op:
        note += f"; raw per pair (compute@SMs slowdown / memory@SMs slowdown): {per_op}"
    return table, note


def build_profile(model: ModelConfig, tp: int, grid: ProfileGrid, state: dict[str, Any],
                  stamp: dict[str, Any], gpu_slug: str, sm_granularity: int, nvlink_gbps: float, method: str,
                  grid_name: str = "full") -> Profile:
    lat_rows = [[op, int(t), int(c), int(s), float(x)]
                for s, rows in state["solo"].items() for op, t, c, x in rows]
    co_rows = [tuple(r) for rows in state["interference"].values() for r in rows]
    inter, inter_note = aggregate_interference(co_rows, grid.sms)
    ceil = state["ceilings"]
    notes = (f"measured by nfsearch profile ({grid_name} grid); {method} Ceilings: bf16 GEMM 8192^3 and a "
             f"1 GiB device copy (read + write). nvlink_gbps is the datasheet value (not measured). "
             f"{inter_note}.")
    meta = ProfileMeta(
        source="measured", model=model.name, tp=tp, gpu=gpu_slug, gpu_name=stamp["gpu_name"],
        num_sms=int(stamp["num_sms"]), sm_granularity=sm_granularity, peak_tflops=float(ceil["peak_tflops"]),
        hbm_gbps=float(ceil["hbm_gbps"]), nvlink_gbps=float(nvlink_gbps), driver=stamp.get("driver", ""),
        cuda=stamp.get("cuda", ""), torch=stamp.get("torch", ""), triton=stamp.get("triton", ""),
        date=stamp.get("date") or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        nfsearch_version=nfsearch.__version__, notes=notes)
    return Profile(meta, pd.DataFrame(lat_rows, columns=list(LATENCY_COLUMNS)),
                   pd.DataFrame(inter, columns=list(INTERFERENCE_COLUMNS)))
