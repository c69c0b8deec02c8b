"""Profile format, validation, interpolation and the analytic roofline profile."""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import time

import numpy as np
import pandas as pd
import pytest

from nfsearch.errors import NfsearchError
from nfsearch.profile import (
    Profile,
    ProfileError,
    ProfileMeta,
    ProfileRangeError,
    default_profile_for,
    load_profile,
    save_profile,
    shipped_profile_path,
)

SMS = (8, 64, 132)
GEMM_TOKENS = (0, 64, 128, 256)
ATTN_TOKENS = (1, 64, 128)
ATTN_CONTEXTS = (128, 512)


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")  # shown by pytest on failure, to reproduce
    return np.random.default_rng(seed)


def _meta(**kw) -> ProfileMeta:
    d = dict(source="measured", model="tiny-llama", tp=1, gpu="h200", gpu_name="NVIDIA H200", num_sms=132,
             sm_granularity=8, peak_tflops=790.0, hbm_gbps=4570.0, nvlink_gbps=450.0, driver="580.1",
             cuda="13.0", torch="2.11", triton="3.5", date="2025-01-02", nfsearch_version="0.1.0",
             notes="synthetic")
    d.update(kw)
    return ProfileMeta(**d)


def _make(rng: np.random.Generator, **meta_kw) -> Profile:
    rows = []
    for t, s in itertools.product(GEMM_TOKENS, SMS):
        rows.append(("qkv_proj", t, 0, s, 0.0 if t == 0 else round(float(rng.uniform(5, 500)), 4)))
    for c, t, s in itertools.product(ATTN_CONTEXTS, ATTN_TOKENS, SMS):
        rows.append(("attn_decode", t, c, s, round(float(rng.uniform(5, 500)), 4)))
    lat = pd.DataFrame(rows, columns=["op", "tokens", "context", "num_sms", "latency_us"])
    inter = pd.DataFrame([("compute", "memory", s, round(float(rng.uniform(1, 1.3)), 6)) for s in SMS],
                         columns=["kind", "other_kind", "num_sms", "slowdown"])
    return Profile(_meta(**meta_kw), lat, inter)


def _lookup(p: Profile, op: str, t: int, c: int, s: int) -> float:
    df = p.latency
    r = df[(df.op == op) & (df.tokens == t) & (df.context == c) & (df.num_sms == s)]
    assert len(r) == 1
    return float(r.latency_us.iloc[0])


# -- round trip, determinism, hash ---------------------------------------------------------------


def test_round_trip_byte_identical_and_hash_stable(rng, tmp_path):
    p = _make(rng)
    a = save_profile(p, tmp_path / "h200" / "tiny-llama-tp1.json")
    q = load_profile(a)
    b = save_profile(q, tmp_path / "again.json")
    assert a.read_bytes() == b.read_bytes()
    assert q == p and q.hash == p.hash and len(p.hash) == 64
    assert [f.name for f in tmp_path.rglob("*.tmp")] == []  # atomic write leaves no temp file
    # rows in any order give the same bytes
    shuffled = Profile(p.meta, p.latency.sample(frac=1.0, random_state=int(rng.integers(1 << 30))),
                       p.interference.iloc[::-1])
    assert shuffled.canonical_bytes() == a.read_bytes()


def test_hash_ignores_volatile_meta_only(rng):
    p = _make(rng)
    assert _make_like(p, date="2030-12-31", nfsearch_version="9.9").hash == p.hash
    assert _make_like(p, driver="999.0").hash != p.hash
    lat = p.latency.copy()
    lat.loc[5, "latency_us"] += 0.01
    assert Profile(p.meta, lat, p.interference).hash != p.hash


def _make_like(p: Profile, **meta_kw) -> Profile:
    d = p.meta.to_dict()
    d.update(meta_kw)
    return Profile(ProfileMeta(**d), p.latency, p.interference)


def test_tables_read_with_pandas(rng, tmp_path):
    p = _make(rng)
    obj = json.loads(save_profile(p, tmp_path / "p.json").read_text())
    df = pd.DataFrame(**obj["tables"]["latency"])
    assert df.shape == p.latency.shape
    assert np.allclose(df.latency_us.to_numpy(), p.latency.latency_us.to_numpy(), rtol=0, atol=0)
    text = io.StringIO(json.dumps(obj["tables"]["interference"]))
    rj = pd.read_json(text, orient="split", precise_float=True)
    assert list(rj.columns) == ["kind", "other_kind", "num_sms", "slowdown"]
    assert rj.slowdown.tolist() == p.interference.slowdown.tolist()


