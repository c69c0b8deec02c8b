"""The sustained-clock table: validation, lookup, file round trip, the profiler phase and --add-sustained."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from nfsearch.errors import NfsearchError
from nfsearch.models import resolve_model
from nfsearch.opgraph import layer_ops
from nfsearch.profile import Profile, ProfileError, load_profile, save_profile
from nfsearch.profile_sustained import SUSTAINED_COLUMNS, SustainedFactors, check_sustained
from nfsearch.profiler.grid import ProfileGrid, full_grid, quick_grid, sustained_points
from nfsearch.profiler.run import run_profile
from nfsearch.profiler.sustained import NOTE_PREFIX, across_sms, add_sustained, sustained_table
from tests.test_profiler import FakeTimer


def _table(rng: random.Random, ops=("gate_up", "qkv_proj"), tokens=(256, 1024, 2048),
           sms=(64, 96, 132)) -> pd.DataFrame:
    rows = [[op, t, s, rng.uniform(0.9, 1.3)] for op in ops for t in tokens for s in sms]
    return pd.DataFrame(rows, columns=list(SUSTAINED_COLUMNS))


def _stored(timer: FakeTimer, grid: ProfileGrid):
    """The stored factor on `s` SMs for the fake timer's factor (a function of SMs only)."""
    parts = float(np.median([timer.sustained_factor(s) for s in grid.sustained_sms[:-1]]))
    return lambda s: timer.sustained_factor(s) if s == grid.sustained_sms[-1] else parts


def _profile(tmp_path, seed: int = 0, grid: ProfileGrid | None = None) -> Profile:
    return run_profile(resolve_model("tiny-llama"), 1, grid or quick_grid(), FakeTimer(seed),
                       tmp_path / f"p{seed}.json", gpu_slug="h200", sm_granularity=8, nvlink_gbps=0.0)


def test_factor_is_bilinear_inside_and_constant_beyond_the_ends() -> None:
    rng = random.Random(11)
    t = check_sustained(_table(rng), 132, ("gate_up", "qkv_proj"))
    f = SustainedFactors(t)
    grid = {(r.tokens, r.num_sms): r.factor for r in t[t.op == "gate_up"].itertuples()}
    for _ in range(50):  # a random point inside: the bilinear blend of its four corners
        x, s = rng.uniform(256, 2048), rng.uniform(64, 132)
        t0, t1 = (256, 1024) if x <= 1024 else (1024, 2048)
        s0, s1 = (64, 96) if s <= 96 else (96, 132)
        wt, ws = (x - t0) / (t1 - t0), (s - s0) / (s1 - s0)
        want = ((1 - wt) * ((1 - ws) * grid[t0, s0] + ws * grid[t0, s1])
                + wt * ((1 - ws) * grid[t1, s0] + ws * grid[t1, s1]))
        assert f.factor("gate_up", x, s) == pytest.approx(want, rel=1e-12)
    assert f.factor("gate_up", 64, 8) == pytest.approx(grid[256, 64])  # below both ends
    assert f.factor("gate_up", 4096, 132) == pytest.approx(grid[2048, 132])  # above the tokens' end
    assert f.factor("attn_decode", 512, 132) == 1.0  # an op without rows


def test_bad_tables_name_the_problem() -> None:
    rng = random.Random(2)
    ops = ("gate_up", "qkv_proj")
    t = _table(rng)
    with pytest.raises(ProfileError, match="op 'nope' is not in the latency table"):
        check_sustained(t.assign(op=["nope"] + list(t.op[1:])), 132, ops)
    bad = t.copy()
    bad.loc[3, "factor"] = 7.0
    with pytest.raises(ProfileError, match="row 3: factor must be within"):
        check_sustained(bad, 132, ops)
    with pytest.raises(ProfileError, match="num_sms 140 is outside"):
        check_sustained(t.assign(num_sms=[140] * len(t)), 132, ops)
    with pytest.raises(ProfileError, match="not the full grid"):
        check_sustained(t.drop(index=4), 132, ops)
    with pytest.raises(ProfileError, match="duplicate point"):
        check_sustained(pd.concat([t, t.iloc[:1]]), 132, ops)


