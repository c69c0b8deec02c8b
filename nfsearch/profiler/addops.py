"""`nfsearch profile --add-ops`: measure the layer ops an existing profile lacks and add their rows.

A profile measured before the all-gather form of the attention output (docs/tensor-parallel.md)
has no rows for attn_allgather, o_proj_col and o_allgather; re-measuring the whole profile would
move every other point (and so every schedule's profile hash and cost) by the run-to-run noise.
This adds only the missing layer ops, on the profile's own grids:

- solo points on every SM size of the profile, at the token counts o_proj has in it (the gather
  ops replace o_proj + attn_allreduce on a prefix of the tokens, so they are asked for at the same
  token counts), context 0;
- if the profile has a sustained table, the factors of the missing non-network ops at its token
  counts and SM sizes, stored as `nfsearch.profiler.sustained.pooled` stores a measured table: per
  (op, tokens) the median over the partitions, on all SMs that median times the table's existing
  all-SM offset (`table_offset`, read back from its rows), so the new ops follow the same rule as
  the old ones without re-measuring them.

Every existing row is kept as it is (the saved rows are byte-identical; the hash changes, since
rows are added). The interference table is per op kind and does not change. Pure Python (no
torch): the timer does the GPU work, as in `nfsearch.profiler.run`.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pandas as pd
from nfrt.config import ModelConfig

from nfsearch.errors import NfsearchError
from nfsearch.gpus import GpuSpec
from nfsearch.profile import CLOCK_COLUMN, LATENCY_COLUMNS, Profile, save_profile
from nfsearch.profiler.grid import CONTEXT_OPS, Point, ProfileGrid, heat_label, profiled_layer_ops, with_heat
from nfsearch.profiler.sustained import (
    measure_sustained,
    measured_factors,
    note_heat,
    pooled,
    profile_reference,
    table_offset,
)

NOTE_PREFIX = "added ops: "


def missing_ops(profile: Profile, model: ModelConfig, tp: int) -> tuple[str, ...]:
    """The layer ops a new profile of `model` at `tp` measures that `profile` has no rows for, in
    layer order."""
    have = set(profile.ops())
    return tuple(op.name for op in profiled_layer_ops(model, tp) if op.name not in have)


def _check(profile: Profile, model: ModelConfig, tp: int, num_sms: int) -> tuple[str, ...]:
    m = profile.meta
    if m.source != "measured" or m.model != model.name or m.tp != tp or m.num_sms != num_sms:
        raise NfsearchError(f"--add-ops: the profile is {m.source} {m.model} tp {m.tp} on {m.num_sms} SMs; "
                            f"this run is {model.name} tp {tp} on {num_sms} SMs")
    missing = missing_ops(profile, model, tp)
    if not missing:
        ops = ", ".join(op.name for op in profiled_layer_ops(model, tp))
        raise NfsearchError(f"--add-ops: the profile already has every layer op of {model.name} tp {tp} "
                            f"({ops}); nothing to add")
    ctx = [op for op in missing if op in CONTEXT_OPS]
    if ctx:
        raise NfsearchError(f"--add-ops: the profile lacks {', '.join(ctx)}, which have a context axis; "
                            "re-profile it (nfsearch profile without --add-ops)")
    if "o_proj" not in profile.ops():
        raise NfsearchError("--add-ops: the profile has no o_proj rows, whose token grid the new ops take")
    return missing


def profile_heat(profile: Profile, model: ModelConfig, tp: int, grid: ProfileGrid, gpu: GpuSpec | None,
                 heat: str | None, default: str) -> ProfileGrid:
    """`grid` with the heater the profile's sustained table was held against (its notes name it,
    `note_heat`), so that new ops are held as the rest were: `heat` if given (it must be that one),
    else whichever of gemm and `default` it is. Without a sustained table: `grid` as it is."""
    if not profile.has_sustained:
        return grid
    want = note_heat(profile.meta.notes)
    tried = []
    for h in ([heat] if heat else ["gemm", default]):
        try:
            g = with_heat(grid, model, tp, h, gpu)
        except NfsearchError as e:
            tried.append(f"{h} ({e})")
            continue
        if heat_label(g) == want:
            return g
        tried.append(f"{h}: {heat_label(g)}")
    raise NfsearchError(f"--add-ops: the profile's sustained table was held against {want}; "
                        f"no heater here matches ({'; '.join(tried)}): pass --heat with its workload")


def add_ops_grid(profile: Profile, model: ModelConfig, tp: int, base: ProfileGrid) -> ProfileGrid:
    """The grid that --add-ops walks (and its timer is built for): `base` (repeats, durations) with
    the profile's SM sizes, o_proj's token counts in the profile (tokens above 0) as the token grid
    (no separate GEMM grid), and the profile's sustained grid (the token counts and SM sizes of its
    sustained table; none without one). Raises as `add_ops` does for a profile it cannot extend."""
    _check(profile, model, tp, profile.meta.num_sms)
    sus = profile.sustained
    tokens = tuple(t for t in profile.token_grid("o_proj") if t > 0)
    return replace(base, sms=profile.sm_grid(), tokens=tokens, gemm_tokens=(),
                   placed_sms=min(base.placed_sms, profile.meta.num_sms),
                   sustained_sms=tuple(sorted({int(s) for s in sus["num_sms"]})),
                   sustained_tokens=tuple(sorted({int(t) for t in sus["tokens"]})))


def add_ops(profile: Profile, model: ModelConfig, tp: int, grid: ProfileGrid, timer: Any,
            out: str | os.PathLike[str], leader: bool = True,
            progress: Callable[[int, int], Any] | None = None) -> Profile:
    """Measure the layer ops `profile` lacks on `grid` (`add_ops_grid`) and save the merged profile
    at `out` (only the leader writes; under TP every rank calls this in lockstep)."""
    stamp = timer.stamp()
    missing = _check(profile, model, tp, int(stamp["num_sms"]))
    if stamp["gpu_name"] != profile.meta.gpu_name:
        raise NfsearchError(f"--add-ops: the profile was measured on {profile.meta.gpu_name}, this GPU is "
                            f"{stamp['gpu_name']}")
    want = add_ops_grid(profile, model, tp, grid)
    if (grid.sms, grid.tokens, grid.sustained_sms, grid.sustained_tokens) != (
            want.sms, want.tokens, want.sustained_sms, want.sustained_tokens):
        raise NfsearchError("--add-ops: the grid is not the profile's own (build it with add_ops_grid)")
    points: list[Point] = [(op, t, 0) for op in missing for t in grid.tokens]
    kinds = {op.name: op.kind for op in profiled_layer_ops(model, tp)}
    held = [op for op in missing if kinds[op] != "network"] if profile.has_sustained else []
    own_heat = note_heat(profile.meta.notes)
    if held and heat_label(grid) != own_heat:
        raise NfsearchError(f"--add-ops: the profile's sustained table was held against {own_heat}, "
                            f"this grid's heater is {heat_label(grid)} (build the grid with profile_heat)")
    held_points: list[Point] = [(op, t, 0) for op in held for t in grid.sustained_tokens]
    total = len(points) * len(grid.sms) + len(held_points) * len(grid.sustained_sms)
    bar = progress(total, 0) if progress and leader else None
    tick = bar.update if bar is not None else (lambda n: None)
    try:
        solo: dict[int, list[Any]] = {}
        for s in sorted(grid.sms, reverse=True):  # all SMs first, as the profiling loop
            got = timer.solo(s, points, tick)
            if len(got) != len(points):
                raise NfsearchError(f"timer returned {len(got)} latencies for {len(points)} points")
            solo[s] = list(got)
        sus_rows = (measure_sustained(model, tp, grid, timer, tick, points=held_points)
                    if held_points else {})
    finally:
        if bar is not None:
            bar.close()
    latency = pd.concat([profile.latency, _latency_rows(profile, points, solo)], ignore_index=True)
    sustained, sus_note = profile.sustained, ""
    if sus_rows:
        offset = table_offset(profile.sustained)
        solo_only = Profile(profile.meta, latency, profile.interference)  # the new ops' own points
        added = pooled(measured_factors(sus_rows, profile_reference(solo_only)), offset)[0]
        sustained = pd.concat([profile.sustained, added], ignore_index=True)
        toks, sms = "/".join(map(str, grid.sustained_tokens)), "/".join(map(str, grid.sustained_sms))
        sus_note = (f"; sustained factors of {', '.join(held)} at {toks} tokens on {sms} SMs, held between "
                    f"replays of the table's heater, stored as "
                    f"the table's: per op and tokens the median over the partitions, on all SMs times "
                    f"the table's all-SM offset {offset:.3f} (read back from its rows)")
    date = stamp.get("date") or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    note = (f"{NOTE_PREFIX}{', '.join(missing)} measured by nfsearch profile --add-ops on {date} "
            f"(torch {stamp.get('torch', '')}, triton {stamp.get('triton', '')}, driver "
            f"{stamp.get('driver', '')}): solo on every SM size at o_proj's token counts, context 0"
            f"{sus_note}; every other row as measured before")
    meta = replace(profile.meta, notes=" | ".join(p for p in (profile.meta.notes, note) if p))
    new = Profile(meta, latency, profile.interference, sustained)
    if leader:
        save_profile(new, out)
    return new


def _latency_rows(profile: Profile, points: list[Point], solo: dict[int, list[Any]]) -> pd.DataFrame:
    """Latency rows of the new points, with the SM clock column exactly when the profile has it."""
    rows = []
    for s, got in solo.items():
        for (op, t, c), x in zip(points, got, strict=True):
            vals = [float(v) for v in x] if isinstance(x, tuple | list) else [float(x)]
            if profile.has_clocks and len(vals) < 2:
                raise NfsearchError("--add-ops: the profile has SM clocks but the timer measured none")
            rows.append([op, int(t), int(c), int(s), vals[0]] + (vals[1:2] if profile.has_clocks else []))
    columns = list(LATENCY_COLUMNS) + ([CLOCK_COLUMN] if profile.has_clocks else [])
    return pd.DataFrame(rows, columns=columns)