def test_values_are_rounded_on_construction(rng):
    p = _make(rng)
    lat = p.latency.copy()
    lat["latency_us"] = lat["latency_us"] + np.where(lat.tokens > 0, 1.23456789e-3, 0.0)
    q = Profile(p.meta, lat, p.interference)
    got = q.latency.latency_us.to_numpy()
    assert np.array_equal(got, np.round(got, 4))


# -- interpolation -------------------------------------------------------------------------------


def test_exact_on_grid_points(rng):
    p = _make(rng)
    for op, t, c, s, x in p.latency.itertuples(index=False, name=None):
        assert p.latency_us(op, t, c, s) == x
    assert p.token_grid("qkv_proj") == GEMM_TOKENS
    assert p.token_grid("attn_decode") == ATTN_TOKENS
    assert p.context_grid("attn_decode") == ATTN_CONTEXTS and p.context_grid("qkv_proj") == (0,)
    assert p.sm_grid() == SMS and p.ops() == ("attn_decode", "qkv_proj")


def test_linear_between_grid_points(rng):
    p = _make(rng)
    for _ in range(20):
        # qkv_proj: bilinear in tokens and SMs; its context is ignored
        t0, t1 = sorted(rng.choice(GEMM_TOKENS[1:], 2, replace=False))
        s0, s1 = sorted(rng.choice(SMS, 2, replace=False))
        t, s = int(rng.integers(t0, t1 + 1)), int(rng.integers(s0, s1 + 1))
        # re-bracket to adjacent grid points
        t0 = max(g for g in GEMM_TOKENS if g <= t)
        t1 = min(g for g in GEMM_TOKENS if g >= t)
        s0 = max(g for g in SMS if g <= s)
        s1 = min(g for g in SMS if g >= s)
        wt = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
        ws = 0.0 if s1 == s0 else (s - s0) / (s1 - s0)
        v = lambda tt, ss: _lookup(p, "qkv_proj", tt, 0, ss)
        want = ((1 - wt) * (1 - ws) * v(t0, s0) + wt * (1 - ws) * v(t1, s0)
                + (1 - wt) * ws * v(t0, s1) + wt * ws * v(t1, s1))
        assert p.latency_us("qkv_proj", t, int(rng.integers(0, 10**6)), s) == pytest.approx(want, rel=1e-12)
    # attn_decode: trilinear, a fixed hand-computed point between every grid axis
    t, c, s = 96, 320, 98  # halfway in tokens (64..128), contexts (128..512), SMs (64..132)
    want = sum(_lookup(p, "attn_decode", tt, cc, ss) for tt in (64, 128) for cc in (128, 512)
               for ss in (64, 132)) / 8
    assert p.latency_us("attn_decode", t, c, s) == pytest.approx(want, rel=1e-12)
    # only tokens between grid points: a 1-D blend at the grid's context and SMs
    w = (40 - 1) / (64 - 1)
    want = (1 - w) * _lookup(p, "attn_decode", 1, 512, 8) + w * _lookup(p, "attn_decode", 64, 512, 8)
    assert p.latency_us("attn_decode", 40, 512, 8) == pytest.approx(want, rel=1e-12)


def test_zero_tokens_and_range_errors(rng):
    p = _make(rng)
    assert p.latency_us("attn_decode", 0, 128, 64) == 0.0  # 0 is not on attn's token grid
    assert p.latency_us("qkv_proj", 0, 0, 132) == 0.0
    cases = [("qkv_proj", 257, 0, 64, "tokens 257"), ("qkv_proj", -1, 0, 64, "tokens -1"),
             ("qkv_proj", 64, 0, 4, "num_sms 4"), ("qkv_proj", 64, 0, 133, "num_sms 133"),
             ("attn_decode", 64, 100, 64, "context 100"), ("attn_decode", 64, 513, 64, "context 513"),
             ("attn_decode", 129, 256, 64, "tokens 129")]
    for op, t, c, s, what in cases:
        with pytest.raises(ProfileRangeError, match=rf"op '{op}' {what} is outside"):
            p.latency_us(op, t, c, s)
    with pytest.raises(ProfileRangeError, match="no op 'down'.*attn_decode, qkv_proj"):
        p.latency_us("down", 64, 0, 64)
    assert issubclass(ProfileRangeError, NfsearchError)


