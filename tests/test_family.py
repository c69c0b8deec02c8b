"""[S1.family]: the K = 2 structure family that stage 2 tries beside stage 1's pick
(nfsearch/search/family.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("ortools")

from test_search import brute_stage2, tiny, tiny_tp  # noqa: E402

from nfsearch.config import SolveConfig  # noqa: E402
from nfsearch.search import solve  # noqa: E402
from nfsearch.search.family import applies, k2_family  # noqa: E402
from nfsearch.search.stage2 import solve_stage2  # noqa: E402
from nfsearch.search.timeline import all_pieces, granules_of, own_granules  # noqa: E402


def _check_structure(pb, s) -> None:
    """Every non-empty piece on exactly one stream; nano-batch 0 holds every decode granule."""
    op = {o.name: o for o in pb.ops}
    real = [p.name for p in all_pieces(pb, 2, s.splits)
            if own_granules(pb, op[p.op], granules_of(s.boundaries, p))]
    listed = [n for order in s.stream_order.values() for n in order]
    assert sorted(listed) == sorted(real)
    assert pb.decode_granules <= s.boundaries[1] <= pb.num_granules // 2


def test_family_stage2_is_optimal_on_a_tiny_problem() -> None:
    rng = np.random.default_rng(7)
    pb = tiny(rng, g=4, d=2)
    family = k2_family(pb)
    assert [label for label, _ in family] == ["b32-last1", "b32-last2"]
    for _, s in family:
        _check_structure(pb, s)
        assert s.stream_order["compute"][0] == "qkv.0"  # nano-batch 0 up to its decode attention
        assert s.stream_order["memory"] == ("attn_d.0",)
        r2 = solve_stage2(pb, s, 20)
        assert r2.status == "OPTIMAL"
        assert r2.period_units / 100 == pytest.approx(brute_stage2(pb, s), abs=0.011)


@pytest.mark.parametrize("seed", range(6))
def test_search_with_the_family_is_never_predicted_worse(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    slow = {("compute", "memory"): (1.3, 1.2, 1.1), ("memory", "compute"): (1.4, 1.2, 1.1)}
    pb = dataclasses.replace(tiny(rng, g=6, d=2, interference=slow), time_limit_s=10.0)
    base = solve(pb)
    fam = solve(dataclasses.replace(pb, structure_family=True))
    assert fam.period_us <= base.period_us + 1e-6
    assert "K=2 family: 4 of 4 feasible" in fam.message  # b = 2, 3 granules, last op whole or cut
    again = solve(dataclasses.replace(pb, structure_family=True))  # same inputs, same schedule
    assert (again.period_us, again.nano_ops) == (fam.period_us, fam.nano_ops)


def test_family_does_not_apply() -> None:
    rng = np.random.default_rng(3)
    assert k2_family(tiny_tp(rng)) == []  # a network stream
    assert k2_family(tiny(rng, g=4, d=0)) == []  # no decode attention to overlap
    assert k2_family(tiny(rng, g=4, d=3)) == []  # decode tokens over half the batch
    assert not applies(tiny(rng, g=4, d=2, split_options=(1,)))
    assert not applies(tiny(rng, g=4, d=2, max_nano_batches=1))


def test_family_on_the_h100_llama3_8b_splitwise_problem() -> None:
    from nfsearch.models import resolve_model
    from nfsearch.plan import build_problem, choose_profile, gpu_from_profile
    from nfsearch.workload import compose_batch, parse_workload

    cfg = SolveConfig(model="llama3-8b", gpu="h100-sxm", workload="splitwise", structure_family=True)
    model = resolve_model(cfg.model)
    profile, _ = choose_profile(model, cfg)
    gpu = gpu_from_profile(profile)
    comp = compose_batch(model, parse_workload(cfg.workload), gpu, tp=1, dense_batch=cfg.dense_batch,
                         round_to=cfg.granularity_tokens)
    pb = build_problem(model, comp.batch, profile, gpu, 1, cfg)
    assert pb.structure_family
    family = k2_family(pb)
    # nano-batch 0 from the 320 decode tokens (5 granules) to half the batch, last op whole or cut
    assert [label for label, _ in family] == [f"b{b * 64}-last{p}" for b in range(5, 17) for p in (1, 2)]
    label, s = family[3 * 2]  # b = 8 granules, ffn_down whole: the shipped H100 schedule's structure
    assert label == "b512-last1"
    _check_structure(pb, s)
    assert s.stream_order == {
        "compute": ("qkv.0", "qkv.1", "attn_prefill.0", "o_proj.1", "ffn_up.1", "o_proj.0", "ffn_up.0",
                    "ffn_down.0"),
        "memory": ("attn_decode.0",)}
    assert s.splits == {"qkv": 2, "attn_decode": 2, "attn_prefill": 1, "o_proj": 2, "ffn_up": 2,
                        "ffn_down": 1}
    assert family[3 * 2 + 1][1].stream_order["compute"][5] == "ffn_down.1"  # the variant with it cut


def test_solve_flag_reaches_the_problem(monkeypatch) -> None:
    import nfsearch.plan as plan_mod
    from nfsearch.cli import main

    seen = []

    def fake_plan(cfg):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(plan_mod, "plan", fake_plan)
    with pytest.raises(SystemExit):
        main(["solve", "--model", "llama3-8b", "--gpu", "h100-sxm", "--structure-family"])
    assert seen and seen[0].structure_family
    assert SolveConfig().structure_family is False  # opt-in


def test_shipped_family_schedules_say_so() -> None:
    """The schedules make_schedules solves with the family record it, and `nfsearch show` says it."""
    import importlib.util
    from pathlib import Path

    from nfrt.schedule import load_schedule

    from nfsearch.plan import default_output
    from nfsearch.show import summary

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("make_schedules", root / "examples" / "make_schedules.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    from nfsearch.gpus import resolve_gpu
    from nfsearch.models import resolve_model

    flagged = []
    for cfg in ms.configs():
        s = load_schedule(default_output(cfg, resolve_model(cfg.model), resolve_gpu(cfg.gpu)))
        assert s.metadata.solver.structure_family == cfg.structure_family, cfg
        assert ("structure family" in summary(s)) == cfg.structure_family
        flagged += [cfg.model + "-" + cfg.gpu + "-" + cfg.workload] if cfg.structure_family else []
    assert flagged == ["llama3-8b-h100-sxm-splitwise", "llama3-8b-h200-const:1024:512"]