def test_the_profiling_loop_measures_the_table_and_latencies_use_it(tmp_path) -> None:
    timer = FakeTimer(5)
    grid = quick_grid()
    prof = run_profile(resolve_model("tiny-llama"), 1, grid, timer, tmp_path / "p.json", gpu_slug="h200",
                       sm_granularity=8, nvlink_gbps=0.0)
    assert prof.has_sustained
    assert sorted(timer.sustained_calls) == sorted(grid.sustained_sms)
    pts = sustained_points(resolve_model("tiny-llama"), 1, grid)
    assert {op for op, _, _ in pts} == {op.name for op in layer_ops(resolve_model("tiny-llama"), 1)}
    # under TP every layer op but the collectives, the all-gather form's o_proj_col included
    tp2 = {op for op, _, _ in sustained_points(resolve_model("tiny-llama"), 2, grid)}
    assert tp2 == {op.name for op in layer_ops(resolve_model("tiny-llama"), 2, gather=True)} - {
        "attn_allreduce", "mlp_allreduce", "attn_allgather", "o_allgather"}
    assert len(prof.sustained) == len(pts) * len(grid.sustained_sms)
    # stored: on the partitions the median of their measured factors; on all SMs that times the
    # profile's all-SM offset, which for this timer's SM-only factor gives back its all-SM value
    want = _stored(timer, grid)
    assert all(r.factor == pytest.approx(want(r.num_sms), abs=1e-4) for r in prof.sustained.itertuples())
    # a lookup is the burst point times the factor; sustained=False is the burst point
    for op, t, c in pts:
        for s in grid.sustained_sms:
            burst = prof.latency_us(op, t, c, s, sustained=False)
            assert burst == pytest.approx(timer.latency(op, t, c, s), abs=1e-4)
            assert prof.latency_us(op, t, c, s) == pytest.approx(burst * want(s), rel=1e-4)
    assert "lm_head" not in set(prof.sustained["op"])  # a tail op: charged its burst point
    assert prof.latency_us("lm_head", 64, 0, 132) == prof.latency_us("lm_head", 64, 0, 132, sustained=False)
    assert NOTE_PREFIX in prof.meta.notes
    assert load_profile(tmp_path / "p.json") == prof


def test_round_trip_and_a_profile_without_the_table_keeps_its_bytes(tmp_path) -> None:
    prof = _profile(tmp_path)
    bare = Profile(prof.meta, prof.latency, prof.interference)
    assert not bare.has_sustained and "sustained" not in bare.to_dict()["tables"]
    assert bare.hash != prof.hash
    save_profile(bare, tmp_path / "bare.json")
    assert "sustained" not in json.loads((tmp_path / "bare.json").read_text())["tables"]
    assert load_profile(tmp_path / "bare.json") == bare
    d = prof.to_dict()
    assert Profile.from_dict(d) == prof
    d["tables"]["sustained"]["data"][0][3] = -1.0
    with pytest.raises(ProfileError, match="tables.sustained row 0: factor"):
        Profile.from_dict(d)


def test_resume_keeps_the_sustained_sizes_already_measured(tmp_path) -> None:
    grid = replace(quick_grid(), sustained_sms=(64, 96, 132))
    model = resolve_model("tiny-llama")
    out = tmp_path / "p.json"
    crash = FakeTimer(1, crash_after=len(grid.sms) + 1)  # every solo size, then one sustained size
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_profile(model, 1, grid, crash, out, gpu_slug="h200", sm_granularity=8, nvlink_gbps=0.0)
    assert crash.sustained_calls == [132]
    again = FakeTimer(1)
    prof = run_profile(model, 1, grid, again, out, gpu_slug="h200", sm_granularity=8, nvlink_gbps=0.0,
                       resume=True)
    assert again.solo_calls == [] and sorted(again.sustained_calls) == [64, 96]
    fresh = _profile(tmp_path, seed=1, grid=grid)
    assert prof.sustained.equals(fresh.sustained)