def test_slowdown(rng):
    p = _make(rng)
    v = {s: float(x) for s, x in zip(p.interference.num_sms, p.interference.slowdown, strict=True)}
    assert p.slowdown("compute", "memory", 64) == v[64]
    s = int(rng.integers(9, 64))
    w = (s - 8) / 56
    assert p.slowdown("compute", "memory", s) == pytest.approx((1 - w) * v[8] + w * v[64], rel=1e-12)
    assert p.slowdown("memory", "compute", 77) == 1.0  # absent pair
    with pytest.raises(ProfileRangeError, match="num_sms 140"):
        p.slowdown("compute", "memory", 140)
    with pytest.raises(ProfileRangeError, match="kind 'gpu' unknown"):
        p.slowdown("gpu", "memory", 64)


# -- validation ----------------------------------------------------------------------------------


def _row(d: dict, table: str, pred) -> int:
    return next(i for i, r in enumerate(d["tables"][table]["data"]) if pred(r))


def _set(d, table, i, col, value):
    cols = d["tables"][table]["columns"]
    d["tables"][table]["data"][i][cols.index(col)] = value


def _drop_col(d, table, col):
    t = d["tables"][table]
    j = t["columns"].index(col)
    t["columns"].pop(j)
    for r in t["data"]:
        r.pop(j)


def _malformed():
    """(mutation of a valid dict that returns the expected message regex)"""

    def missing_col(d):
        _drop_col(d, "latency", "latency_us")
        return r"tables\.latency: missing column\(s\) latency_us"

    def extra_col(d):
        d["tables"]["latency"]["columns"].append("gpu_temp")
        for r in d["tables"]["latency"]["data"]:
            r.append(1)
        return r"tables\.latency: extra column\(s\) gpu_temp"

    def short_row(d):
        d["tables"]["latency"]["data"][4].pop()
        return r"tables\.latency row 4: expected a list of 5 values"

    def str_tokens(d):
        _set(d, "latency", 6, "tokens", "64")
        return r"tables\.latency row 6: tokens must be an integer, got '64'"

    def float_sms(d):
        _set(d, "latency", 2, "num_sms", 64.5)
        return r"tables\.latency row 2: num_sms must be an integer, got 64\.5"

    def nan_latency(d):
        _set(d, "latency", 17, "latency_us", float("nan"))
        return r"^tables\.latency row 17: latency_us is NaN$"

    def negative_latency(d):
        _set(d, "latency", 11, "latency_us", -2.5)
        return r"tables\.latency row 11: latency_us is negative \(-2\.5\)"

    def str_latency(d):
        _set(d, "latency", 3, "latency_us", "fast")
        return r"tables\.latency row 3: latency_us must be a number"

    def duplicate(d):
        d["tables"]["latency"]["data"].append(list(d["tables"]["latency"]["data"][3]))
        n = len(d["tables"]["latency"]["data"]) - 1
        return rf"tables\.latency rows 3 and {n}: duplicate grid point op='attn_decode'"

    def hole(d):
        i = _row(d, "latency", lambda r: r[0] == "qkv_proj" and r[1] == 128 and r[3] == 64)
        d["tables"]["latency"]["data"].pop(i)
        return r"op 'qkv_proj' lacks the grid point tokens=128, context=0, num_sms=64"

    def attn_hole(d):
        i = _row(d, "latency", lambda r: r[0] == "attn_decode" and r[1] == 64 and r[2] == 512 and r[3] == 8)
        d["tables"]["latency"]["data"].pop(i)
        return r"op 'attn_decode' lacks the grid point tokens=64, context=512, num_sms=8"

    def zero_tokens_nonzero(d):
        i = _row(d, "latency", lambda r: r[1] == 0)
        _set(d, "latency", i, "latency_us", 3.0)
        return rf"tables\.latency row {i}: latency_us must be 0 at tokens 0"

    def sms_over(d):
        _set(d, "latency", 0, "num_sms", 200)
        return r"tables\.latency row 0: num_sms 200 is outside 1\.\.132"

    def sm_grid_short(d):
        d["meta"]["num_sms"] = 140
        return r"SM grid ends at 132, not at meta\.num_sms 140"

    def slowdown_below_one(d):
        _set(d, "interference", 2, "slowdown", 0.9)
        return r"tables\.interference row 2: slowdown 0\.9 < 1"

    def unknown_kind(d):
        _set(d, "interference", 1, "other_kind", "gpu")
        return r"tables\.interference row 1: other_kind 'gpu' unknown; valid: compute, memory, network"

    def dup_interference(d):
        d["tables"]["interference"]["data"].append(list(d["tables"]["interference"]["data"][0]))
        return r"tables\.interference rows 0 and 3: duplicate point kind='compute'"

    def version(d):
        d["format_version"] = 2
        return r"format_version 2 is not supported \(this nfsearch reads 1\)"

    def fmt(d):
        d["format"] = "other"
        return r"not an nfsearch profile"

    def meta_missing(d):
        del d["meta"]["hbm_gbps"]
        return r"meta: missing field\(s\) hbm_gbps"

    def meta_unknown(d):
        d["meta"]["color"] = "red"
        return r"meta: unknown field\(s\) color"

    def meta_source(d):
        d["meta"]["source"] = "guessed"
        return r"meta\.source 'guessed' unknown; valid: measured, analytic"

    def meta_tp(d):
        d["meta"]["tp"] = 0
        return r"meta\.tp must be a positive integer, got 0"

    def missing_table(d):
        del d["tables"]["interference"]
        return r"tables\.interference must be a mapping"

    def mixed_context(d):
        i = _row(d, "latency", lambda r: r[0] == "attn_decode")
        _set(d, "latency", i, "context", 0)
        return r"op 'attn_decode' mixes context 0"

    return [missing_col, extra_col, short_row, str_tokens, float_sms, nan_latency, negative_latency,
            str_latency, duplicate, hole, attn_hole, zero_tokens_nonzero, sms_over, sm_grid_short,
            slowdown_below_one, unknown_kind, dup_interference, version, fmt, meta_missing, meta_unknown,
            meta_source, meta_tp, missing_table, mixed_context]


