"""End-to-end planning: model + workload + profile -> solve -> a valid schedule file, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ortools")  # the GPU image has no OR-Tools; the solver runs on the CPU
from nfrt.config import BatchComposition
from nfrt.schedule import load_schedule

from nfsearch.cli import main
from nfsearch.config import SolveConfig
from nfsearch.errors import NfsearchError
from nfsearch.opgraph import groups, op_tokens, tail_ops
from nfsearch.plan import REPO_ROOT, build_problem, plan


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
    """Independently of the solver: sum the profile's full-GPU latencies of every op of the model,
    prefill attention at the work of the batch's layout (the whole region as one piece: its
    position scale, checked on its own in test_prefill_scale_reproduces_work_ratios)."""
    from nfsearch.plan import prefill_scale

    r = llama8b_plan
    batch = r.composition.batch
    model = r.schedule.metadata.model_config
    total = 0.0
    from nfsearch.opgraph import layer_ops

    g = SolveConfig(model="llama3-8b", gpu="h200").granularity_tokens
    lat = [r.profile.latency_us("attn_prefill", n * g, batch.prefill_context, 132)
           for n in range(batch.prefill_tokens // g + 1)]
    whole = prefill_scale(batch, g, r.profile, 132, lat)[0][-1]
    assert whole > 1.0  # the batch's prefill tokens sit deeper than the profiled from-zero layout
    for op in layer_ops(model, 1):
        tokens, ctx = op_tokens(op, batch)
        if tokens:
            total += r.profile.latency_us(op.name, tokens, ctx, 132) * (whole if op.name == "attn_prefill"
                                                                         else 1.0)
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


def test_show_hand_built_schedule(capsys):
    """A hand-built schedule has no solver gap or solve time: `show` prints it without them."""
    for path in sorted((REPO_ROOT / "schedules").glob("*-hand.yaml")):
        assert main(["show", str(path)]) == 0
        out = capsys.readouterr().out
        assert "solver hand hand n/a\n" in out and "gap" not in out


def test_cli_solve_bad_input_is_one_line_exit_2(tmp_path):
    for argv in (["solve", "--model", "llama-9b"], ["solve", "--model", "llama3-8b", "--gpu", "v100"],
                 ["solve", "--model", "llama3-8b", "--tp", "3"],
                 ["solve", "--model", "llama3-8b", "--dense-batch", "-5"],
                 ["solve", "--model", "llama3-8b", "--min-gain", "1.5"],
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
    with pytest.raises(NfsearchError, match="--min-gain must be a fraction in"):
        SolveConfig(model="tiny-llama", min_gain=-0.01)
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


# ---- position scale of prefill attention ------------------------------------------------------

def _positions(prefill_tokens: int, context: int) -> list[int]:
    """Prompt position of every token of the profiler's reference layout: whole prompts from
    position 0, then a head."""
    out: list[int] = []
    while len(out) < prefill_tokens:
        out += list(range(min(context, prefill_tokens - len(out))))
    return out


def _serving_positions(prefill_tokens: int, context: int) -> list[int]:
    """Prompt position of every prefill token of the batch (make_batch), by brute force: the stream
    of length-`context` prompts from the phase whose mean position is closest to (context - 1) / 2
    (smallest on ties); a region shorter than a prompt is centred in it."""
    T, c = prefill_tokens, context
    if T <= c:
        return list(range((c - T) // 2, (c - T) // 2 + T))
    phase = min(range(c), key=lambda p: (abs(2 * sum((p + i) % c for i in range(T)) - T * (c - 1)), p))
    return [(phase + i) % c for i in range(T)]


def _work(pos: list[int], start: int, end: int) -> int:
    return sum(p + 1 for p in pos[start:end])  # causal: position p reads p + 1 keys


class _WorkProfile:
    """A stand-in profile whose attn_prefill latency is exactly gamma + beta * work of the layout
    the profiler times (the first t tokens of length-c prompts from position 0)."""

    def __init__(self, contexts, gamma, beta, source="measured"):
        from types import SimpleNamespace

        self.contexts, self.gamma, self.beta = tuple(contexts), gamma, beta
        self.meta = SimpleNamespace(source=source)

    def context_grid(self, op):
        assert op == "attn_prefill"
        return self.contexts

    def latency_us(self, op, tokens, context, num_sms):
        return self.gamma + self.beta * _work(_positions(tokens, context), 0, tokens)


def test_prefill_work_is_the_sum_of_key_counts():
    from nfsearch.plan import prefill_work

    rng = np.random.default_rng()
    for _ in range(20):
        c, total = int(rng.integers(1, 300)), int(rng.integers(1, 900))
        s = int(rng.integers(0, total))
        e = int(rng.integers(s, total + 1))
        assert prefill_work(total, c, s, e) == _work(_serving_positions(total, c), s, e)
    # the llama3-8b splitwise layout (c = 1540, 1728 prefill tokens: positions 676-1539 of one
    # prompt, then 0-863 of the next) cut in four 432-token pieces
    pos = _serving_positions(1728, 1540)
    assert [_work(pos, i * 432, (i + 1) * 432) for i in range(4)] == [385560, 572184, 93528, 280152]
    assert prefill_work(1728, 1540, 0, 1728) == pytest.approx(1_331_524, rel=0.02)  # measured serving


def test_make_batch_and_prefill_work_agree():
    """The runtime's synthetic batch and the search's cost model put prefill tokens at the same
    positions; the profiler's from-zero layout stays whole prompts from position 0."""
    pytest.importorskip("torch")
    from nfrt.batch import make_batch

    from nfsearch.plan import prefill_work

    rng = np.random.default_rng()
    for _ in range(20):
        T, c, d = int(rng.integers(1, 3000)), int(rng.integers(1, 2000)), int(rng.integers(0, 50))
        comp = BatchComposition(T + d, d, T, 100 if d else 0, c)
        b = make_batch(comp, 1000, seed=int(rng.integers(0, 1000)))
        pos = [p.start + i for p in b.prefills for i in range(p.length)]
        assert len(pos) == T and all(p.start + p.length <= c for p in b.prefills)
        assert sum(p + 1 for p in pos) == prefill_work(T, c, 0, T)
        s = int(rng.integers(0, T))
        assert sum(p + 1 for p in pos[s:]) == prefill_work(T, c, s, T)
        ref = make_batch(comp, 1000, layout="from_zero")
        assert [p.start + i for p in ref.prefills for i in range(p.length)] == _positions(T, c)