def test_add_sustained_replaces_the_table_and_keeps_every_burst_point(tmp_path) -> None:
    model = resolve_model("tiny-llama")
    base = _profile(tmp_path, seed=3)
    bare = Profile(replace(base.meta, notes=base.meta.notes.split(" | ")[0]), base.latency, base.interference)
    timer = FakeTimer(3)  # the base's GPU (its latencies), another sustained factor
    timer.sus += 0.05
    out = tmp_path / "added.json"
    grid = quick_grid()
    new = add_sustained(bare, model, 1, grid, timer, out, 132)
    assert new.latency.equals(bare.latency) and new.interference.equals(bare.interference)
    assert new.has_sustained and load_profile(out) == new
    want = _stored(timer, grid)
    assert all(r.factor == pytest.approx(want(r.num_sms), abs=1e-4) for r in new.sustained.itertuples())
    twice = add_sustained(new, model, 1, grid, timer, out, 132)
    assert twice.meta.notes.count(NOTE_PREFIX) == 1 and twice == new
    with pytest.raises(NfsearchError, match="--add-sustained: the profile is measured tiny-llama tp 1"):
        add_sustained(bare, resolve_model("llama3-8b"), 1, grid, timer, out, 132)


def test_sustained_table_from_rows_and_its_note() -> None:
    rows = {"132": [["gate_up", 1024, 0, 300.0, 350.0]], "64": [["gate_up", 1024, 0, 500.0, 495.0]],
            "96": [["gate_up", 1024, 0, 400.0, 440.0]]}
    table, note = sustained_table(rows)
    got = {(r.num_sms): r.factor for r in table.itertuples()}
    # partitions: the median of 0.99 and 1.1; all SMs: that times the offset 1.1667 / 1.045
    assert got == {64: pytest.approx(1.045), 96: pytest.approx(1.045), 132: pytest.approx(350 / 300)}
    assert note.startswith(NOTE_PREFIX)
    assert "measured factor = sustained latency / the burst latency beside it 0.990..1.167" in note
    assert sustained_table({})[1] == ""
    with pytest.raises(NfsearchError, match="not positive"):
        sustained_table({"64": [["gate_up", 1024, 0, 0.0, 1.0]]})


def test_the_stored_factor_is_the_partition_median_and_one_all_sm_offset() -> None:
    rng = random.Random(7)
    raw = _table(rng, ops=("gate_up", "qkv_proj", "down"), sms=(32, 64, 96, 112, 120, 132))
    out = across_sms(raw)
    assert list(out.columns) == list(SUSTAINED_COLUMNS) and len(out) == len(raw)
    assert (out[["op", "tokens", "num_sms"]].to_numpy() == raw[["op", "tokens", "num_sms"]].to_numpy()).all()
    med, top = {}, {}
    for (op, t), g in raw.groupby(["op", "tokens"]):
        med[op, t] = sorted(g[g.num_sms < 132]["factor"])[2]  # five partitions: the middle one
        top[op, t] = float(g[g.num_sms == 132]["factor"].iloc[0])
    offset = sorted(top[k] / med[k] for k in med)[len(med) // 2]  # nine (op, tokens): the middle one
    for r in out.itertuples():
        want = med[r.op, r.tokens] * (offset if r.num_sms == 132 else 1.0)
        assert r.factor == pytest.approx(want, rel=1e-12)
    only_all = raw[raw.num_sms == 132]  # nothing to pool: kept as measured
    assert across_sms(only_all)["factor"].to_numpy() == pytest.approx(only_all["factor"].to_numpy())


def test_grid_checks_the_sustained_fields(tmp_path) -> None:
    g = full_grid()
    assert set(g.sustained_sms) <= set(g.sms) and g.sustained_sms[-1] == 132
    assert g.sustained_tokens and g.sustained_tokens[-1] <= g.tokens[-1]
    with pytest.raises(NfsearchError, match="sustained_sms must be"):
        replace(g, sustained_sms=(60, 132))
    with pytest.raises(NfsearchError, match="sustained_tokens must be"):
        replace(g, sustained_tokens=())
    with pytest.raises(NfsearchError, match="sustained_s must be positive"):
        replace(g, sustained_s=0.0)
    # no table asked for: no point walked, a profile without one
    off = replace(quick_grid(), sustained_sms=(), sustained_tokens=())
    timer = FakeTimer(0)
    prof = run_profile(resolve_model("tiny-llama"), 1, off, timer, tmp_path / "p.json", gpu_slug="h200",
                       sm_granularity=8, nvlink_gbps=0.0)
    assert timer.sustained_calls == [] and not prof.has_sustained and NOTE_PREFIX not in prof.meta.notes
