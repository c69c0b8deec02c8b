"""The sustained-clock phase of the profiler: each layer op timed at the GPU's power-limited clock.

Pure Python (no torch): the timer's `sustained(num_sms, points, tick)` does the GPU work
(`nfsearch.profiler.measure.GpuTimer.sustained`) and returns (burst us, sustained us) per point;
this module walks the grid, turns the pairs into the profile's sustained table
(`nfsearch.profile_sustained`), and adds such a table to an existing profile
(`nfsearch profile --add-sustained`), which keeps every burst point it has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pandas as pd
from nfrt.config import ModelConfig

from nfsearch.errors import NfsearchError
from nfsearch.profile import Profile, save_profile
from nfsearch.profile_sustained import SUSTAINED_COLUMNS
from nfsearch.profiler.grid import Point, ProfileGrid, heat_label, sustained_points

Tick = Callable[[int], None]
# state["sustained"][str(num_sms)] rows: [op, tokens, context, burst us, sustained us]
NOTE_PREFIX = "sustained table: "
HEAT_PREFIX = "held between replays of a heater, "


def measure_sustained(model: ModelConfig, tp: int, grid: ProfileGrid, timer: Any, tick: Tick,
                      done: dict[str, list[list[Any]]] | None = None,
                      checkpoint: Callable[[], None] | None = None,
                      points: list[Point] | None = None) -> dict[str, list[list[Any]]]:
    """Rows per SM count (see above) for every point of the grid's sustained table (or `points`,
    on the grid's sustained SM counts); SM counts already in `done` are kept, and `checkpoint()`
    runs after each new one."""
    points = sustained_points(model, tp, grid) if points is None else points
    held = getattr(timer, "grid", grid)  # the heater is the timer's (nfsearch.profiler.held)
    if heat_label(held) != heat_label(grid):
        raise NfsearchError(f"the timer's heater is {heat_label(held)}, the grid's {heat_label(grid)}")
    out = done if done is not None else {}
    for s in sorted(grid.sustained_sms, reverse=True):
        if str(s) in out or not points:
            continue
        got = timer.sustained(s, points, tick)
        if len(got) != len(points):
            raise NfsearchError(f"timer returned {len(got)} sustained timings for {len(points)} points")
        out[str(s)] = [[op, t, c, float(b), float(x)] for (op, t, c), (b, x) in zip(points, got, strict=True)]
        if checkpoint is not None:
            checkpoint()
    return out


# (op, tokens, context, num_sms) -> the profile's own (burst) latency of that point, us
Reference = Callable[[str, int, int, int], float]


def sustained_table(rows_by_sms: dict[str, list[list[Any]]], reference: Reference | None = None,
                    heat: str = "") -> tuple[pd.DataFrame, str]:
    """The profile's sustained table and a sentence for meta.notes: the measured factors
    (sustained us over the profile's latency of the point, `measured_factors`), each (op, tokens)
    replaced by its median over the SM counts (`across_sms`). `heat`: the heater in words
    (`nfsearch.profiler.grid.heat_label`), for the note."""
    raw = measured_factors(rows_by_sms, reference)
    if raw.empty:
        return raw, ""
    table, offset = pooled(raw)
    return table, table_note(raw, table, offset, reference is not None, heat)


def measured_factors(rows_by_sms: dict[str, list[list[Any]]],
                     reference: Reference | None = None) -> pd.DataFrame:
    """The measured factor of every point, as rows of the sustained table: its sustained latency
    over `reference` (the profile's own latency of that point, the one the factor multiplies in
    `Profile.latency_us`); without a reference, over the burst timing taken beside it.

    Why the profile's latency: the burst timing beside a held point is taken right after the heater
    (or the previous point's held replays), at a clock already pulled down, so for the GEMMs that
    draw the most power it is itself slow and the ratio comes out near 1 (llama3-70b TP 4 gate_up at
    2048 tokens: 1.08 over it, while the pipeline runs it 1.20x the profile's point, RESULTS.md
    session 11)."""
    rows = []
    for s, measured in rows_by_sms.items():
        for op, t, c, burst, held in measured:
            base = float(burst) if reference is None else float(reference(str(op), int(t), int(c), int(s)))
            if not (base > 0 and float(held) > 0):
                raise NfsearchError(f"sustained point {op} at {t} tokens on {s} SMs: burst ({base}) or "
                                    f"sustained ({held}) latency is not positive")
            rows.append([str(op), int(t), int(s), float(held) / base])
    return pd.DataFrame(rows, columns=list(SUSTAINED_COLUMNS))


def profile_reference(profile: Profile) -> Reference:
    """The profile's burst latency of a point (interpolated where the point is off its grid)."""
    return lambda op, t, c, s: profile.latency_us(op, t, c, s, sustained=False)


def across_sms(raw: pd.DataFrame) -> pd.DataFrame:
    """The stored table: each (op, tokens)'s factor on the partitions (fewer than all SMs) replaced by
    its median over them, and on all SMs by that median times the profile's all-SM offset (the
    median over every (op, tokens) of its all-SM point over its partition median).

    Why: the heater sets one clock for the whole chip, so an op's slowdown does not depend on its
    partition; single points scatter by about +-5-10% around their neighbours (the limiter's clock
    is not steady on 100 ms scales, RESULTS.md session 10), and a search fed the raw points picked
    the partition sizes whose points happened to come out fast. All SMs is the one size that runs
    on an ordinary stream instead of a green context, and its points lie 1-2% above the partition
    median in all four H200 profiles; one offset for the whole profile keeps that without keeping
    any single point's noise."""
    return pooled(raw)[0]


def pooled(raw: pd.DataFrame, offset: float | None = None) -> tuple[pd.DataFrame, float]:
    """(the stored table of `across_sms`, the all-SM offset). `offset`: use this all-SM offset
    instead of the one of `raw` (--add-ops pools new ops with the profile's own)."""
    full = int(raw["num_sms"].max())
    parts = raw[raw["num_sms"] < full]
    if parts.empty:  # only all SMs measured: nothing to pool over
        return raw[list(SUSTAINED_COLUMNS)].reset_index(drop=True), 1.0
    med = parts.groupby(["op", "tokens"], sort=True)["factor"].median().rename("median")
    out = raw.join(med, on=["op", "tokens"])
    top = out[out["num_sms"] == full]
    if offset is None:
        offset = float((top["factor"] / top["median"]).median()) if not top.empty else 1.0
    factor = out["median"].where(out["num_sms"] < full, out["median"] * offset)
    return out.assign(factor=factor)[list(SUSTAINED_COLUMNS)].reset_index(drop=True), offset


def table_offset(table: pd.DataFrame) -> float:
    """The all-SM offset a stored table was pooled with (`pooled`), read back from its rows: the
    median over its (op, tokens) of the all-SM factor over the partitions' (equal) factor; 1.0
    for a table without partitions or without an all-SM row."""
    full = int(table["num_sms"].max()) if len(table) else 0
    parts = table[table["num_sms"] < full].groupby(["op", "tokens"], sort=True)["factor"].median()
    top = table[table["num_sms"] == full].set_index(["op", "tokens"])["factor"]
    ratio = (top / parts).dropna()
    return float(ratio.median()) if len(ratio) else 1.0


def table_note(raw: pd.DataFrame, table: pd.DataFrame, offset: float, over_profile: bool = False,
               heat: str = "") -> str:
    """The meta.notes sentence of a sustained table measured as `raw` and stored as `pooled(raw)`
    = (table, offset); `over_profile`: the factors are over the profile's own latencies; `heat`:
    the heater in words (`note_heat` reads it back)."""
    sms = sorted({int(x) for x in raw["num_sms"]})
    toks = sorted({int(x) for x in raw["tokens"]})
    med = table["factor"]
    spread = raw["factor"].to_numpy() / med.to_numpy()
    over = "the profile's latency of the point" if over_profile else "the burst latency beside it"
    held = f"{HEAT_PREFIX}{heat}, " if heat else ""
    return (f"{NOTE_PREFIX}{len(raw)} points ({', '.join(sorted(set(raw['op'])))} at "
            f"{'/'.join(map(str, toks))} tokens on {'/'.join(map(str, sms))} SMs), {held}measured factor = "
            f"sustained latency / {over} {raw['factor'].min():.3f}..{raw['factor'].max():.3f}; stored: "
            f"per op and tokens the median over the partitions, on all SMs times the profile's all-SM offset "
            f"{offset:.3f}, {med.min():.3f}..{med.max():.3f} (the points lie within "
            f"{spread.min():.3f}..{spread.max():.3f} of it); latencies are charged burst x factor "
            f"(docs/profile-format.md, \"Sustained clock\")")


def note_heat(notes: str) -> str:
    """The heater a profile's sustained table was held against, as `table_note` wrote it into
    meta.notes; a table noted without one was held against the GEMM heater (the only one before)."""
    for part in notes.split(" | "):
        if part.startswith(NOTE_PREFIX) and HEAT_PREFIX in part:
            return part.split(HEAT_PREFIX, 1)[1].split(", measured factor", 1)[0]
    return heat_label(None)


def with_sustained(profile: Profile, table: pd.DataFrame, note: str) -> Profile:
    """`profile` with its sustained table (and that note) replaced."""
    kept = [p for p in profile.meta.notes.split(" | ") if not p.startswith(NOTE_PREFIX)]
    meta = replace(profile.meta, notes=" | ".join(kept + ([note] if note else [])))
    return Profile(meta, profile.latency, profile.interference, table)


def add_sustained(profile: Profile, model: ModelConfig, tp: int, grid: ProfileGrid, timer: Any,
                  out: str | os.PathLike[str], num_sms: int, leader: bool = True,
                  progress: Callable[[int, int], Any] | None = None) -> Profile:
    """Measure the grid's sustained table on this GPU and save `profile` with it at `out`."""
    m = profile.meta
    if m.source != "measured" or m.model != model.name or m.tp != tp or m.num_sms != num_sms:
        raise NfsearchError(f"--add-sustained: the profile is {m.source} {m.model} tp {m.tp} on {m.num_sms} "
                            f"SMs; this run is {model.name} tp {tp} on {num_sms} SMs")
    total = len(sustained_points(model, tp, grid)) * len(grid.sustained_sms)
    bar = progress(total, 0) if progress and leader else None
    try:
        rows = measure_sustained(model, tp, grid, timer, bar.update if bar is not None else (lambda n: None))
    finally:
        if bar is not None:
            bar.close()
    new = with_sustained(profile, *sustained_table(rows, profile_reference(profile), heat_label(grid)))
    if leader:
        save_profile(new, out)
    return new
