"""The optional per-point SM clock of a profile (`sm_clock_mhz`): validation, the file round trip,
and latency at another clock (interpolated cycles); the profiling loop keeps the clocks a timer
reports."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from nfsearch.profile import (
    CLOCK_COLUMN,
    Profile,
    ProfileError,
    ProfileRangeError,
    load_profile,
    save_profile,
)
from tests.test_profile import SMS, _make, _meta, rng  # noqa: F401  (rng: the seeded fixture)


def _with_clocks(p: Profile, rng: np.random.Generator) -> Profile:  # noqa: F811
    lat = p.latency.copy()
    lat[CLOCK_COLUMN] = np.round(rng.uniform(1400.0, 1980.0, len(lat)), 1)
    return Profile(p.meta, lat, p.interference)


def test_clock_column_round_trips_and_converts(tmp_path, rng) -> None:  # noqa: F811
    p = _with_clocks(_make(rng), rng)
    assert p.has_clocks and not _make(rng).has_clocks
    path = save_profile(p, tmp_path / "p.json")
    q = load_profile(path)
    assert q == p and q.has_clocks and q.hash == p.hash
    assert json.loads(path.read_text())["tables"]["latency"]["columns"][-1] == CLOCK_COLUMN
    lat = p.latency.set_index(["op", "tokens", "context", "num_sms"])
    # at a grid point: latency x its clock / the asked clock
    for (op, t, c, s) in [("qkv_proj", 128, 0, 64), ("attn_decode", 64, 512, 132)]:
        us, mhz = lat.loc[(op, t, c, s), "latency_us"], lat.loc[(op, t, c, s), CLOCK_COLUMN]
        assert p.latency_us(op, t, c, s) == pytest.approx(us)
        assert p.latency_us(op, t, c, s, clock_mhz=1500.0) == pytest.approx(us * mhz / 1500.0)
    # between grid points: cycles interpolate linearly, so the latency is their mean / the clock
    a, b = (lat.loc[("qkv_proj", t, 0, 132)] for t in (64, 128))
    want = (a["latency_us"] * a[CLOCK_COLUMN] + b["latency_us"] * b[CLOCK_COLUMN]) / 2 / 1700.0
    assert p.latency_us("qkv_proj", 96, 0, 132, clock_mhz=1700.0) == pytest.approx(want)
    assert p.latency_us("qkv_proj", 0, 0, 132, clock_mhz=1700.0) == 0.0
    with pytest.raises(ProfileRangeError, match="clock_mhz must be positive"):
        p.latency_us("qkv_proj", 64, 0, 132, clock_mhz=0.0)


def test_a_profile_without_clocks_ignores_the_clock(rng) -> None:  # noqa: F811
    p = _make(rng)
    assert p.latency_us("qkv_proj", 96, 0, 64, clock_mhz=1234.0) == p.latency_us("qkv_proj", 96, 0, 64)


@pytest.mark.parametrize("bad", [0.0, -5.0, float("nan"), "fast"])
def test_a_bad_clock_names_the_row(rng, bad) -> None:  # noqa: F811
    p = _with_clocks(_make(rng), rng)
    lat = p.latency.astype({CLOCK_COLUMN: object})
    lat.loc[3, CLOCK_COLUMN] = bad
    with pytest.raises(ProfileError, match=f"row 3: ({CLOCK_COLUMN} must be a positive number|"
                                           f"{CLOCK_COLUMN} must be a number)"):
        Profile(p.meta, lat, p.interference)


def test_an_unknown_latency_column_is_still_an_error(rng) -> None:  # noqa: F811
    p = _make(rng)
    lat = p.latency.copy()
    lat["sm_clock_ghz"] = 1.9
    with pytest.raises(ProfileError, match="extra column"):
        Profile(p.meta, lat, p.interference)


def test_profiling_loop_keeps_the_timers_clocks(tmp_path) -> None:
    from nfsearch.models import resolve_model
    from nfsearch.profiler.grid import quick_grid
    from nfsearch.profiler.run import run_profile
    from tests.test_profiler import FakeTimer

    class ClockedTimer(FakeTimer):
        def solo(self, num_sms, points, tick):
            return [(us, 1500.0 + num_sms) for us in super().solo(num_sms, points, tick)]

    model = resolve_model("tiny-llama")
    prof = run_profile(model, 1, quick_grid(), ClockedTimer(3), tmp_path / "p.json", gpu_slug="h200",
                       sm_granularity=8, nvlink_gbps=0.0)
    assert prof.has_clocks
    assert (prof.latency[CLOCK_COLUMN] == 1500.0 + prof.latency["num_sms"]).all()
    assert load_profile(tmp_path / "p.json") == prof
    # a plain timer (latencies only) still gives a profile without the column
    plain = run_profile(model, 1, quick_grid(), FakeTimer(3), tmp_path / "q.json", gpu_slug="h200",
                        sm_granularity=8, nvlink_gbps=0.0)
    assert not plain.has_clocks
    assert np.allclose(plain.latency["latency_us"], prof.latency["latency_us"])


def test_meta_is_unchanged_by_clocks(rng) -> None:  # noqa: F811
    meta = _meta()
    assert CLOCK_COLUMN not in meta.to_dict()
    rows = [("qkv_proj", t, 0, s, 1.0 * t, 1900.0) for t, s in itertools.product((0, 64), SMS)]
    lat = pd.DataFrame(rows, columns=["op", "tokens", "context", "num_sms", "latency_us", CLOCK_COLUMN])
    inter = pd.DataFrame([("compute", "memory", s, 1.1) for s in SMS],
                         columns=["kind", "other_kind", "num_sms", "slowdown"])
    p = Profile(meta, lat, inter)
    assert p.latency_us("qkv_proj", 32, 0, 64, clock_mhz=950.0) == pytest.approx(64.0)
