"""End-to-end planning: model + workload + profile -> solve -> a valid schedule file, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ortools")  # the GPU image has no OR-Tools; the solver runs on the CPU
from nfrt.schedule import load_schedule

from nfsearch.cli import main
from nfsearch.config import SolveConfig
from nfsearch.errors import NfsearchError
from nfsearch.opgraph import groups, op_tokens, tail_ops
from nfsearch.plan import build_problem, plan


@pytest.fixture(scope="module")
def llama8b_plan():
    return plan(SolveConfig(model="llama3-8b", gpu="h200", workload="splitwise", time_limit_s=60))


def test_plan_gives_a_valid_schedule_that_covers_the_layer(llama8b_plan):
    r = llama8b_plan
    s = r.schedule
    s.validate()  # the schedule module's checks: coverage, deadlock, dependencies implied
    assert s.metadata.model == "llama3-8b" and s.metadata.num_sms == 132
    assert s.metadata.profile.source in ("analytic", "measured")
    assert all(0 <= p.first_sm and p.first_sm + p.num_sms <= 132 for p in s.partitions)
    # every nano-op's SM count is a multiple of 8 (Hopper green-context granularity) or all SMs
    assert all(n.num_sms % 8 == 0 or n.num_sms == 132 for st in s.streams for n in st.nano_ops)
    assert s.prediction.iteration_us == pytest.approx(r.solution.iteration_us, rel=1e-3)


def test_sequential_prediction_is_the_sum_of_solo_latencies(llama8b_plan):
    """Independently of the solver: sum the profile's full-GPU latencies of every op of the model."""
    r = llama8b_plan
    batch = r.composition.batch
    model = r.schedule.metadata.model_config
    total = 0.0
    from nfsearch.opgraph import layer_ops

    for op in layer_ops(model, 1):
        tokens, ctx = op_tokens(op, batch)
        if tokens:
            total += r.profile.latency_us(op.name, tokens, ctx, 132)
    total *= model.num_layers
    for op in tail_ops(model, 1):
        tokens, ctx = op_tokens(op, batch)
        total += r.profile.latency_us(op.name, tokens, ctx, 132) if tokens else 0.0
    assert r.sequential.iteration_us == pytest.approx(total, rel=1e-3)
    assert r.schedule.prediction.iteration_us <= r.sequential.iteration_us * (1 + 1e-6)
    assert r.schedule.prediction.speedup_vs_sequential >= 1.0 - 1e-6


def test_problem_tables_match_the_profile(llama8b_plan):
    r = llama8b_plan
    cfg = SolveConfig(model="llama3-8b", gpu="h200")
    model = r.schedule.metadata.model_config
    problem = build_problem(model, r.composition.batch, r.profile, r.gpu, 1, cfg)
    g = problem.granularity_tokens
    grp = groups(model, 1)
    for op in problem.ops:
        assert op.graph_ops == grp[op.name].ops
        assert op.latency_us[0] == (0.0,) * len(problem.sm_options)
        n = 3
        want = sum(r.profile.latency_us(o, n * g, max(op_tokens_ctx(model, r, o), 0), problem.sm_options[-1])
                   for o in op.graph_ops)
        assert op.latency_us[n][-1] == pytest.approx(want, rel=1e-3)


def op_tokens_ctx(model, r, name):
    from nfsearch.opgraph import layer_ops

    spec = {o.name: o for o in layer_ops(model, 1)}[name]
    ctx = op_tokens(spec, r.composition.batch)[1]
    return ctx if ctx or spec.token_class == "all" else 1


def test_plan_is_deterministic_byte_for_byte(tmp_path):
    from nfrt.schedule import dumps

    cfg = SolveConfig(model="tiny-llama", gpu="h100-sxm", workload="const:64:32", dense_batch=256,
                      granularity_tokens=32, time_limit_s=30)
    a, b = plan(cfg), plan(cfg)
    strip = lambda t: "\n".join(ln for ln in t.splitlines() if "solve_time_s" not in ln)
    assert strip(dumps(a.schedule)) == strip(dumps(b.schedule))


