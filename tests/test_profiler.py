"""The profiler's CPU side: grids, the resumable loop with a fake timer, the no-GPU error, plots."""

from __future__ import annotations

import json
import random

import pytest

from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.gpus import partition_sizes, resolve_gpu
from nfsearch.models import resolve_model
from nfsearch.opgraph import layer_ops, op_tokens, tail_ops
from nfsearch.profile import load_profile, shipped_profile_path
from nfsearch.profiler.grid import (
    ProfileGrid,
    full_grid,
    grid_point_count,
    interference_ops,
    op_points,
    profiled_ops,
    quick_grid,
    split_pairs,
)
from nfsearch.profiler.plot import latency_spread, pr_curves
from nfsearch.profiler.run import aggregate_interference, partial_path, run_profile
from nfsearch.workload import compose_batch, parse_workload


class FakeTimer:
    """Deterministic latencies from a random per-op scale; can crash after `crash_after` SM sizes."""

    def __init__(self, seed: int, crash_after: int | None = None) -> None:
        rng = random.Random(seed)
        self.scale = {op: rng.uniform(0.5, 2.0) for op in profiled_ops(resolve_model("mixtral"))}
        self.scale.update({op: rng.uniform(0.5, 2.0) for op in profiled_ops(resolve_model("llama3-8b"))})
        self.slow = rng.uniform(1.02, 1.3)
        self.crash_after = crash_after
        self.solo_calls: list[int] = []
        self.corun_calls: list[int] = []
        self.ceiling_calls = 0

    def stamp(self):
        return {"gpu_name": "NVIDIA H200", "num_sms": 132, "driver": "580", "cuda": "13.0",
                "torch": "2.11", "triton": "3.6"}

    def ceilings(self):
        self.ceiling_calls += 1
        return {"peak_tflops": 790.0, "hbm_gbps": 4260.0}

    def latency(self, op: str, t: int, c: int, s: int) -> float:
        return self.scale[op] * (3.0 + t * (1 + c / 64) * 0.01 * 132 / s)

    def solo(self, num_sms, points, tick):
        if self.crash_after is not None and len(self.solo_calls) >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.solo_calls.append(num_sms)
        tick(len(points))
        return [self.latency(op, t, c, num_sms) for op, t, c in points]

    def corun(self, memory_sms, compute_sms, compute_ops, memory_ops, tick):
        self.corun_calls.append(memory_sms)
        tick(len(compute_ops) * len(memory_ops))
        return [(c, m, compute_sms, memory_sms, self.slow * (1 + 0.1 * memory_sms / 132), 0.99,
                 self.scale[c], self.scale[m]) for c in compute_ops for m in memory_ops]

    def describe(self):
        return "fake timer."


def _args(model: str, grid: ProfileGrid):
    return dict(model=resolve_model(model), tp=1, grid=grid, gpu_slug="h200", sm_granularity=8,
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


def test_grid_validates() -> None:
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
    # an exact grid point reads back the timer's value
    assert prof.latency_us("expert_down", 1024, 0, 48) == pytest.approx(t.latency("expert_down", 1024, 0, 48),
                                                                       abs=1e-4)
    # interference: clamped at 1.0 (memory got 0.99), extended to the SM grid's ends
    assert prof.slowdown("memory", "compute", 8) == 1.0 and prof.slowdown("memory", "compute", 132) == 1.0
    assert prof.slowdown("compute", "memory", 32) > 1.0
    assert "clamped" in prof.meta.notes
    _assert_covers_solve(prof, "mixtral")


def _assert_covers_solve(prof, model_name: str) -> None:
    """Every lookup `nfsearch solve` makes (ops x 64-token granules x SM sizes, built-in workloads)."""
    model = resolve_model(model_name)
    for wl in ("splitwise", "lmsys", "sharegpt", "const:512:128"):
        batch = compose_batch(model, parse_workload(wl), resolve_gpu("h200"), round_to=64).batch
        for op in layer_ops(model) + tail_ops(model):
            ctx = op_tokens(op, batch)[1]
            for n in range(1, batch.dense_batch // 64 + 1):
                for s in (8, 12, 64, 124, 132):
                    assert prof.latency_us(op.name, n * 64, ctx, s) > 0
        for s in partition_sizes(resolve_gpu("h200")):
            assert prof.slowdown("compute", "memory", s) >= 1.0


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