def test_prefill_scale_reproduces_work_ratios():
    """A profile whose latency is proportional to work: scale[a][n] = W(a, n) / W_ref(n), the work of
    the piece over that of the profiled from-zero layout (the four pieces of 432 tokens of the
    1540/1728 layout: positions 676-1107, 1108-1539, 0-431, 432-863). An affine one:
    (gamma + beta W) / (gamma + beta W_ref)."""
    from nfsearch.plan import prefill_scale

    rng = np.random.default_rng()
    batch = BatchComposition(2048, 320, 1728, 1261, 1540)
    g = 16  # 1728 = 108 granules; a 432-token piece is 27
    pos = _serving_positions(1728, 1540)
    ref = _positions(1728, 1540)  # the profiled layout of n*g tokens: its first n*g
    contexts = (32, 128, 512, 1024, 2048, 4096)
    beta = float(rng.uniform(1e-5, 1e-3))
    prof = _WorkProfile(contexts, 0.0, beta)
    lat = [prof.latency_us("attn_prefill", n * g, 1540, 132) for n in range(109)]
    scale = prefill_scale(batch, g, prof, 132, lat)
    assert len(scale) == 109 and all(len(r) == 109 - a for a, r in enumerate(scale))
    want = [_work(pos, i * 432, (i + 1) * 432) / _work(ref, 0, 432) for i in range(4)]
    assert [scale[27 * i][27] for i in range(4)] == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx([4.12240, 6.11778, 1.0, 2.99538], rel=1e-5)
    for _ in range(30):
        n = int(rng.integers(1, 109))
        a = int(rng.integers(0, 109 - n))
        assert scale[a][n] == pytest.approx(_work(pos, a * g, (a + n) * g) / _work(ref, 0, n * g), rel=1e-5)
    gamma = float(rng.uniform(2, 20))
    prof = _WorkProfile(contexts, gamma, beta)
    lat = [prof.latency_us("attn_prefill", n * g, 1540, 132) for n in range(109)]
    scale = prefill_scale(batch, g, prof, 132, lat)
    for _ in range(30):
        n = int(rng.integers(1, 109))
        a = int(rng.integers(0, 109 - n))
        w, w_ref = _work(pos, a * g, (a + n) * g), _work(ref, 0, n * g)
        assert scale[a][n] == pytest.approx((gamma + beta * w) / (gamma + beta * w_ref), rel=1e-5)


def test_attn_prefill_gets_a_position_scale_from_the_measured_profile(llama8b_plan):
    """Only attn_prefill is scaled; a piece costs at least the profiled (from-zero) layout of its
    token count, more the deeper its tokens sit. The batch's 1728 prefill tokens are positions
    676-1539 of one 1540-token prompt, then 0-863 of the next (granule 14 = token 896, position 32)."""
    r = llama8b_plan
    problem = build_problem(r.schedule.metadata.model_config, r.composition.batch, r.profile, r.gpu, 1,
                            SolveConfig(model="llama3-8b", gpu="h200"))
    assert r.composition.batch == BatchComposition(2048, 320, 1728, 1261, 1540)
    ops = {o.name: o for o in problem.ops}
    assert all(o.scale is None for name, o in ops.items() if name != "attn_prefill")
    op = ops["attn_prefill"]
    assert all(v >= 1.0 for row in op.scale for v in row)
    assert op.scale[0][6] > 2.0  # positions 676-1059: over twice the profiled 0-383
    assert 1.0 <= op.scale[14][6] < 1.25  # positions 32-415: about the profiled layout
    assert op.piece_latency_us(0, 6, -1) > op.piece_latency_us(14, 6, -1)
