"""The sustained-clock table of a profile: how much slower an op runs once the GPU sits at its power limit.

A profile point is timed in a burst (a ~0.5 ms graph replayed a few times), at boost clock. A
replayed schedule keeps the GPU busy for the whole iteration, and after 50-100 ms at the power
limit an H200 pulls its SM clock down: GEMMs on 96 or more SMs then run 15-17% slower than their
burst points, GEMMs on 64 SMs and attention not at all (benchmarks/RESULTS.md, session 8, 21:0x).
The sustained table holds, per op, `factor` = sustained latency / burst latency measured on a
sparse (tokens x SMs) grid, both timed in the same phase on the same partition
(`nfsearch.profiler.sustained`). `Profile.latency_us` multiplies its burst latency by the factor,
interpolated linearly in tokens and SMs and held constant beyond the table's ends (a ratio, measured
sparsely on purpose: the grid's ends are where it flattens). An op without rows has factor 1.

The interference slowdowns are co-run / solo time with both sustained (`nfsearch.profiler.corun`),
so burst x factor x slowdown is the sustained co-run time: the factors and the slowdowns compose.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import pandas as pd

from nfsearch.profile_validate import (
    ProfileError,
    _check_columns,
    _check_duplicates,
    _check_rows,
    _check_values,
)

SUSTAINED_COLUMNS = ("op", "tokens", "num_sms", "factor")
FACTOR_DECIMALS = 4
# A sustained / burst ratio outside this range is a broken measurement, not a clock effect.
FACTOR_RANGE = (0.5, 3.0)


def check_sustained(df: Any, num_sms: int, ops: tuple[str, ...]) -> pd.DataFrame:
    """Validate and normalize the table (sorted, rounded); every op's rows form a full tokens x SMs grid."""
    name = "sustained"
    if not isinstance(df, pd.DataFrame):
        raise ProfileError(f"tables.{name} must be a DataFrame, got {type(df).__name__}")
    _check_columns(name, list(df.columns), SUSTAINED_COLUMNS)
    df = df.reset_index(drop=True)
    op = _check_values(df, name, "op", "str")
    tok = np.asarray(_check_values(df, name, "tokens", "int"), dtype=np.int64)
    sms = np.asarray(_check_values(df, name, "num_sms", "int"), dtype=np.int64)
    fac = np.asarray(_check_values(df, name, "factor", "num"), dtype=np.float64)
    lo, hi = FACTOR_RANGE
    known = set(ops)
    _check_rows(name, (
        (np.array([o not in known for o in op], dtype=bool),
         lambda i: f"op {op[i]!r} is not in the latency table; ops: {', '.join(ops)}"),
        (tok < 1, lambda i: f"tokens must be positive, got {tok[i]}"),
        ((sms < 1) | (sms > num_sms), lambda i: f"num_sms {sms[i]} is outside 1..{num_sms} (meta.num_sms)"),
        (~np.isfinite(fac) | (fac < lo) | (fac > hi),
         lambda i: f"factor must be within {lo}..{hi} (sustained / burst latency), got {fac[i]}"),
    ))
    out = pd.DataFrame({"op": pd.Series(op, dtype=object), "tokens": tok, "num_sms": sms,
                        "factor": np.round(fac, FACTOR_DECIMALS)})
    key = ["op", "tokens", "num_sms"]
    _check_duplicates(out, name, key, "point")
    out = out.sort_values(key, kind="stable").reset_index(drop=True)
    for o, g in out.groupby("op", sort=True):
        t, s = g["tokens"].nunique(), g["num_sms"].nunique()
        if len(g) != t * s:
            raise ProfileError(f"tables.{name}: op {o!r} has {len(g)} rows, not the full grid of its "
                               f"{t} token counts x {s} SM counts")
    return out


def empty_sustained() -> pd.DataFrame:
    return pd.DataFrame({"op": pd.Series([], dtype=object), "tokens": pd.Series([], dtype=np.int64),
                         "num_sms": pd.Series([], dtype=np.int64), "factor": pd.Series([], dtype=np.float64)})


class SustainedFactors:
    """Bilinear lookup of a checked sustained table, constant beyond its ends."""

    def __init__(self, table: pd.DataFrame) -> None:
        self._by_op: dict[str, tuple[list[int], list[int], np.ndarray]] = {}
        for op, g in table.groupby("op", sort=True):
            tokens = sorted({int(t) for t in g["tokens"]})
            sms = sorted({int(s) for s in g["num_sms"]})
            # rows are sorted by (op, tokens, num_sms)
            grid = g["factor"].to_numpy(dtype=np.float64).reshape(len(tokens), len(sms))
            self._by_op[str(op)] = (tokens, sms, grid)

    def __bool__(self) -> bool:
        return bool(self._by_op)

    def factor(self, op: str, tokens: float, num_sms: float) -> float:
        entry = self._by_op.get(op)
        if entry is None:
            return 1.0
        tokens_grid, sms_grid, grid = entry
        t0, t1, wt = _clamped(tokens_grid, tokens)
        s0, s1, ws = _clamped(sms_grid, num_sms)
        return float((1 - wt) * ((1 - ws) * grid[t0, s0] + ws * grid[t0, s1])
                     + wt * ((1 - ws) * grid[t1, s0] + ws * grid[t1, s1]))


def _clamped(grid: list[int], x: float) -> tuple[int, int, float]:
    """Indexes (lo, hi) around x and the weight of hi, x clamped to the grid's ends."""
    if x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        n = len(grid) - 1
        return n, n, 0.0
    hi = bisect.bisect_left(grid, x)
    if grid[hi] == x:
        return hi, hi, 0.0
    return hi - 1, hi, (x - grid[hi - 1]) / (grid[hi] - grid[hi - 1])
