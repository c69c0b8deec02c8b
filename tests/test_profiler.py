"""The profiler's CPU side: grids, the resumable loop with a fake timer, the no-GPU error, plots."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import nfsearch
from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.gpus import partition_sizes, resolve_gpu
from nfsearch.models import resolve_model
from nfsearch.opgraph import GATHER_OPS, layer_ops, op_tokens, tail_ops
from nfsearch.profile import Profile, load_profile, save_profile, shipped_profile_path
from nfsearch.profiler.addops import add_ops, add_ops_grid, missing_ops, profile_heat
from nfsearch.profiler.command import DEFAULT_HEAT
from nfsearch.profiler.grid import (
    CORUN_KINDS,
    ProfileGrid,
    corun_sets,
    full_grid,
    grid_point_count,
    heat_label,
    interference_ops,
    network_ops,
    op_points,
    profiled_ops,
    profiles_gather,
    quick_grid,
    split_pairs,
    sustained_points,
)
from nfsearch.profiler.plot import latency_spread, pr_curves
from nfsearch.profiler.run import aggregate_interference, partial_path, run_profile
from nfsearch.profiler.sustained import note_heat, table_offset
from nfsearch.workload import compose_batch, parse_workload


class FakeTimer:
    """Deterministic latencies from a random per-op scale; can crash after `crash_after` SM sizes."""

    def __init__(self, seed: int, crash_after: int | None = None) -> None:
        rng = random.Random(seed)
        self.scale = {op: rng.uniform(0.5, 2.0) for op in profiled_ops(resolve_model("mixtral"), 2)}
        self.scale.update({op: rng.uniform(0.5, 2.0) for op in profiled_ops(resolve_model("llama3-8b"), 2)})
        self.slow = rng.uniform(1.02, 1.3)
        self.net_slow = rng.uniform(1.02, 1.3)  # a network op on top (and its partners) slow this much
        self.sus = rng.uniform(0.05, 0.2)  # sustained / burst = 1 + sus above 64 SMs, growing to all SMs
        # the burst timing beside a held point is taken hot (after the heater): slower than the
        # profile's own point, so a factor over it would come out too small
        self.hot = rng.uniform(1.02, 1.1)
        self.nvlink_gbps: float | None = None  # the ceilings measure NVLink when set (a TP run)
        self.crash_after = crash_after
        self.solo_calls: list[int] = []
        self.corun_calls: list[int] = []
        self.sustained_calls: list[int] = []
        self.ceiling_calls = 0

    def stamp(self):
        return {"gpu_name": "NVIDIA H200", "num_sms": 132, "driver": "580", "cuda": "13.0",
                "torch": "2.11", "triton": "3.6"}

    def ceilings(self):
        self.ceiling_calls += 1
        out = {"peak_tflops": 790.0, "hbm_gbps": 4260.0}
        if self.nvlink_gbps is not None:
            out["nvlink_gbps"] = self.nvlink_gbps
        return out

    def latency(self, op: str, t: int, c: int, s: int) -> float:
        return self.scale[op] * (3.0 + t * (1 + c / 64) * 0.01 * 132 / s)

    def solo(self, num_sms, points, tick):
        if self.crash_after is not None and len(self.solo_calls) >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.solo_calls.append(num_sms)
        tick(len(points))
        return [self.latency(op, t, c, num_sms) for op, t, c in points]

    def sustained_factor(self, s: int) -> float:
        return 1.0 + self.sus * max(0, s - 64) / 68

    def sustained(self, num_sms, points, tick):
        calls = len(self.solo_calls) + len(self.sustained_calls)
        if self.crash_after is not None and calls >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.sustained_calls.append(num_sms)
        tick(len(points))
        f = self.sustained_factor(num_sms)
        return [(self.latency(op, t, c, num_sms) * self.hot, self.latency(op, t, c, num_sms) * f)
                for op, t, c in points]

    def corun(self, top_sms, bottom_sms, bottom_ops, top_ops, tick):
        self.corun_calls.append(top_sms)
        tick(len(bottom_ops) * len(top_ops))
        rows = []
        for b in bottom_ops:
            for t in top_ops:
                if CORUN_KINDS[t] == "network":
                    rows.append((b, t, bottom_sms, top_sms, self.net_slow, self.net_slow * self.scale[b],
                                 self.scale[b], self.scale[t]))
                else:
                    rows.append((b, t, bottom_sms, top_sms, self.slow * (1 + 0.1 * top_sms / 132), 0.99,
                                 self.scale[b], self.scale[t]))
        return rows

    def describe(self):
        return "fake timer."


def _args(model: str, grid: ProfileGrid, tp: int = 1):
    return dict(model=resolve_model(model), tp=tp, grid=grid, gpu_slug="h200", sm_granularity=8,
                nvlink_gbps=450.0)


def test_full_grid_covers_solve() -> None:
    g = full_grid()
    assert g.sms == partition_sizes(resolve_gpu("h200"))  # 8, 16, ..., 128, 132: all 17 sizes
    assert len(g.sms) == 17 and g.sms[-1] == 132
    for tokens in (g.tokens, g.prefill_tokens, g.decode_requests):
        assert tokens[0] == 64 and tokens[-1] >= 2048  # first granule .. the default dense batch
        assert 0 not in tokens  # no interpolation towards 0 from an unmeasured row
    # contexts of the built-in workloads (decode 196..1260, prompts 92..1155) lie inside
    assert g.decode_contexts[0] <= 196 and g.decode_contexts[-1] >= 1260
    assert g.prefill_contexts[0] <= 92 and g.prefill_contexts[-1] >= 1155
    # interference: memory on m SMs beside compute on the rest of the 120 placed SMs (H200 layout)
    h200 = full_grid(132, 8, 8, resolve_gpu("h200").placeable_sms)
    assert split_pairs(h200) == [(m, 120 - m) for m in (16, 32, 48, 64, 80)]
    assert all(m + c <= 120 for m, c in split_pairs(quick_grid(132, 8, 8, 120)))


def test_quick_grid_is_smaller_and_ends_at_all_sms() -> None:
    full, quick = full_grid(), quick_grid()
    assert quick.sms[-1] == 132 and quick.sms[0] == 8 and set(quick.sms) <= set(full.sms)
    m = resolve_model("llama3-8b")
    assert grid_point_count(m, 1, quick)[0] * 4 < grid_point_count(m, 1, full)[0]


def test_op_points_per_model() -> None:
    g = quick_grid()
    dense = op_points(resolve_model("llama3-8b"), 1, g)
    moe = op_points(resolve_model("mixtral"), 1, g)
    ops = {p[0] for p in dense}
    assert {"gate_up", "down", "lm_head", "final_norm", "attn_decode"} <= ops and "router" not in ops
    assert {"router", "expert_gate_up", "expert_down"} <= {p[0] for p in moe} and "gate_up" not in {
        p[0] for p in moe}
    dec = [(t, c) for op, t, c in dense if op == "attn_decode"]
    assert sorted(dec) == sorted((t, c) for t in g.decode_requests for c in g.decode_contexts)
    assert all(c == 0 for op, t, c in dense if op not in ("attn_decode", "attn_prefill"))
    assert len(set(dense)) == len(dense)
    comp, mem = interference_ops(resolve_model("mixtral"))
    assert "expert_down" in comp and "gate_up" not in comp and mem == ("attn_decode",)
    assert "attn_prefill" not in comp  # GEMMs only: the ops that run long beside decode attention


def test_full_grid_times_gemms_every_64_tokens() -> None:
    g = full_grid()
    for model, gemms in (("mixtral", ("qkv_proj", "o_proj", "expert_gate_up", "expert_down")),
                         ("llama3-8b", ("qkv_proj", "o_proj", "gate_up", "down"))):
        points = op_points(resolve_model(model), 1, g)
        for op in gemms:
            tokens = [t for o, t, _ in points if o == op]
            # every 64-token nano-batch size up to the default dense batch is a measured point
            assert set(range(64, 2049, 64)) <= set(tokens) and tokens[-1] == g.tokens[-1], op
        # the other ops keep the common grid (they change speed smoothly)
        for op in ("router", "expert_silu_mul", "silu_mul", "input_norm", "lm_head"):
            if any(o == op for o, _, _ in points):
                assert [t for o, t, _ in points if o == op] == list(g.tokens), op
    quick = quick_grid()
    assert [t for o, t, _ in op_points(resolve_model("mixtral"), 1, quick) if o == "expert_down"] == list(
        quick.tokens)
    # without the fine GEMM grid every op is on the common grid
    dense = op_points(resolve_model("llama3-8b"), 1, replace(g, gemm_tokens=()))
    assert {t for o, t, _ in dense if o == "gate_up"} == set(g.tokens)


def test_grid_validates() -> None:
    kw = dict(sms=(8, 132), tokens=(64, 128), decode_requests=(64,), decode_contexts=(32,),
              prefill_tokens=(64,), prefill_contexts=(32,), splits=(8,), interference_tokens=64,
              interference_decode=(64, 64), repeats=3)
    for bad in ((64, 256), (128, 64), (64, 64), (0, 64)):
        with pytest.raises(NfsearchError, match="gemm_tokens"):
            ProfileGrid(**kw, gemm_tokens=bad)
    assert ProfileGrid(**kw, gemm_tokens=(64, 96, 128)).gemm_tokens == (64, 96, 128)
    with pytest.raises(NfsearchError, match="ascending"):
        ProfileGrid(sms=(16, 8, 132), tokens=(64,), decode_requests=(64,), decode_contexts=(32,),
                    prefill_tokens=(64,), prefill_contexts=(32,), splits=(8,), interference_tokens=64,
                    interference_decode=(64, 64), repeats=3)
    with pytest.raises(NfsearchError, match="leave compute SMs"):
        ProfileGrid(sms=(8, 132), tokens=(64,), decode_requests=(64,), decode_contexts=(32,),
                    prefill_tokens=(64,), prefill_contexts=(32,), splits=(120,), interference_tokens=64,
                    interference_decode=(64, 64), repeats=3, placed_sms=120)
    with pytest.raises(NfsearchError, match="placed_sms"):
        ProfileGrid(sms=(8, 132), tokens=(64,), decode_requests=(64,), decode_contexts=(32,),
                    prefill_tokens=(64,), prefill_contexts=(32,), splits=(8,), interference_tokens=64,
                    interference_decode=(64, 64), repeats=3, placed_sms=136)


def test_profile_from_fake_timer_is_valid_and_solvable(tmp_path) -> None:
    out = tmp_path / "p" / "mixtral-8x7b-tp1.json"
    t = FakeTimer(seed=random.randrange(1 << 30))
    prof = run_profile(timer=t, out=out, **_args("mixtral", quick_grid()))
    assert out.is_file() and not partial_path(out).exists()
    assert load_profile(out) == prof
    assert prof.meta.source == "measured" and prof.meta.peak_tflops == 790.0 and prof.meta.gpu == "h200"
    assert sorted(t.solo_calls) == list(quick_grid().sms)
    # an exact grid point reads back the timer's (burst) value
    burst = prof.latency_us("expert_down", 1024, 0, 48, sustained=False)
    assert burst == pytest.approx(t.latency("expert_down", 1024, 0, 48), abs=1e-4)
    # interference: clamped at 1.0 (memory got 0.99), extended to the SM grid's ends
    assert prof.slowdown("memory", "compute", 8) == 1.0 and prof.slowdown("memory", "compute", 132) == 1.0
    assert prof.slowdown("compute", "memory", 32) > 1.0
    assert "clamped" in prof.meta.notes
    _assert_covers_solve(prof, "mixtral")


def _assert_covers_solve(prof, model_name: str, tp: int = 1) -> None:
    """Every lookup `nfsearch solve` makes (ops x 64-token granules x SM sizes, built-in workloads)."""
    model = resolve_model(model_name)
    for wl in ("splitwise", "lmsys", "sharegpt", "const:512:128"):
        batch = compose_batch(model, parse_workload(wl), resolve_gpu("h200"), tp, round_to=64).batch
        for op in layer_ops(model, tp) + tail_ops(model, tp):
            ctx = op_tokens(op, batch)[1]
            for n in range(1, batch.dense_batch // 64 + 1):
                for s in (8, 12, 64, 124, 132):
                    assert prof.latency_us(op.name, n * 64, ctx, s) > 0
        pairs = [("compute", "memory"), ("memory", "compute")]
        if tp > 1:
            pairs += [("compute", "network"), ("network", "compute"), ("memory", "network"),
                      ("network", "memory")]
        for s in partition_sizes(resolve_gpu("h200")):
            for k, o in pairs:
                assert prof.slowdown(k, o, s) >= 1.0


@pytest.mark.parametrize("gpu", ["h200", "h100-sxm"])
@pytest.mark.parametrize("model", ["llama3-8b", "mixtral-8x7b"])
def test_shipped_profiles_cover_solve(gpu: str, model: str) -> None:
    path = shipped_profile_path(gpu, model, 1)
    if path is None:
        pytest.skip(f"no shipped profile {gpu}/{model}")
    prof = load_profile(path)
    assert prof.meta.source == "measured" and prof.meta.gpu == gpu and prof.meta.num_sms == 132
    assert prof.sm_grid() == partition_sizes(resolve_gpu(gpu))
    assert 500 < prof.meta.peak_tflops < 1000 and 2000 < prof.meta.hbm_gbps < 5000
    _assert_covers_solve(prof, model)


def test_crash_then_resume_skips_done_work(tmp_path) -> None:
    out = tmp_path / "llama3-8b-tp1.json"
    grid = quick_grid()
    seed = random.randrange(1 << 30)
    crashing = FakeTimer(seed, crash_after=3)
    with pytest.raises(RuntimeError, match="simulated"):
        run_profile(timer=crashing, out=out, **_args("llama3-8b", grid))
    state = json.loads(partial_path(out).read_text())
    assert sorted(map(int, state["solo"])) == sorted(crashing.solo_calls) and len(state["solo"]) == 3
    assert not out.exists()
    resumed = FakeTimer(seed)
    prof = run_profile(timer=resumed, out=out, resume=True, **_args("llama3-8b", grid))
    assert resumed.ceiling_calls == 0  # the ceilings came from the partial file
    assert set(resumed.solo_calls).isdisjoint(crashing.solo_calls)
    assert sorted(resumed.solo_calls + crashing.solo_calls) == list(grid.sms)
    assert not partial_path(out).exists()
    fresh = run_profile(timer=FakeTimer(seed), out=tmp_path / "fresh.json", **_args("llama3-8b", grid))
    assert prof.latency.equals(fresh.latency) and prof.interference.equals(fresh.interference)


def test_without_resume_a_partial_file_is_ignored(tmp_path) -> None:
    out = tmp_path / "llama3-8b-tp1.json"
    grid = quick_grid()
    with pytest.raises(RuntimeError):
        run_profile(timer=FakeTimer(1, crash_after=2), out=out, **_args("llama3-8b", grid))
    t = FakeTimer(1)
    run_profile(timer=t, out=out, **_args("llama3-8b", grid))
    assert sorted(t.solo_calls) == list(grid.sms) and t.ceiling_calls == 1


def test_resume_refuses_a_partial_file_of_another_run(tmp_path) -> None:
    out = tmp_path / "llama3-8b-tp1.json"
    with pytest.raises(RuntimeError):
        run_profile(timer=FakeTimer(1, crash_after=1), out=out, **_args("llama3-8b", quick_grid()))
    with pytest.raises(NfsearchError, match="another run.*grid"):
        run_profile(timer=FakeTimer(1), out=out, resume=True, **_args("llama3-8b", full_grid()))


def test_aggregate_interference_weighted_compute_max_memory() -> None:
    rng = random.Random()
    slows = [rng.uniform(1.0, 2.0) for _ in range(3)]
    solo = [rng.uniform(10.0, 500.0) for _ in range(3)]
    mslow = [rng.uniform(1.0, 1.6) for _ in range(3)]
    rows = [(op, "attn_decode", 72, 48, x, m, w, 800.0)
            for op, x, m, w in zip(("qkv_proj", "gate_up", "down"), slows, mslow, solo, strict=True)]
    rows.append(("gate_up", "attn_decode", 104, 16, 0.97, 1.2, 300.0, 900.0))
    table, note = aggregate_interference(rows, (8, 16, 48, 72, 104, 132))
    d = {(k, o, s): x for k, o, s, x in table}
    # compute: sum of co-run time over sum of solo time of the GEMMs on 72 SMs
    want = sum(x * w for x, w in zip(slows, solo, strict=True)) / sum(solo)
    assert d[("compute", "memory", 72)] == pytest.approx(max(1.0, want))
    assert d[("memory", "compute", 48)] == pytest.approx(max(1.0, *mslow))  # worst partner
    assert d[("compute", "memory", 104)] == 1.0  # 0.97 clamped
    assert d[("compute", "memory", 8)] == d[("compute", "memory", 72)]  # edges copied
    assert d[("compute", "memory", 132)] == d[("compute", "memory", 104)]
    assert d[("memory", "compute", 132)] == d[("memory", "compute", 48)]
    assert ("compute", "memory", 48) not in d and ("memory", "compute", 72) not in d
    assert all(x >= 1.0 for x in d.values()) and "weighted" in note


def test_no_gpu_error_names_shipped_profiles(capsys) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert main(["profile", "--model", "llama3-8b", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nfsearch: error: nfsearch profile needs a CUDA GPU") and "\n" not in err
    assert "shipped profiles:" in err and "h200/llama3-8b-tp1" in err


def test_plot_and_show_and_spread(tmp_path, capsys) -> None:
    out = tmp_path / "llama3-8b-tp1.json"
    t = FakeTimer(random.randrange(1 << 30))
    prof = run_profile(timer=t, out=out, **_args("llama3-8b", quick_grid()))
    curves = pr_curves(prof)
    assert set(curves) == {"compute", "memory", "other"}
    for by_op in curves.values():
        for curve in by_op.values():
            assert curve[-1] == pytest.approx(1.0) and all(0 < x <= 1.0 + 1e-9 for x in curve)
    png = tmp_path / "pr.png"
    assert main(["profile", "--plot", str(png), "--show", "--profile", str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "slowdown compute beside memory" in capsys.readouterr().out
    same = latency_spread(prof, prof)
    assert same["median"] == 0.0 and same["max"] == 0.0


# ---- tensor parallelism ----------------------------------------------------------------------


def test_tp_grid_has_network_ops_and_pairs() -> None:
    g = quick_grid(132, 8, 8, 120)
    for name, tp in (("llama3-70b", 4), ("mixtral-8x7b", 2)):
        m = resolve_model(name)
        ops = profiled_ops(m, tp)
        assert {"attn_allreduce", "mlp_allreduce"} <= set(ops)
        assert not {"attn_allreduce", "mlp_allreduce"} & set(profiled_ops(m, 1))
        # network ops: context 0, the all-token grid
        net = sorted((t, c) for op, t, c in op_points(m, tp, g) if op == "mlp_allreduce")
        assert net == [(t, 0) for t in g.tokens]
        # co-runs: GEMMs beside decode attention, then GEMMs and decode attention beside the network op
        comp, mem = interference_ops(m, tp)
        assert corun_sets(m, 1) == [(comp, mem)]
        assert corun_sets(m, tp) == [(comp, mem), (comp + mem, network_ops(m, tp))]
        assert network_ops(m, tp) == ("attn_allreduce",) and network_ops(m, 1) == ()
        solo, co, _ = grid_point_count(m, tp, g)
        assert co == len(g.splits) * (len(comp) * len(mem) + len(comp) + len(mem))
        # two all-reduces and the all-gather form's three ops, each on the token grid and every SM size
        assert solo == (grid_point_count(m, 1, g)[0] + 5 * len(g.tokens) * len(g.sms))
    # the kinds the interference table is keyed by are opgraph's
    kinds = {op.name: op.kind for op in layer_ops(resolve_model("mixtral"), 2) + layer_ops(
        resolve_model("llama3-8b"), 2)}
    assert all(kinds[op] == kind for op, kind in CORUN_KINDS.items())


def test_tp_profile_has_network_rows_and_measured_nvlink(tmp_path) -> None:
    out = tmp_path / "llama3-70b-tp4.json"
    t = FakeTimer(random.randrange(1 << 30))
    t.scale.update({op: random.uniform(0.5, 2.0) for op in profiled_ops(resolve_model("llama3-70b"), 4)})
    t.nvlink_gbps = random.uniform(300.0, 400.0)
    grid = quick_grid(132, 8, 8, 120)
    prof = run_profile(timer=t, out=out, **_args("llama3-70b", grid, tp=4))
    assert load_profile(out) == prof and prof.meta.tp == 4
    assert prof.meta.nvlink_gbps == pytest.approx(t.nvlink_gbps)
    assert "nvlink_gbps is measured" in prof.meta.notes
    for op in ("attn_allreduce", "mlp_allreduce"):
        assert prof.context_grid(op) == (0,) and prof.token_grid(op) == grid.tokens
        assert prof.latency_us(op, 1024, 0, 32) == pytest.approx(t.latency(op, 1024, 0, 32), abs=1e-4)
    # network on the top m SMs: its slowdown is the max over partners; partners' the weighted mean
    comp, mem = interference_ops(resolve_model("llama3-70b"), 4)
    for m, c in split_pairs(grid):
        worst = max(t.net_slow * t.scale[o] for o in comp)
        assert prof.slowdown("network", "compute", m) == pytest.approx(max(1.0, worst), abs=1e-6)
        assert prof.slowdown("network", "memory", m) == pytest.approx(max(1.0, t.net_slow * t.scale[mem[0]]),
                                                                      abs=1e-6)
        assert prof.slowdown("compute", "network", c) == pytest.approx(t.net_slow, abs=1e-6)
        assert prof.slowdown("memory", "network", c) == pytest.approx(t.net_slow, abs=1e-6)
    kinds = set(zip(prof.interference["kind"], prof.interference["other_kind"], strict=True))
    assert kinds == {("compute", "memory"), ("memory", "compute"), ("compute", "network"),
                     ("network", "compute"), ("memory", "network"), ("network", "memory")}
    _assert_covers_solve(prof, "llama3-70b", tp=4)


def test_tp1_keeps_datasheet_nvlink_and_no_network_rows(tmp_path) -> None:
    prof = run_profile(timer=FakeTimer(3), out=tmp_path / "a.json", **_args("llama3-8b", quick_grid()))
    assert prof.meta.nvlink_gbps == 450.0 and "datasheet" in prof.meta.notes
    assert "network" not in set(prof.interference["kind"]) | set(prof.interference["other_kind"])
    assert "attn_allreduce" not in prof.ops()


def test_non_leader_rank_writes_nothing_and_reads_the_same_partial(tmp_path) -> None:
    out = tmp_path / "mixtral-8x7b-tp2.json"
    grid = quick_grid(132, 8, 8, 120)
    seed = random.randrange(1 << 30)
    with pytest.raises(RuntimeError):
        run_profile(timer=FakeTimer(seed, crash_after=2), out=out, **_args("mixtral", grid, tp=2))
    before = partial_path(out).read_bytes()
    calls = []
    rank1 = FakeTimer(seed)
    prof = run_profile(timer=rank1, out=out, resume=True, leader=False, barrier=lambda: calls.append(1),
                       **_args("mixtral", grid, tp=2))
    assert calls == [1] and rank1.ceiling_calls == 0  # resumed from the leader's partial file
    assert len(rank1.solo_calls) == len(grid.sms) - 2
    assert not out.exists() and partial_path(out).read_bytes() == before  # untouched
    leader = run_profile(timer=FakeTimer(seed), out=out, resume=True, leader=True,
                         barrier=lambda: calls.append(0), **_args("mixtral", grid, tp=2))
    assert out.exists() and not partial_path(out).exists() and calls == [1, 0]
    assert leader.latency.equals(prof.latency) and leader.interference.equals(prof.interference)


def test_aggregate_interference_network_pairs() -> None:
    rng = random.Random()
    ops = ("qkv_proj", "o_proj", "gate_up", "down")
    net_beside = {op: rng.uniform(1.0, 1.5) for op in ops}  # network's slowdown beside each GEMM
    gemm_slow = {op: rng.uniform(1.0, 1.5) for op in ops}
    gemm_us = {op: rng.uniform(10.0, 500.0) for op in ops}
    rows = [(op, "attn_allreduce", 104, 16, gemm_slow[op], net_beside[op], gemm_us[op], 80.0) for op in ops]
    rows.append(("attn_decode", "attn_allreduce", 104, 16, 1.07, 1.3, 600.0, 80.0))
    table, note = aggregate_interference(rows, (8, 16, 104, 132))
    d = {(k, o, s): x for k, o, s, x in table}
    assert d[("network", "compute", 16)] == pytest.approx(max(net_beside.values()))
    want = sum(gemm_slow[o] * gemm_us[o] for o in ops) / sum(gemm_us.values())
    assert d[("compute", "network", 104)] == pytest.approx(want)
    assert d[("network", "memory", 16)] == pytest.approx(1.3)
    assert d[("memory", "network", 104)] == pytest.approx(1.07)
    assert d[("network", "memory", 132)] == pytest.approx(1.3)  # edges copied
    assert ("compute", "memory", 104) not in d and "compute/network" in note
    with pytest.raises(NfsearchError, match="does not co-run"):
        aggregate_interference([("silu_mul", "attn_allreduce", 104, 16, 1.0, 1.0, 1.0, 1.0)], (8, 132))


def test_profile_tp_relaunches_across_gpus(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    import nfsearch.launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    calls = []
    code = random.randrange(1, 100)

    def fake_relaunch(tp, argv=None):
        calls.append(tp)
        return code  # outside torchrun: the N processes ran; their exit code is the command's

    monkeypatch.setattr(nfsearch.launch, "relaunch", fake_relaunch)
    assert main(["profile", "--model", "llama3-70b", "--tp", "4", "--quick"]) == code
    assert calls == [4]
    # a degree that does not divide the heads fails before any process starts
    assert main(["profile", "--model", "llama3-70b", "--tp", "3"]) == 2
    assert calls == [4]


# ---- the all-gather form's ops (attn_allgather, o_proj_col, o_allgather) ------------------------


def test_tp_grid_profiles_the_gather_ops_like_o_proj_and_the_allreduce() -> None:
    for grid in (quick_grid(132, 8, 8, 120), full_grid(132, 8, 8, 120)):
        for name, tp in (("llama3-70b", 4), ("mixtral-8x7b", 2), ("tiny-llama", 2)):
            m = resolve_model(name)
            assert set(GATHER_OPS) <= set(profiled_ops(m, tp)) and profiles_gather(m, tp)
            assert not set(GATHER_OPS) & set(profiled_ops(m, 1)) and not profiles_gather(m, 1)
            pts = op_points(m, tp, grid)

            def tokens(op: str, pts=pts) -> list[tuple[int, int]]:
                return [(t, c) for o, t, c in pts if o == op]

            assert tokens("o_proj_col") == tokens("o_proj")  # the GEMM grid where there is one
            assert tokens("attn_allgather") == tokens("o_allgather") == tokens("attn_allreduce")
            # o_proj_col in the sustained table, the collectives not; interference stays per kind
            held = {o for o, _, _ in sustained_points(m, tp, grid)}
            assert "o_proj_col" in held and not {"attn_allgather", "o_allgather"} & held
            assert corun_sets(m, tp) == [(interference_ops(m, tp)), (sum(interference_ops(m, tp), ()),
                                                                     ("attn_allreduce",))]
            assert grid_point_count(m, tp, grid)[2] == len(held) * len(grid.sustained_tokens) * len(
                grid.sustained_sms)


def _tp2_profile(tmp_path, seed: int, name: str = "tiny-llama"):
    grid = replace(quick_grid(132, 8, 8, 120), sustained_sms=(32, 64, 96, 132), sustained_tokens=(256, 1024))
    t = FakeTimer(seed)
    t.nvlink_gbps = 350.0
    prof = run_profile(timer=t, out=tmp_path / "full.json", **_args(name, grid, tp=2))
    return prof, grid, t


def test_tp2_profile_holds_the_gather_ops(tmp_path) -> None:
    prof, grid, t = _tp2_profile(tmp_path, random.randrange(1 << 30))
    assert set(prof.ops()) == set(profiled_ops(resolve_model("tiny-llama"), 2))
    for op in GATHER_OPS:
        assert prof.token_grid(op) == prof.token_grid("o_proj") == grid.tokens
        assert prof.context_grid(op) == (0,) and prof.sm_grid() == grid.sms
        s = random.choice(grid.sms)
        assert prof.latency_us(op, 1024, 0, s, sustained=False) == pytest.approx(
            t.latency(op, 1024, 0, s), abs=1e-4)
    held = {o for o, _, _ in sustained_points(resolve_model("tiny-llama"), 2, grid)}
    assert set(prof.sustained["op"]) == held
    col = prof.sustained[prof.sustained["op"] == "o_proj_col"]
    assert len(col) == len(grid.sustained_tokens) * len(grid.sustained_sms)
    kinds = set(zip(prof.interference["kind"], prof.interference["other_kind"], strict=True))
    assert kinds == {("compute", "memory"), ("memory", "compute"), ("compute", "network"),
                     ("network", "compute"), ("memory", "network"), ("network", "memory")}
    # the solver's lookups of the gather form, every 64-token granule of the dense batch
    for op in GATHER_OPS:
        for n in range(1, 2048 // 64 + 1):
            assert prof.latency_us(op, n * 64, 0, 120) > 0


def _without(prof, ops):
    """`prof` without the rows of `ops` (a profile made before they existed)."""
    lat, sus = prof.latency, prof.sustained
    return Profile(prof.meta, lat[~lat["op"].isin(ops)], prof.interference, sus[~sus["op"].isin(ops)])


def _rows(path, table: str) -> list[str]:
    return [json.dumps(r) for r in json.loads(path.read_text())["tables"][table]["data"]]


def test_add_ops_adds_exactly_the_missing_rows(tmp_path) -> None:
    seed = random.randrange(1 << 30)
    model = resolve_model("tiny-llama")
    full, grid, _ = _tp2_profile(tmp_path, seed)
    old = _without(full, GATHER_OPS)
    save_profile(old, tmp_path / "old.json")
    assert missing_ops(old, model, 2) == GATHER_OPS
    g = add_ops_grid(old, model, 2, quick_grid(132, 8, 8, 120))
    assert g.sms == old.sm_grid() and g.tokens == old.token_grid("o_proj") and g.gemm_tokens == ()
    assert (g.sustained_sms, g.sustained_tokens) == (grid.sustained_sms, grid.sustained_tokens)
    t = FakeTimer(seed)
    bars = []

    class Bar:
        def __init__(self, total, done):
            self.total, self.n = total, done
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    out = tmp_path / "new.json"
    new = add_ops(old, model, 2, g, t, out, progress=Bar)
    assert load_profile(out) == new
    assert sorted(t.solo_calls) == list(grid.sms) and t.solo_calls[0] == 132  # all SMs first
    assert sorted(t.sustained_calls) == list(grid.sustained_sms) and t.corun_calls == []
    assert len(bars) == 1 and bars[0].n == bars[0].total == (
        3 * len(grid.tokens) * len(grid.sms) + len(grid.sustained_tokens) * len(grid.sustained_sms))
    # exactly the missing rows were added; every old row is saved byte for byte, in order
    for table in ("latency", "sustained"):
        was, now = _rows(tmp_path / "old.json", table), _rows(out, table)
        kept = [r for r in now if json.loads(r)[0] not in GATHER_OPS]
        assert kept == was
        added = {json.loads(r)[0] for r in now if r not in set(was)}
        assert added == (set(GATHER_OPS) if table == "latency" else {"o_proj_col"})
    assert new.interference.equals(old.interference) and new.hash != old.hash
    assert new.meta.notes.startswith(old.meta.notes + " | added ops: attn_allgather, o_proj_col")
    assert replace(new.meta, notes="") == replace(old.meta, notes="")
    # the deterministic fake timer gives the added points the values a full profile has
    assert new.latency.equals(full.latency)
    col_new = new.sustained[new.sustained["op"] == "o_proj_col"].reset_index(drop=True)
    col_full = full.sustained[full.sustained["op"] == "o_proj_col"].reset_index(drop=True)
    assert col_new[["tokens", "num_sms"]].equals(col_full[["tokens", "num_sms"]])
    assert col_new["factor"].to_numpy() == pytest.approx(col_full["factor"].to_numpy(), abs=2e-4)
    # nothing left to add; a profile of another run is refused
    with pytest.raises(NfsearchError, match="already has every layer op of tiny-llama tp 2"):
        add_ops(new, model, 2, g, FakeTimer(seed), tmp_path / "x.json")
    with pytest.raises(NfsearchError, match="profile is measured tiny-llama tp 2 on 132 SMs; this run is "
                                            "tiny-llama tp 4"):
        add_ops(old, model, 4, g, FakeTimer(seed), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_add_ops_without_a_sustained_table_adds_latency_rows_only(tmp_path) -> None:
    seed = random.randrange(1 << 30)
    model = resolve_model("tiny-mixtral")
    full, _, _ = _tp2_profile(tmp_path, seed, "tiny-mixtral")
    old = Profile(full.meta, full.latency[~full.latency["op"].isin(GATHER_OPS)], full.interference)
    g = add_ops_grid(old, model, 2, quick_grid(132, 8, 8, 120))
    assert g.sustained_sms == () and g.sustained_tokens == ()
    t = FakeTimer(seed)
    new = add_ops(old, model, 2, g, t, tmp_path / "new.json")
    assert not new.has_sustained and t.sustained_calls == []
    assert new.latency.equals(full.latency)
    # a non-leader rank measures the same points and writes nothing
    rank1 = FakeTimer(seed)
    add_ops(old, model, 2, g, rank1, tmp_path / "rank1.json", leader=False)
    assert rank1.solo_calls == t.solo_calls and not (tmp_path / "rank1.json").exists()


class _ClockedTimer(FakeTimer):
    """A FakeTimer that also reports an SM clock per point, as the GPU timer does."""

    def solo(self, num_sms, points, tick):
        return [(x, 1700.0 + num_sms) for x in super().solo(num_sms, points, tick)]


def _schedule_profile_hashes() -> dict[str, set[str]]:
    root = Path(nfsearch.__file__).resolve().parents[1]
    out: dict[str, set[str]] = {}
    for path in (root / "schedules").glob("*.yaml"):
        prof = (yaml.safe_load(path.read_text()).get("metadata") or {}).get("profile") or {}
        if prof.get("path"):
            out.setdefault(prof["path"], set()).add(prof["hash"])
    return out


def test_shipped_tp_profiles_load_unchanged_and_take_the_gather_ops(tmp_path) -> None:
    """The shipped TP profiles hold the gather ops (added with --add-ops in session 11); stripped of
    them, as they were measured before, --add-ops puts them back and keeps every other row."""
    root = Path(nfsearch.__file__).resolve().parents[1]
    paths = sorted(p for p in (root / "profiles").glob("*/*-tp*.json") if not p.stem.endswith("-tp1"))
    assert paths, "no shipped TP profile"
    hashes = _schedule_profile_hashes()
    for shipped in paths:
        full = load_profile(shipped)
        assert full.canonical_bytes() == shipped.read_bytes()  # validates and saves back byte for byte
        rel = str(shipped.relative_to(root))
        if rel in hashes:
            assert hashes[rel] == {full.hash}, rel  # the schedules solved on it still name it
        model = resolve_model(full.meta.model)
        assert missing_ops(full, model, full.meta.tp) == ()
        prof = _without(full, GATHER_OPS)
        path = save_profile(prof, tmp_path / f"old-{shipped.name}")
        assert missing_ops(prof, model, prof.meta.tp) == GATHER_OPS
        # held against the profile's own heater (the layer for mixtral TP 2, the GEMMs for llama3-70b TP 4)
        base = profile_heat(prof, model, prof.meta.tp, quick_grid(132, 8, 8, 120), resolve_gpu(prof.meta.gpu),
                            None, DEFAULT_HEAT)
        assert heat_label(base) == note_heat(prof.meta.notes)
        g = add_ops_grid(prof, model, prof.meta.tp, base)
        t = _ClockedTimer(random.randrange(1 << 30))
        t.scale.update({op: 1.0 for op in profiled_ops(model, prof.meta.tp)})
        out = tmp_path / f"new-{shipped.name}"
        new = add_ops(prof, model, prof.meta.tp, g, t, out)
        for table in ("latency", "sustained"):  # every old row saved byte for byte, in order
            kept = [r for r in _rows(out, table) if json.loads(r)[0] not in GATHER_OPS]
            assert kept == _rows(path, table), (path, table)
        for op in GATHER_OPS:
            assert new.token_grid(op) == prof.token_grid("o_proj") and new.sm_grid() == prof.sm_grid()
        assert new.has_clocks and (new.latency["sm_clock_mhz"] > 0).all()
        # o_proj_col's factors follow the table's rule: equal on the partitions, times its offset on all SMs
        col = new.sustained[new.sustained["op"] == "o_proj_col"]
        full = col[col["num_sms"] == 132]["factor"].to_numpy()
        part = col[col["num_sms"] < 132].groupby("tokens")["factor"].agg(["min", "max"])
        assert (part["min"] == part["max"]).all()
        assert full == pytest.approx(part["min"].to_numpy() * table_offset(prof.sustained), abs=1e-4)


def test_add_ops_command_under_tp(tmp_path, monkeypatch, capsys) -> None:
    """`nfsearch profile --tp 2 --add-ops`, as each torchrun rank runs it (no GPU here: CUDA, the
    TP group and the timer are faked): rank 0 reads --profile and writes --out, rank 1 measures the
    same points and writes nothing."""
    import sys
    import types

    torch = pytest.importorskip("torch")
    import nfrt.tp

    import nfsearch.launch

    seed = random.randrange(1 << 30)
    full, _, _ = _tp2_profile(tmp_path, seed)
    old = tmp_path / "old.json"
    save_profile(_without(full, GATHER_OPS), old)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d=0: types.SimpleNamespace(multi_processor_count=132, major=9))
    monkeypatch.setattr(nfsearch.launch, "relaunch", lambda tp, argv=None: None)  # inside torchrun
    timers: list[FakeTimer] = []

    def fake_timer(model, tp, grid, device=0, group=None):
        assert tp == 2 and group is not None and grid.tokens == full.token_grid("o_proj")
        timers.append(FakeTimer(seed))
        return timers[-1]

    monkeypatch.setitem(sys.modules, "nfsearch.profiler.measure", types.SimpleNamespace(GpuTimer=fake_timer))
    out = tmp_path / "new.json"
    argv = ["profile", "--model", "tiny-llama", "--tp", "2", "--quick", "--add-ops", "--profile", str(old),
            "--out", str(out)]
    for rank in (1, 0):
        group = types.SimpleNamespace(rank=rank, size=2, device=types.SimpleNamespace(index=rank),
                                      close=lambda: None, barrier=lambda: None)
        monkeypatch.setattr(nfrt.tp.TPGroup, "from_env", staticmethod(lambda kind, g=group: g))
        assert main(argv) == 0
        assert out.exists() == (rank == 0)
    assert timers[0].solo_calls == timers[1].solo_calls == sorted(full.sm_grid(), reverse=True)
    said = capsys.readouterr().out
    assert said.count("wrote ") == 1 and "of attn_allgather, o_proj_col, o_allgather" in said
    new = load_profile(out)
    assert new.latency.equals(full.latency) and _rows(old, "interference") == _rows(out, "interference")
    # again: nothing to add, a one-line error before any timer is built
    assert main(argv[:-4] + ["--profile", str(out)]) == 2
    assert "already has every layer op" in capsys.readouterr().err and len(timers) == 2
    assert main(argv + ["--add-sustained"]) == 2
    assert "--add-ops does not combine with --add-sustained" in capsys.readouterr().err