@pytest.mark.parametrize("mutate", _malformed(), ids=lambda f: f.__name__)
def test_malformed_named(rng, mutate):
    d = copy.deepcopy(_make(rng).to_dict())
    Profile.from_dict(copy.deepcopy(d))  # the unmutated dict is valid
    pattern = mutate(d)
    with pytest.raises(ProfileError, match=pattern):
        Profile.from_dict(d)


def test_load_errors_name_the_file(rng, tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ProfileError, match=r"bad\.json: not valid JSON"):
        load_profile(bad)
    d = _make(rng).to_dict()
    d["tables"]["latency"]["data"][17][4] = float("nan")
    p = tmp_path / "nan.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"nan\.json: tables\.latency row 17: latency_us is NaN"):
        load_profile(p)


def test_shipped_and_default_profile(rng, tmp_path):
    pytest.importorskip("nfsearch.opgraph")
    from nfsearch.gpus import resolve_gpu
    from nfsearch.models import resolve_model

    assert shipped_profile_path("h200", "tiny-llama", 1, root=tmp_path) is None
    analytic = default_profile_for(resolve_model("tiny-llama"), resolve_gpu("h200"), 1, root=tmp_path)
    assert analytic.meta.source == "analytic"
    measured = Profile(_meta(), analytic.latency, analytic.interference)
    path = save_profile(measured, tmp_path / "h200" / "tiny-llama-tp1.json")
    assert shipped_profile_path("h200", "tiny-llama", 1, root=tmp_path) == path
    got = default_profile_for("tiny-llama", "h200", 1, root=tmp_path)
    assert got.meta.source == "measured" and got.hash == measured.hash
    save_profile(measured, tmp_path / "h200" / "tiny-llama-tp2.json")  # meta says tp 1
    with pytest.raises(ProfileError, match="meta says model 'tiny-llama', gpu 'h200', tp 1"):
        default_profile_for("tiny-llama", "h200", 2, root=tmp_path)


