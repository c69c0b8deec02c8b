"""nfsearch.ceiling: the overlap ceiling's linear program, on instances with known optima and against
OR-Tools' LP solver on fresh random instances; the recorded ceilings re-derived from their measurements."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nfsearch.ceiling import (
    Mode,
    PairRate,
    SplitRate,
    TripleRate,
    UnitRate,
    best_mix,
    network_ceiling,
    other_ceiling,
    overlap_ceiling,
    solve_mix,
    three_way_modes,
)
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
    if "n_us" in d:  # tensor parallel: three units
        ceil = network_ceiling(d["c_us"], d["m_us"], d["n_us"], d["other_us"], d["seq_us"],
                               [PairRate(**p) for p in d["pairs"]],
                               [UnitRate(**a) for a in d["alone_partition"]], d["top_sms"])
        assert ceil.mix.time_us == pytest.approx(d["best_us"], rel=1e-9)
        assert ceil.other_serial == pytest.approx(d["ceiling_layer_other_serial"], rel=1e-9)
        return
    splits = [SplitRate(s["compute_sms"], s["memory_sms"], s["tc_us"], s["tm_us"]) for s in d["splits"]]
    ceil = overlap_ceiling(d["c_us"], d["m_us"], d["other_us"], d["seq_pair_us"], splits)
    assert ceil.mix.time_us == pytest.approx(d["best_us"], rel=1e-9)
    assert ceil.other_serial == pytest.approx(d["ceiling_layer_other_serial"], rel=1e-9)
    if "other_unit_ceiling" in d:  # the other ops as a third unit
        o = d["other_unit_ceiling"]
        oc = other_ceiling(d["c_us"], d["m_us"], o["o_us"], o["seq_layer_us"], splits,
                           [PairRate(**p) for p in o["pairs"]], [TripleRate(**t) for t in o["triples"]])
        assert oc.mix.time_us == pytest.approx(o["best_us"], rel=1e-9)
        assert oc.layer == pytest.approx(o["ceiling_layer"], rel=1e-9)
        assert oc.mix.time_us <= (ceil.mix.time_us + d["other_us"]) * (1 + 1e-9)  # O alone is a mode


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

    cases = [(["--schedule", str(SCHEDULES / "nope.yaml")], "nope.yaml"),
             (["--schedule", "x.yaml", "--seconds", "0"], "--seconds must be positive")]
    tp4 = str(SCHEDULES / "llama3-70b-h200-tp4-splitwise.yaml")
    if not torch.cuda.is_available():
        one_gpu = str(SCHEDULES / "llama3-8b-h200-tp1-splitwise.yaml")
        cases += [(["--schedule", one_gpu], "needs a CUDA GPU"), (["--schedule", tp4], "needs a CUDA GPU")]
    elif torch.cuda.device_count() < 4:
        cases.append((["--schedule", tp4], "--tp 4 needs 4 CUDA GPUs"))
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
    tp4 = record_path("runs", {**rec, "model": "llama3-70b", "gpu": "NVIDIA H200", "tp": 4})
    assert tp4.name == "ceiling-llama3-70b-h200-tp4-const-1024-512-20261121T164305Z.json"


# ---- three units: compute, memory, network (tensor parallelism) -----------------------------------

def _glop_modes(modes: list[Mode]) -> float:
    pywraplp = pytest.importorskip("ortools.linear_solver.pywraplp")
    lp = pywraplp.Solver.CreateSolver("GLOP")
    y = [lp.NumVar(0.0, lp.infinity(), f"y{i}") for i in range(len(modes))]
    for u in ("compute", "memory", "network", "other"):
        if any(m.rate(u) > 0 for m in modes):
            lp.Add(sum(v * m.rate(u) for v, m in zip(y, modes, strict=True)) >= 1)
    lp.Minimize(sum(y))
    assert lp.Solve() == pywraplp.Solver.OPTIMAL
    return lp.Objective().Value()


def _check_mix_does_every_unit(mix, modes: list[Mode]) -> None:
    by_name = {m.name: m for m in modes}
    assert mix.time_us == pytest.approx(sum(t for _, t in mix.modes), rel=1e-9)
    assert all(t > 0 for _, t in mix.modes) and len(mix.modes) <= 3
    for u in ("compute", "memory", "network", "other"):
        if any(m.rate(u) > 0 for m in modes):
            assert sum(t * by_name[n].rate(u) for n, t in mix.modes) >= 1 - 1e-7


@pytest.mark.parametrize("seed", range(30))
def test_solve_mix_is_the_lp_optimum_on_random_modes(seed: int) -> None:
    rng = random.Random(seed)
    units = ("compute", "memory", "network")[: rng.choice((2, 3, 3))]
    alone = {u: rng.uniform(50, 2000) for u in units}
    modes = [Mode(f"{u} alone", ((u, us),)) for u, us in alone.items()]
    for k in range(rng.randint(1, 25)):  # any subset of the units, each 1x-4x slower than alone
        sub = rng.sample(units, rng.randint(2, len(units)))
        modes.append(Mode(f"m{k}", tuple((u, alone[u] * rng.uniform(1.0, 4.0)) for u in sub)))
    mix = solve_mix(modes)
    assert mix.time_us == pytest.approx(_glop_modes(modes), rel=1e-7)
    _check_mix_does_every_unit(mix, modes)


@pytest.mark.parametrize("seed", range(40))
def test_solve_mix_equals_best_mix_on_two_units(seed: int) -> None:
    rng = random.Random(1000 + seed)
    c_us, m_us = rng.uniform(100, 2000), rng.uniform(100, 2000)
    splits = [SplitRate(cs, 128 - cs, c_us * rng.uniform(1.0, 3.0), m_us * rng.uniform(1.0, 3.0))
              for cs in rng.sample(range(8, 128, 8), rng.randint(0, 8))]
    modes = [Mode("compute alone", (("compute", c_us),)), Mode("memory alone", (("memory", m_us),))]
    modes += [Mode(s.name, (("compute", s.tc_us), ("memory", s.tm_us))) for s in splits]
    assert solve_mix(modes).time_us == pytest.approx(best_mix(c_us, m_us, splits).time_us, rel=1e-9)


def _random_tp_instance(rng: random.Random, top: int = 120):
    c_us, m_us, n_us = rng.uniform(500, 1500), rng.uniform(100, 600), rng.uniform(100, 600)
    alone_all = {"compute": c_us, "memory": m_us, "network": n_us}
    pairs, solo = [], {}

    def on(u: str, s: int) -> float:  # alone on s SMs: slower than on all 132, the network least so
        return solo.setdefault((u, s), alone_all[u] * (132 / s) ** (0.2 if u == "network" else 0.9)
                               * rng.uniform(1.0, 1.2))

    for cs in rng.sample(range(40, top - 7, 8), rng.randint(1, 6)):
        pairs.append(PairRate("compute", "memory", cs, top - cs, on("compute", cs) * rng.uniform(1, 1.5),
                              on("memory", top - cs) * rng.uniform(1, 1.5)))
    for b in ("compute", "memory"):
        for ns in rng.sample((8, 16, 24, 32), rng.randint(1, 4)):
            pairs.append(PairRate(b, "network", top - ns, ns, on(b, top - ns) * rng.uniform(1, 1.5),
                                  on("network", ns) * rng.uniform(1, 1.5)))
    alone = [UnitRate(u, s, us) for (u, s), us in solo.items()]
    return c_us, m_us, n_us, pairs, alone


@pytest.mark.parametrize("seed", range(25))
def test_network_ceiling_is_the_lp_optimum(seed: int) -> None:
    rng = random.Random(2000 + seed)
    top = 120
    c_us, m_us, n_us, pairs, alone = _random_tp_instance(rng, top)
    other_us, seq_us = rng.uniform(0, 200), (c_us + m_us + n_us) * rng.uniform(0.95, 1.05)
    ceil = network_ceiling(c_us, m_us, n_us, other_us, seq_us, pairs, alone, top)
    measured = [Mode("compute alone", (("compute", c_us),)), Mode("memory alone", (("memory", m_us),)),
                Mode("network alone", (("network", n_us),)), *(p.mode for p in pairs)]
    three = three_way_modes(alone, top)
    assert ceil.mix.time_us == pytest.approx(_glop_modes(measured + three), rel=1e-7)
    assert ceil.pairs_mix.time_us == pytest.approx(_glop_modes(measured), rel=1e-7)
    _check_mix_does_every_unit(ceil.mix, measured + three)
    # more modes can only help; doing the units one after the other is always a mix
    assert ceil.mix.time_us <= ceil.pairs_mix.time_us * (1 + 1e-9) <= (c_us + m_us + n_us) * (1 + 1e-9)
    assert ceil.units == pytest.approx(seq_us / ceil.mix.time_us)
    assert ceil.other_serial == pytest.approx((seq_us + other_us) / (ceil.mix.time_us + other_us))
    assert ceil.other_free >= ceil.other_serial
    d = ceil.to_dict()
    assert json.loads(json.dumps(d)) == d and d["ceiling_units"] == ceil.units
    for m in three:  # every three-way mode fills the placed SMs, each unit at its rate alone there
        c, mem, n = (int(x) for x in m.name.split()[1].split("/"))
        assert c + mem + n == top
        rates = {(a.unit, a.num_sms): a.us for a in alone}
        assert dict(m.unit_us) == {"compute": rates["compute", c], "memory": rates["memory", mem],
                                   "network": rates["network", n]}


def test_three_pairs_each_perfect_share_the_work() -> None:
    # each pair runs both its units at full speed: half of each pair does one of every unit
    pairs = [PairRate("compute", "memory", 88, 32, 100.0, 100.0),
             PairRate("compute", "network", 104, 16, 100.0, 100.0),
             PairRate("memory", "network", 104, 16, 100.0, 100.0)]
    ceil = network_ceiling(100.0, 100.0, 100.0, 0.0, 300.0, pairs, [], 120)
    assert ceil.mix.time_us == pytest.approx(150.0)
    assert dict(ceil.mix.modes) == pytest.approx({p.mode.name: 50.0 for p in pairs})
    assert ceil.units == pytest.approx(2.0)


def test_perfect_three_way_split_and_pairs_without_gain() -> None:
    # pairs as fast as one after the other; a three-way split that does each unit in 100 us
    pairs = [PairRate("compute", "memory", 80, 40, 180.0, 180.0),
             PairRate("compute", "network", 104, 16, 180.0, 180.0)]
    alone = [UnitRate("compute", 80, 100.0), UnitRate("memory", 24, 100.0), UnitRate("network", 16, 100.0),
             UnitRate("memory", 40, 60.0)]
    ceil = network_ceiling(90.0, 90.0, 90.0, 30.0, 270.0, pairs, alone, 120)
    assert ceil.pairs_mix.time_us == pytest.approx(270.0)
    assert ceil.mix.time_us == pytest.approx(100.0)
    assert [n for n, _ in ceil.mix.modes] == ["3-way 80/24/16 (alone rates)"]
    assert ceil.other_serial == pytest.approx(300 / 130)
    assert ceil.other_free == pytest.approx(300 / 100)


def test_compute_network_overlap_then_memory_alone() -> None:
    pairs = [PairRate("compute", "network", 104, 16, 300.0, 100.0)]
    ceil = network_ceiling(300.0, 50.0, 100.0, 0.0, 450.0, pairs, [], 120)
    assert ceil.mix.time_us == pytest.approx(350.0)
    assert dict(ceil.mix.modes) == pytest.approx({"compute|network 104/16": 300.0, "memory alone": 50.0})


def test_three_way_modes_only_where_all_three_were_measured() -> None:
    alone = [UnitRate("compute", 80, 1.0), UnitRate("compute", 88, 1.0), UnitRate("compute", 96, 1.0),
             UnitRate("memory", 24, 1.0), UnitRate("memory", 16, 1.0), UnitRate("memory", 8, 1.0),
             UnitRate("network", 16, 1.0)]
    assert sorted(m.name for m in three_way_modes(alone, 120)) == [
        "3-way 80/24/16 (alone rates)", "3-way 88/16/16 (alone rates)", "3-way 96/8/16 (alone rates)"]
    assert three_way_modes(alone[:3], 120) == []


def test_three_unit_bad_input() -> None:
    bad = [(lambda: Mode("x", ()), "advances no unit"),
           (lambda: Mode("x", (("disk", 1.0),)), "one of compute, memory, network"),
           (lambda: Mode("x", (("compute", 1.0), ("compute", 2.0))), "names a unit twice"),
           (lambda: Mode("x", (("compute", 0.0),)), "compute us of mode"),
           (lambda: PairRate("memory", "memory", 8, 8, 1.0, 1.0), "two units"),
           (lambda: PairRate("compute", "network", 0, 8, 1.0, 1.0), "bottom_sms"),
           (lambda: PairRate("compute", "network", 8, 8, 1.0, float("nan")), "top_us"),
           (lambda: UnitRate("network", True, 1.0), "num_sms"),
           (lambda: UnitRate("gpu", 8, 1.0), "unit must be one of"),
           (lambda: solve_mix([]), "no modes"),
           (lambda: three_way_modes([], 0), "top_sms"),
           (lambda: network_ceiling(1.0, 1.0, -1.0, 0.0, 3.0, [], [], 120), "n_us"),
           (lambda: network_ceiling(1.0, 1.0, 1.0, -1.0, 3.0, [], [], 120), "other_us")]
    for make, want in bad:
        with pytest.raises(NfsearchError, match=want):
            make()


def test_units_of_a_tp4_schedule() -> None:
    from nfrt.schedule import load_schedule

    from nfsearch.ceiling_measure import tp_units, units

    sched = load_schedule(SCHEDULES / "llama3-70b-h200-tp4-splitwise.yaml")
    c, m, n, o = tp_units(sched)
    assert n == [("attn_allreduce", 2048, 0), ("mlp_allreduce", 2048, 0)]
    assert c == [("qkv_proj", 2048, 0), ("attn_prefill", 1728, 1540), ("o_proj", 2048, 0),
                 ("gate_up", 2048, 0), ("down", 2048, 0)]
    assert m == [("attn_decode", 320, 1261)]
    assert [x for x, *_ in o] == ["input_norm", "rope", "kv_append", "post_norm", "silu_mul"]
    with pytest.raises(NfsearchError, match="tp_units"):
        units(sched)
    with pytest.raises(NfsearchError, match="tp > 1"):
        tp_units(load_schedule(SCHEDULES / "llama3-8b-h200-tp1-splitwise.yaml"))


def test_tp_units_need_decode_attention() -> None:
    from dataclasses import replace

    from nfrt.config import BatchComposition
    from nfrt.schedule import Schedule, load_schedule

    from nfsearch.ceiling_measure import tp_units

    sched = load_schedule(SCHEDULES / "llama3-70b-h200-tp4-splitwise.yaml")
    b = BatchComposition(512, 0, 512, 0, 256)
    prefill_only = Schedule.sequential(replace(sched.metadata, batch=b, dense_batch=512), sched.layer)
    with pytest.raises(NfsearchError, match="and all-reduces"):
        tp_units(prefill_only)


def test_tp_schedule_relaunches_under_torchrun(monkeypatch, tmp_path) -> None:
    pytest.importorskip("torch")
    import nfsearch.ceiling_measure as cm
    import nfsearch.launch
    from nfsearch.cli import main

    calls = []
    monkeypatch.setattr(cm, "require_cuda", lambda command="bench": None)
    monkeypatch.setattr(nfsearch.launch, "relaunch", lambda tp, argv=None: calls.append((tp, argv)) or 7)
    tp4 = str(SCHEDULES / "llama3-70b-h200-tp4-splitwise.yaml")
    argv = ["ceiling", "--schedule", tp4, "--seconds", "0.2", "--out", str(tmp_path)]
    assert main(argv) == 7  # the exit code of the tp processes
    assert calls == [(4, argv)]
    # a tp-1 schedule measures in this process
    fake = {"date": "2026-11-21T16:43:05Z", "model": "llama3-8b", "gpu": "NVIDIA H200", "workload": "w"}
    monkeypatch.setattr(cm, "measure", lambda cfg, log=print: dict(fake, seconds=cfg.seconds))
    assert main(["ceiling", "--schedule", str(SCHEDULES / "llama3-8b-h200-tp1-splitwise.yaml"),
                 "--seconds", "0.3", "--out", str(tmp_path)]) == 0
    assert len(calls) == 1
    (written,) = tmp_path.iterdir()
    assert json.loads(written.read_text())["seconds"] == 0.3


def test_tp_schedule_inside_a_torchrun_of_another_size(monkeypatch, capsys) -> None:
    pytest.importorskip("torch")
    import nfsearch.ceiling_measure as cm
    from nfsearch.cli import main

    monkeypatch.setattr(cm, "require_cuda", lambda command="bench": None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["ceiling", "--schedule", str(SCHEDULES / "llama3-70b-h200-tp4-splitwise.yaml")]) == 2
    assert "--tp 4, but torchrun started 2 processes" in capsys.readouterr().err


# ---- the other ops as a third unit on one GPU -----------------------------------------------------

def _random_other_instance(rng: random.Random, top: int = 120):
    c_us, m_us, o_us = rng.uniform(500, 1500), rng.uniform(100, 600), rng.uniform(30, 200)
    alone = {"compute": c_us, "memory": m_us, "other": o_us}

    def on(u: str, s: int) -> float:  # on s SMs beside others: slower than alone on all 132
        return alone[u] * (132 / s) ** (0.9 if u == "compute" else 0.5) * rng.uniform(1.0, 1.5)

    splits = [SplitRate(cs, top - cs, on("compute", cs), on("memory", top - cs))
              for cs in rng.sample(range(40, top - 7, 8), rng.randint(1, 6))]
    pairs = [PairRate(b, "other", top - o, o, on(b, top - o), on("other", o))
             for b in ("compute", "memory") for o in rng.sample((8, 16, 24, 32, 48), rng.randint(1, 5))]
    triples = [TripleRate(c, o, top - c - o, on("compute", c), on("other", o), on("memory", top - c - o))
               for c in rng.sample(range(40, 97, 8), rng.randint(0, 4)) for o in (8, 16)]
    return c_us, m_us, o_us, splits, pairs, triples


@pytest.mark.parametrize("seed", range(25))
def test_other_ceiling_is_the_lp_optimum(seed: int) -> None:
    rng = random.Random(3000 + seed)
    c_us, m_us, o_us, splits, pairs, triples = _random_other_instance(rng)
    seq_us = (c_us + m_us + o_us) * rng.uniform(0.95, 1.05)
    oc = other_ceiling(c_us, m_us, o_us, seq_us, splits, pairs, triples)
    modes = [Mode("compute alone", (("compute", c_us),)), Mode("memory alone", (("memory", m_us),)),
             Mode("other alone", (("other", o_us),)),
             *(Mode(s.name, (("compute", s.tc_us), ("memory", s.tm_us))) for s in splits),
             *(p.mode for p in pairs), *(t.mode for t in triples)]
    assert oc.mix.time_us == pytest.approx(_glop_modes(modes), rel=1e-7)
    _check_mix_does_every_unit(oc.mix, modes)
    pair = overlap_ceiling(c_us, m_us, o_us, seq_us, splits)
    assert oc.mix.time_us <= (pair.mix.time_us + o_us) * (1 + 1e-9)  # O alone is one of its modes
    assert oc.layer == pytest.approx(seq_us / oc.mix.time_us)
    d = oc.to_dict()
    assert json.loads(json.dumps(d)) == d and d["ceiling_layer"] == oc.layer
    assert [TripleRate(**t) for t in d["triples"]] == triples


def test_other_ops_hidden_beside_compute() -> None:
    # the other ops on 16 SMs beside compute on 104 cost compute nothing: O is hidden entirely
    pairs = [PairRate("compute", "other", 104, 16, 100.0, 50.0)]
    oc = other_ceiling(100.0, 100.0, 50.0, 250.0, [], pairs, [])
    assert oc.mix.time_us == pytest.approx(200.0)  # 100 of compute|other, then memory alone
    assert dict(oc.mix.modes) == pytest.approx({"compute|other 104/16": 100.0, "memory alone": 100.0})
    # with a split that runs memory at full speed beside compute at half: half of each
    oc = other_ceiling(100.0, 100.0, 50.0, 250.0, [SplitRate(88, 32, 200.0, 100.0)], pairs, [])
    assert dict(oc.mix.modes) == pytest.approx({"split 88/32": 100.0, "compute|other 104/16": 50.0})
    # a three-way split that runs all three at full speed beats both
    oc = other_ceiling(100.0, 100.0, 50.0, 250.0, [SplitRate(88, 32, 200.0, 100.0)], pairs,
                       [TripleRate(88, 8, 24, 100.0, 50.0, 100.0)])
    assert dict(oc.mix.modes) == pytest.approx({"3-way 88/8/24": 100.0})
    assert oc.layer == pytest.approx(2.5)
    # beside memory, each half as fast: no mode beats one after the other
    slow = [PairRate("memory", "other", 104, 16, 200.0, 100.0)]
    oc = other_ceiling(100.0, 100.0, 50.0, 250.0, [], slow, [])
    assert oc.mix.time_us == pytest.approx(250.0) and oc.layer == pytest.approx(1.0)


def test_other_ceiling_bad_input() -> None:
    bad = [(lambda: other_ceiling(1.0, 1.0, 0.0, 3.0, [], [], []), "o_us"),
           (lambda: other_ceiling(1.0, 1.0, 1.0, 3.0, [], [PairRate("compute", "memory", 8, 8, 1.0, 1.0)],
                                  []), "must have them as one side"),
           (lambda: other_ceiling(1.0, 1.0, 1.0, 3.0, [], [PairRate("network", "other", 8, 8, 1.0, 1.0)],
                                  []), "no network"),
           (lambda: TripleRate(88, 0, 24, 1.0, 1.0, 1.0), "other_sms"),
           (lambda: TripleRate(88, 8, 24, 1.0, 1.0, -1.0), "tm_us")]
    for make, want in bad:
        with pytest.raises(NfsearchError, match=want):
            make()