def test_cli_solve_json_and_show(tmp_path, capsys):
    out = tmp_path / "s.yaml"
    rc = main(["solve", "--model", "tiny-mixtral", "--gpu", "h200", "--workload", "const:64:64",
               "--dense-batch", "512", "--time-limit", "30", "-o", str(out), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("predicted_iteration_us", "predicted_tokens_per_s_per_gpu", "fraction_of_bound",
                "predicted_speedup_vs_sequential", "solver_status", "schedule_path"):
        assert key in d
    assert d["solver_status"] in ("OPTIMAL", "FEASIBLE")
    assert d["predicted_speedup_vs_sequential"] >= 1.0 - 1e-6
    s = load_schedule(out)
    assert s.metadata.model == "tiny-mixtral"
    png = tmp_path / "g.png"
    assert main(["show", str(out), "--gantt", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "predicted" in capsys.readouterr().out


def test_cli_solve_bad_input_is_one_line_exit_2(tmp_path):
    for argv in (["solve", "--model", "llama-9b"], ["solve", "--model", "llama3-8b", "--gpu", "v100"],
                 ["solve", "--model", "llama3-8b", "--tp", "3"],
                 ["solve", "--model", "llama3-8b", "--dense-batch", "-5"],
                 ["solve", "--model", "llama3-8b", "--profile", str(tmp_path / "missing.json")]):
        p = subprocess.run([sys.executable, "-m", "nfsearch", *argv], capture_output=True, text=True)
        assert p.returncode == 2, (argv, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert "Traceback" not in p.stderr and lines[-1].startswith(("nfsearch: error:", "usage:")), p.stderr


def test_sequential_policy_has_one_stream_on_all_sms():
    r = plan(SolveConfig(model="tiny-llama", gpu="h200", workload="const:64:32", dense_batch=256,
                         granularity_tokens=32, policy="sequential"))
    s = r.schedule
    assert len(s.streams) == 1 and s.partitions[0].num_sms == 132 and len(s.nano_batches) == 1
    assert r.solution.iteration_us == r.sequential.iteration_us


def test_time_out_returns_the_best_feasible_schedule_with_its_status(tmp_path, capsys):
    with pytest.raises(NfsearchError, match="time-limit"):
        SolveConfig(model="tiny-llama", time_limit_s=0)
    cfg = SolveConfig(model="llama3-8b", gpu="h200", workload="const:1024:512", time_limit_s=0.02)
    r = plan(cfg)
    r.schedule.validate()
    assert r.solution.status in ("FEASIBLE", "UNKNOWN")  # not proven at this limit
    assert r.solution.message  # says what happened
    assert r.schedule.metadata.solver.status == r.solution.status
    assert r.schedule.metadata.solver.gap is None or r.schedule.metadata.solver.gap >= 0
    assert r.schedule.prediction.iteration_us <= r.sequential.iteration_us * (1 + 1e-9)
    out = tmp_path / "t.yaml"
    assert main(["solve", "--model", "llama3-8b", "--gpu", "h200", "--workload", "const:1024:512",
                 "--time-limit", "0.02", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "solver:" in text and out.is_file()


def test_partitions_narrower_than_the_gpu_are_placeable(llama8b_plan):
    """A partition of fewer SMs than the GPU must fit the driver's aligned SM groups (placeable_sms):
    the emitter cannot place, say, 128 of an H200's 132 SMs beside anything."""
    r = llama8b_plan
    cfg = SolveConfig(model="llama3-8b", gpu="h200")
    problem = build_problem(r.schedule.metadata.model_config, r.composition.batch, r.profile, r.gpu, 1, cfg)
    assert problem.sm_options[-1] == r.gpu.num_sms
    assert all(s <= r.gpu.placeable_sms for s in problem.sm_options[:-1])
    for p in r.schedule.partitions:
        assert p.num_sms == r.gpu.num_sms or p.first_sm + p.num_sms <= r.gpu.placeable_sms