# -- analytic profile ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analytic():
    pytest.importorskip("nfsearch.opgraph")
    from nfsearch.gpus import resolve_gpu
    from nfsearch.models import resolve_model
    from nfsearch.profile_analytic import analytic_profile

    out = {}
    for name, tp in (("tiny-llama", 1), ("llama3-8b", 1), ("tiny-mixtral", 2)):
        t0 = time.perf_counter()
        out[name] = (analytic_profile(resolve_model(name), resolve_gpu("h200"), tp=tp),
                     time.perf_counter() - t0)
    return out


def test_analytic_builds_fast_and_round_trips(analytic, tmp_path):
    for name in ("tiny-llama", "llama3-8b"):
        p, secs = analytic[name]
        assert secs < 10.0, f"{name}: {secs:.1f} s"
        assert p.meta.source == "analytic" and p.meta.model == name and "launch overhead" in p.meta.notes
        a = save_profile(p, tmp_path / f"{name}.json")
        q = load_profile(a)
        assert q.hash == p.hash and q.canonical_bytes() == a.read_bytes()


def test_analytic_grids_cover_the_ops(analytic):
    from nfsearch.gpus import partition_sizes, resolve_gpu
    from nfsearch.models import resolve_model
    from nfsearch.opgraph import layer_ops, tail_ops

    p, _ = analytic["llama3-8b"]
    m = resolve_model("llama3-8b")
    names = {op.name for op in (*layer_ops(m, 1), *tail_ops(m, 1))}
    assert set(p.ops()) == names
    assert p.sm_grid() == partition_sizes(resolve_gpu("h200"))
    toks = p.token_grid("qkv_proj")
    assert toks[0] == 0 and toks[-1] == 4096
    assert set(range(0, 513, 64)) <= set(toks)
    assert len(p.context_grid("attn_decode")) > 5 and p.context_grid("o_proj") == (0,)
    tp2, _ = analytic["tiny-mixtral"]
    assert {"attn_allreduce", "mlp_allreduce"} <= set(tp2.ops())
    assert tp2.slowdown("compute", "memory", 64) == pytest.approx(1.10)
    assert tp2.slowdown("memory", "compute", 64) == pytest.approx(1.05)
    assert tp2.slowdown("network", "compute", 64) == pytest.approx(1.05)


def test_analytic_monotone(analytic):
    from nfsearch.models import resolve_model
    from nfsearch.opgraph import layer_ops

    for name in ("llama3-8b", "tiny-mixtral"):
        p, _ = analytic[name]
        kinds = {op.name: op.kind for op in layer_ops(resolve_model(name), p.meta.tp)}
        lat = p.latency
        for (op, ctx), g in lat.groupby(["op", "context"]):
            a = g.pivot(index="tokens", columns="num_sms", values="latency_us").to_numpy()  # [tokens, sms]
            assert (np.diff(a, axis=0) >= -1e-9).all(), f"{name} {op} ctx {ctx}: not monotone in tokens"
            if kinds.get(op) == "compute":
                assert (np.diff(a, axis=1) <= 1e-9).all(), f"{name} {op}: latency grows with SMs"
                assert a[-1, 0] > a[-1, -1]  # fewer SMs are slower at a large batch


def test_analytic_matches_roofline_by_hand(analytic, rng):
    from nfsearch.gpus import resolve_gpu
    from nfsearch.models import resolve_model
    from nfsearch.opgraph import layer_ops
    from nfsearch.profile_analytic import LAUNCH_OVERHEAD_US

    p, _ = analytic["llama3-8b"]
    gpu = resolve_gpu("h200")
    ops = {op.name: op for op in layer_ops(resolve_model("llama3-8b"), 1)}
    s_sat = round(0.36 * gpu.num_sms)
    for _ in range(10):
        name = str(rng.choice(sorted(ops)))
        t = int(rng.choice(p.token_grid(name)[1:]))
        c = int(rng.choice(p.context_grid(name)))
        s = int(rng.choice(p.sm_grid()))
        cost = ops[name].cost(t, c)
        secs = max(cost.flops / (gpu.peak_tflops * 1e12 * s / gpu.num_sms),
                   cost.hbm_bytes / (gpu.hbm_gbps * 1e9 * min(1.0, s / s_sat)),
                   cost.net_bytes / (gpu.nvlink_gbps * 1e9))
        want = secs * 1e6 + LAUNCH_OVERHEAD_US
        assert p.latency_us(name, t, c, s) == pytest.approx(want, abs=1e-4), (name, t, c, s)
        assert not math.isnan(want)
