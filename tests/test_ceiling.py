"""nfsearch.ceiling: the overlap ceiling's linear program, on instances with known optima and against
OR-Tools' LP solver on fresh random instances; the recorded ceilings re-derived from their measurements."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nfsearch.ceiling import SplitRate, best_mix, overlap_ceiling
from nfsearch.errors import NfsearchError

RUNS = Path(__file__).resolve().parent.parent / "benchmarks" / "runs"


def test_perfect_split_takes_the_longer_unit() -> None:
    # both units at full speed side by side: the pair takes max(C, M)
    mix = best_mix(100.0, 50.0, [SplitRate(88, 32, 100.0, 50.0)])
    assert mix.time_us == pytest.approx(100.0)
    assert [n for n, _ in mix.modes] == ["split 88/32"]


def test_split_without_gain_leaves_the_sequential_pair() -> None:
    # a + b = 1: side by side is exactly as fast as one after the other, no better
    mix = best_mix(100.0, 50.0, [SplitRate(88, 32, 200.0, 100.0)])
    assert mix.time_us == pytest.approx(150.0)


def test_split_then_compute_alone() -> None:
    # the split finishes the memory unit in 120 us with 0.8 of the compute unit done; 20 us alone
    mix = best_mix(100.0, 50.0, [SplitRate(88, 32, 150.0, 120.0)])
    assert mix.time_us == pytest.approx(140.0)
    assert dict(mix.modes) == pytest.approx({"compute alone": 20.0, "split 88/32": 120.0})


def _glop(c_us: float, m_us: float, splits: list[SplitRate]) -> float:
    pywraplp = pytest.importorskip("ortools.linear_solver.pywraplp")
    lp = pywraplp.Solver.CreateSolver("GLOP")
    rates = [(1 / c_us, 0.0), (0.0, 1 / m_us)] + [(1 / s.tc_us, 1 / s.tm_us) for s in splits]
    y = [lp.NumVar(0.0, lp.infinity(), f"y{i}") for i in range(len(rates))]
    lp.Add(sum(v * r[0] for v, r in zip(y, rates, strict=True)) >= 1)
    lp.Add(sum(v * r[1] for v, r in zip(y, rates, strict=True)) >= 1)
    lp.Minimize(sum(y))
    assert lp.Solve() == pywraplp.Solver.OPTIMAL
    return lp.Objective().Value()


@pytest.mark.parametrize("seed", range(40))
def test_best_mix_is_the_lp_optimum(seed: int) -> None:
    rng = random.Random(seed)
    c_us, m_us = rng.uniform(100, 2000), rng.uniform(100, 2000)
    splits = []
    for cs in rng.sample(range(8, 128, 8), rng.randint(1, 8)):
        # a split runs each unit 1x-3x slower than alone on all SMs (a + b from 0.67 to 2)
        splits.append(SplitRate(cs, 128 - cs, c_us * rng.uniform(1.0, 3.0), m_us * rng.uniform(1.0, 3.0)))
    mix = best_mix(c_us, m_us, splits)
    assert mix.time_us == pytest.approx(_glop(c_us, m_us, splits), rel=1e-7)
    assert mix.time_us == pytest.approx(sum(t for _, t in mix.modes), rel=1e-9)
    # the modes it names do both units
    by_name = {s.name: s for s in splits}
    done_c = sum(t / (c_us if n == "compute alone" else by_name[n].tc_us) for n, t in mix.modes
                 if n != "memory alone")
    done_m = sum(t / (m_us if n == "memory alone" else by_name[n].tm_us) for n, t in mix.modes
                 if n != "compute alone")
    assert done_c >= 1 - 1e-9 and done_m >= 1 - 1e-9


def test_ceilings_and_bad_input() -> None:
    ceil = overlap_ceiling(100.0, 50.0, 10.0, 150.0, [SplitRate(88, 32, 150.0, 120.0)])
    assert ceil.cm == pytest.approx(150 / 140)
    assert ceil.other_serial == pytest.approx(160 / 150)
    assert ceil.other_free == pytest.approx(160 / 140)
    with pytest.raises(NfsearchError, match="tc_us"):
        SplitRate(88, 32, 0.0, 1.0)
    with pytest.raises(NfsearchError, match="compute_sms"):
        SplitRate(0, 32, 1.0, 1.0)
    with pytest.raises(NfsearchError, match="c_us"):
        best_mix(-1.0, 5.0, [])
    with pytest.raises(NfsearchError, match="other_us"):
        overlap_ceiling(1.0, 1.0, -1.0, 2.0, [])


@pytest.mark.parametrize("path", sorted(RUNS.glob("ceiling-*.json")), ids=lambda p: p.name)
def test_recorded_ceilings_follow_from_their_measurements(path: Path) -> None:
    d = json.loads(path.read_text())
    splits = [SplitRate(s["compute_sms"], s["memory_sms"], s["tc_us"], s["tm_us"]) for s in d["splits"]]
    ceil = overlap_ceiling(d["c_us"], d["m_us"], d["other_us"], d["seq_pair_us"], splits)
    assert ceil.mix.time_us == pytest.approx(d["best_us"], rel=1e-9)
    assert ceil.other_serial == pytest.approx(d["ceiling_layer_other_serial"], rel=1e-9)


# ---- nfsearch ceiling: the units of a schedule's batch, the CLI's errors --------------------------

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"


def test_units_of_a_dense_and_a_moe_schedule() -> None:
    from nfrt.schedule import load_schedule

    from nfsearch.ceiling_measure import units

    c, m, o = units(load_schedule(SCHEDULES / "llama3-8b-h100-sxm-tp1-splitwise.yaml"))
    assert c == [("qkv_proj", 2048, 0), ("attn_prefill", 1728, 1540), ("o_proj", 2048, 0),
                 ("gate_up", 2048, 0), ("down", 2048, 0)]
    assert m == [("attn_decode", 320, 1261)]
    assert [n for n, *_ in o] == ["input_norm", "rope", "kv_append", "post_norm", "silu_mul"]
    c, m, o = units(load_schedule(SCHEDULES / "mixtral-8x7b-h200-tp1-splitwise.yaml"))
    assert {"router", "expert_gate_up", "expert_down", "attn_prefill"} <= {n for n, *_ in c}
    assert m == [("attn_decode", 192, 1261)]
    assert all(t == 1216 for n, t, _ in c + o if n != "attn_prefill")


def test_units_need_decode_attention() -> None:
    from nfrt.config import BatchComposition
    from schedules_util import nano_schedule

    from nfsearch.ceiling_measure import units
    from nfsearch.models import resolve_model

    prefill_only = nano_schedule(resolve_model("tiny-llama"), BatchComposition(256, 0, 256, 0, 32),
                                 (0, 128, 256), num_sms=132, sizes=(100, 32))
    with pytest.raises(NfsearchError, match="decode attention to overlap"):
        units(prefill_only)


def test_ceiling_cli_errors_are_one_line(capsys) -> None:
    torch = pytest.importorskip("torch")
    from nfsearch.cli import main

    cases = [(["--schedule", str(SCHEDULES / "llama3-70b-h200-tp4-splitwise.yaml")], "one GPU only"),
             (["--schedule", str(SCHEDULES / "nope.yaml")], "nope.yaml"),
             (["--schedule", "x.yaml", "--seconds", "0"], "--seconds must be positive")]
    if not torch.cuda.is_available():
        one_gpu = str(SCHEDULES / "llama3-8b-h200-tp1-splitwise.yaml")
        cases.append((["--schedule", one_gpu], "needs a CUDA GPU"))
    for argv, want in cases:
        assert main(["ceiling", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert want in err and "\n" not in err and err.startswith("nfsearch: error:")


def test_ceiling_record_path() -> None:
    from nfsearch.ceiling_measure import record_path

    rec = {"date": "2026-11-21T16:43:05Z", "model": "llama3-8b", "gpu": "NVIDIA H100 80GB HBM3",
           "workload": "const:1024:512"}
    want = "ceiling-llama3-8b-h100-sxm-const-1024-512-20261121T164305Z.json"
    assert record_path("runs", rec) == Path("runs") / want
    unknown = record_path("runs", {**rec, "gpu": "Some GPU 9000"})
    assert unknown.name == "ceiling-llama3-8b-Some-GPU-9000-const-1024-512-20261121T164305Z.json"
