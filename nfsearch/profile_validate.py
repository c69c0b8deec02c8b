"""Profile validation: the table schema and the checks that normalize a profile's two tables.

`Profile` (nfsearch.profile) runs these once on construction; `nfsearch.profile` re-exports the
public names defined here (`ProfileError`, the column tuples, `KINDS`, the rounding decimals), so
`from nfsearch.profile import ...` keeps working. This module does not import nfsearch.profile at
run time, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from nfsearch.errors import NfsearchError

if TYPE_CHECKING:
    from nfsearch.profile import ProfileMeta

LATENCY_COLUMNS = ("op", "tokens", "context", "num_sms", "latency_us")
# Optional last latency column: the SM clock measured right after the point's timed replays (all
# rows or none). With it, a latency converts to any clock (docs/profile-format.md, "Clocks").
CLOCK_COLUMN = "sm_clock_mhz"
CLOCK_DECIMALS = 1
INTERFERENCE_COLUMNS = ("kind", "other_kind", "num_sms", "slowdown")
KINDS = ("compute", "memory", "network", "other")
# Fixed rounding makes saved bytes (and so the hash) deterministic: 1e-4 us = 0.1 ns.
LATENCY_DECIMALS = 4
SLOWDOWN_DECIMALS = 6


class ProfileError(NfsearchError):
    """A profile file or table is malformed; the message names the row / column / field."""


# -- validation helpers ------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def _frame(tables: dict[str, Any], name: str, cols: tuple[str, ...],
           optional: tuple[str, ...] = ()) -> pd.DataFrame:
    t = tables.get(name)
    if not (isinstance(t, dict) and isinstance(t.get("columns"), list) and isinstance(t.get("data"), list)):
        raise ProfileError(f"tables.{name} must be a mapping with lists 'columns' and 'data' "
                           f"(pandas orient='split')")
    extra = sorted(set(t) - {"columns", "data", "index"})
    if extra:
        raise ProfileError(f"tables.{name}: unknown key(s) {', '.join(extra)}")
    columns = t["columns"]
    for i, row in enumerate(t["data"]):
        if not isinstance(row, list) or len(row) != len(columns):
            raise ProfileError(f"tables.{name} row {i}: expected a list of {len(columns)} values "
                               f"({', '.join(map(str, columns))}), got {row!r}")
    _check_columns(name, list(columns), cols, optional)
    # object dtype keeps the JSON values as they are, so the checks see wrong types, not coercions
    return pd.DataFrame(t["data"], columns=columns, dtype=object)


def _check_columns(name: str, got: list[Any], want: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [c for c in want if c not in got]
    extra = [str(c) for c in got if c not in want and c not in optional]
    dup = sorted({str(c) for c in got if got.count(c) > 1})
    if missing:
        raise ProfileError(f"tables.{name}: missing column(s) {', '.join(missing)}")
    if extra:
        raise ProfileError(f"tables.{name}: extra column(s) {', '.join(extra)}; expected {', '.join(want)}")
    if dup:
        raise ProfileError(f"tables.{name}: duplicate column(s) {', '.join(dup)}")


_VALUE_CHECKS = {
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string", str),
    "int": (_is_int, "an integer", int),
    "num": (_is_num, "a number", float),
}


def _check_values(df: pd.DataFrame, name: str, col: str, kind: Literal["str", "int", "num"]) -> list[Any]:
    ok, what, conv = _VALUE_CHECKS[kind]
    vals = df[col].tolist()
    for i, v in enumerate(vals):
        if not ok(v):
            raise ProfileError(f"tables.{name} row {i}: {col} must be {what}, got {v!r}")
    return [conv(v) for v in vals]


def _check_rows(name: str, checks: tuple[tuple[np.ndarray, Callable[[int], str]], ...]) -> None:
    """Raise for the first row of the first failing check."""
    for bad, msg in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ProfileError(f"tables.{name} row {i}: {msg(i)}")


def _check_duplicates(out: pd.DataFrame, name: str, key: list[str], what: str) -> None:
    dup = out.duplicated(subset=key, keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        r = out.iloc[rows[0]][key]
        other = next(j for j in rows[1:] if (out.iloc[j][key] == r).all())
        point = ", ".join(f"{k}={v!r}" for k, v in r.items())
        raise ProfileError(f"tables.{name} rows {rows[0]} and {other}: duplicate {what} {point}")


def _check_latency(df: Any, meta: ProfileMeta) -> pd.DataFrame:
    name = "latency"
    if not isinstance(df, pd.DataFrame):
        raise ProfileError(f"tables.{name} must be a DataFrame, got {type(df).__name__}")
    _check_columns(name, list(df.columns), LATENCY_COLUMNS, (CLOCK_COLUMN,))
    if len(df) == 0:
        raise ProfileError(f"tables.{name} has no rows")
    df = df.reset_index(drop=True)
    cols = {"op": _check_values(df, name, "op", "str")}
    for c in ("tokens", "context", "num_sms"):
        cols[c] = _check_values(df, name, c, "int")
    cols["latency_us"] = _check_values(df, name, "latency_us", "num")
    tok = np.asarray(cols["tokens"], dtype=np.int64)
    ctx = np.asarray(cols["context"], dtype=np.int64)
    sms = np.asarray(cols["num_sms"], dtype=np.int64)
    lat = np.asarray(cols["latency_us"], dtype=np.float64)
    _check_rows(name, (
        (np.isnan(lat), lambda i: "latency_us is NaN"),
        (~np.isfinite(lat) & ~np.isnan(lat), lambda i: f"latency_us is {lat[i]}"),
        (lat < 0, lambda i: f"latency_us is negative ({lat[i]})"),
        (tok < 0, lambda i: f"tokens is negative ({tok[i]})"),
        (ctx < 0, lambda i: f"context is negative ({ctx[i]})"),
        ((sms < 1) | (sms > meta.num_sms), lambda i: f"num_sms {sms[i]} is outside 1..{meta.num_sms} "
                                                     f"(meta.num_sms)"),
        ((tok == 0) & (lat != 0), lambda i: f"latency_us must be 0 at tokens 0, got {lat[i]}"),
    ))
    out = pd.DataFrame({"op": pd.Series(cols["op"], dtype=object), "tokens": tok, "context": ctx,
                        "num_sms": sms, "latency_us": np.round(lat, LATENCY_DECIMALS)})
    if CLOCK_COLUMN in df.columns:
        mhz = np.asarray(_check_values(df, name, CLOCK_COLUMN, "num"), dtype=np.float64)
        _check_rows(name, ((~np.isfinite(mhz) | (mhz <= 0),
                            lambda i: f"{CLOCK_COLUMN} must be a positive number, got {mhz[i]}"),))
        out[CLOCK_COLUMN] = np.round(mhz, CLOCK_DECIMALS)
    key = ["op", "tokens", "context", "num_sms"]
    _check_duplicates(out, name, key, "grid point")
    return out.sort_values(key, kind="stable").reset_index(drop=True)


def _check_interference(df: Any, meta: ProfileMeta) -> pd.DataFrame:
    name = "interference"
    if not isinstance(df, pd.DataFrame):
        raise ProfileError(f"tables.{name} must be a DataFrame, got {type(df).__name__}")
    _check_columns(name, list(df.columns), INTERFERENCE_COLUMNS)
    df = df.reset_index(drop=True)
    kinds = {}
    for c in ("kind", "other_kind"):
        kinds[c] = _check_values(df, name, c, "str")
        for i, k in enumerate(kinds[c]):
            if k not in KINDS:
                raise ProfileError(f"tables.{name} row {i}: {c} {k!r} unknown; valid: {', '.join(KINDS)}")
    sms = np.asarray(_check_values(df, name, "num_sms", "int"), dtype=np.int64)
    slow = np.asarray(_check_values(df, name, "slowdown", "num"), dtype=np.float64)
    _check_rows(name, (
        (np.isnan(slow), lambda i: "slowdown is NaN"),
        (~np.isfinite(slow) & ~np.isnan(slow), lambda i: f"slowdown is {slow[i]}"),
        (slow < 1, lambda i: f"slowdown {slow[i]} < 1 (co-running cannot speed an op up)"),
        ((sms < 1) | (sms > meta.num_sms), lambda i: f"num_sms {sms[i]} is outside 1..{meta.num_sms} "
                                                     f"(meta.num_sms)"),
    ))
    out = pd.DataFrame({"kind": pd.Series(kinds["kind"], dtype=object),
                        "other_kind": pd.Series(kinds["other_kind"], dtype=object),
                        "num_sms": sms, "slowdown": np.round(slow, SLOWDOWN_DECIMALS)})
    key = ["kind", "other_kind", "num_sms"]
    _check_duplicates(out, name, key, "point")
    return out.sort_values(key, kind="stable").reset_index(drop=True)
