"""`nfsearch bench` without a GPU: argument checks, the record, the output check's refusal, errors,
and the tensor-parallel path up to the GPU (relaunch under torchrun, rank 0 alone reporting)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
from nfrt.config import BatchComposition
from nfrt.schedule import (
    LayerOp,
    Metadata,
    OpDep,
    Prediction,
    ProfileInfo,
    Schedule,
    SolverInfo,
    save_schedule,
)
from schedules_util import layer_graph

import nfsearch.launch
from nfsearch import bench, bench_measure
from nfsearch.bound import compute_bound
from nfsearch.cli import main
from nfsearch.gpus import resolve_gpu
from nfsearch.models import param_counts, resolve_model

COMP = BatchComposition(256, 192, 64, 100, 32)


def _schedule(prediction: Prediction | None = None) -> Schedule:
    """A one-stream schedule of tiny-llama (the bench's CPU side does not depend on the layout)."""
    config = resolve_model("tiny-llama")
    meta = Metadata(model=config.name, model_config=config, gpu="h200", num_sms=132, tp=1,
                    workload="const:100:32", dense_batch=COMP.dense_batch, batch=COMP,
                    num_layers=config.num_layers, profile=ProfileInfo(hash="none", source="analytic"),
                    solver=SolverInfo(name="hand", policy="hand", status="n/a"), nfsearch_version="0.1.0")
    s = Schedule.sequential(meta, layer_graph(config))
    return replace(s, prediction=prediction) if prediction else s


def tp_schedule(tp: int, num_sms: int = 132) -> Schedule:
    """The sequential schedule of tiny-llama at `tp`: its layer graph with the two all-reduces."""
    from nfsearch.opgraph import layer_ops

    s = _schedule()
    layer = tuple(LayerOp(name=op.name, kind=op.kind, token_class=op.token_class,
                          deps=tuple(OpDep(op=p, scope=sc, prev_layer=prev) for p, sc, prev in op.deps))
                  for op in layer_ops(s.metadata.model_config, tp))
    return Schedule.sequential(replace(s.metadata, tp=tp, num_sms=num_sms), layer)


@pytest.fixture
def schedule_file(tmp_path):
    return save_schedule(_schedule(), tmp_path / "tiny.yaml")


@pytest.fixture
def tp2_file(tmp_path):
    return save_schedule(tp_schedule(2), tmp_path / "tiny-tp2.yaml")


@pytest.fixture
def world(monkeypatch):
    """No torchrun world, and the no-multicast variables restored after the test (relaunch sets them)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *nfsearch.launch.NO_MULTICAST_ENV):
        monkeypatch.setenv(k, "")  # records the value to restore, unset included
        monkeypatch.delenv(k)

    def enter(rank: int, size: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(size))
    return enter


def _fake_measurements(rng: random.Random, err: float = 1e-3, tp: int = 1) -> dict:
    samples = {k: [rng.uniform(lo, lo * 1.1) for _ in range(5)]
               for k, lo in (("nano", 900.0), ("sequential", 1000.0), ("sequential_eager", 1100.0))}
    nvlink = rng.uniform(300, 400) if tp > 1 else None
    return {"date": "2026-11-21T08:22:33Z",
            "env": {"gpu_name": "NVIDIA H200", "gpu_slug": "h200", "num_sms": 132, "memory_gib": 139.8,
                    "driver": "580.159.04", "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0",
                    "nccl": "2.27.3", "tp": tp, "world_size": tp, "nvlink_allreduce_busbw_gbps": nvlink},
            "peak_tflops": rng.uniform(700, 800), "copy_gbps": rng.uniform(4000, 4400), "nvlink_gbps": nvlink,
            "tokens": 256, "samples_us": samples,
            "check": {"max_rel_err": err, "eager_rel_err": err / 2, "finite": True}, "breakdown": None}


@pytest.mark.parametrize("argv,needle", [
    (["--iters", "0"], "--iters must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--layers", "0"], "--layers must be >= 1"),
    (["--layers", "3"], "--layers 3 exceeds the 2 layers of tiny-llama"),
    (["--rtol", "0"], "--rtol must be in (0, 1)"),
])
def test_bad_arguments_exit_2_with_one_line(schedule_file, capsys, argv, needle):
    assert main(["bench", "--schedule", str(schedule_file), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("nfsearch: error:")


def test_missing_schedule_is_named(tmp_path, capsys):
    assert main(["bench", "--schedule", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_without_cuda_one_line_error(schedule_file, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured without CUDA"))
    assert main(["bench", "--schedule", str(schedule_file), "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and err.count("\n") == 1


def test_module_does_not_import_torch():
    code = ("import sys, nfsearch.cli, nfsearch.bench; nfsearch.cli.build_parser(); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_truncate_keeps_everything_but_depth():
    s = _schedule()
    t = bench.truncate(s, 1)
    assert t.metadata.num_layers == 1 and t.metadata.model_config.num_layers == 1
    assert t.streams == s.streams and t.metadata.model_config.hidden_size == 64
    assert bench.truncate(s, None) is s and bench.truncate(s, 2) is s


def test_prediction_scales_with_layers():
    rng = random.Random()
    period, span, tail, n = rng.uniform(50, 100), rng.uniform(100, 150), rng.uniform(10, 40), 32
    it = (n - 1) * period + span + tail
    p = Prediction(period_us=period, layer_span_us=span, iteration_us=it, tokens_per_s_per_gpu=1.0,
                   fraction_of_bound=0.5, optimal_tokens_per_s_per_gpu=2.0, speedup_vs_sequential=1.2)
    full = bench.predicted(p, n, n)
    assert full["iteration_us"] == it and full["tail_us"] == pytest.approx(tail)
    assert full["sequential_iteration_us"] == pytest.approx(1.2 * it)
    four = bench.predicted(p, n, 4)
    assert four["iteration_us"] == pytest.approx(3 * period + span + tail)
    seq_layer = (1.2 * it - tail) / n
    assert four["sequential_iteration_us"] == pytest.approx(4 * seq_layer + tail)
    assert bench.predicted(None, n, 4) is None


def test_record_format_and_atomic_write(tmp_path):
    rng = random.Random()
    s = _schedule(Prediction(period_us=400, layer_span_us=500, iteration_us=1000, tokens_per_s_per_gpu=1.0,
                             fraction_of_bound=0.5, optimal_tokens_per_s_per_gpu=2.0,
                             speedup_vs_sequential=1.1))
    cfg = bench.BenchConfig(schedule="tiny.yaml", out=str(tmp_path / "runs"), iters=5)
    m = _fake_measurements(rng)
    rec = bench.build_record(cfg, s, s, m, command="nfsearch bench --schedule tiny.yaml")
    assert json.loads(json.dumps(rec)) == rec  # plain JSON
    for key in ("command", "date", "env", "ceilings", "bound", "check", "results", "prediction"):
        assert key in rec
    assert rec["env"]["gpu_name"] == "NVIDIA H200" and rec["env"]["driver"] == "580.159.04"
    model = s.metadata.model_config
    want = compute_bound(model, resolve_gpu("h200").with_overrides(peak_tflops=m["peak_tflops"]))
    assert rec["bound"]["optimal_tokens_per_s_per_gpu"] == pytest.approx(want.optimal_tokens_per_s_per_gpu)
    nano = sorted(m["samples_us"]["nano"])[2]
    seq = sorted(m["samples_us"]["sequential"])[2]
    assert rec["results"]["nano"]["median_us"] == nano
    assert rec["results"]["nano"]["tokens_per_s_per_gpu"] == pytest.approx(256 / (nano * 1e-6))
    assert rec["results"]["nano"]["fraction_of_bound"] == pytest.approx(
        256 / (nano * 1e-6) / want.optimal_tokens_per_s_per_gpu)
    assert rec["speedup_vs_sequential"] == pytest.approx(seq / nano)
    assert rec["prediction"]["measured_over_predicted"] == pytest.approx(nano / 1000)
    assert rec["check"]["ok"] and rec["layers"] == rec["model_layers"] == 2

    path = bench.write_record(rec, bench.record_path(cfg.out, rec))
    assert path.name == "tiny-llama-h200-const-100-32-20261121T082233Z.json"
    assert json.loads(path.read_text()) == rec
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert "nano-batched (graph)" in bench.format_table(rec, path)
    # a second run stamped in the same second (benches on other GPUs at once) keeps both records
    other = dict(rec, speedup_vs_sequential=0.5)
    second = bench.write_record(other, bench.record_path(cfg.out, other))
    third = bench.write_record(other, bench.record_path(cfg.out, other))
    assert second.name == "tiny-llama-h200-const-100-32-20261121T082233Z-2.json"
    assert third.name.endswith("Z-3.json")
    assert json.loads(path.read_text()) == rec and json.loads(second.read_text()) == other
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, second.name, third.name])


def test_truncated_record_name_and_bound(tmp_path):
    s = _schedule()
    t = bench.truncate(s, 1)
    cfg = bench.BenchConfig(schedule="tiny.yaml", layers=1)
    rec = bench.build_record(cfg, s, t, _fake_measurements(random.Random()), command="x")
    assert rec["layers"] == 1 and rec["model_layers"] == 2
    assert bench.record_path("r", rec).name.startswith("tiny-llama-l1-h200-")
    full, cut = param_counts(s.metadata.model_config).active, param_counts(t.metadata.model_config).active
    assert rec["bound"]["active_params"] == cut < full  # the bound of the model that ran


def test_mismatch_withholds_speed_and_exits_2(schedule_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    monkeypatch.setattr(bench, "require_cuda", lambda: None)
    monkeypatch.setattr(bench, "measure", lambda cfg, s: _fake_measurements(random.Random(), err=0.5))
    assert main(["bench", "--schedule", str(schedule_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "differ from sequential" in err and "speed not reported" in err
    (path,) = out.iterdir()
    rec = json.loads(path.read_text())
    assert rec["check"]["ok"] is False and rec["check"]["max_rel_err"] == 0.5
    assert rec["results"] is None and rec["speedup_vs_sequential"] is None


def test_json_output_is_the_record(schedule_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    monkeypatch.setattr(bench, "require_cuda", lambda: None)
    monkeypatch.setattr(bench, "measure", lambda cfg, s: _fake_measurements(random.Random()))
    assert main(["bench", "--schedule", str(schedule_file), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    (path,) = out.iterdir()
    assert json.loads(path.read_text()) == printed
    assert printed["results"]["sequential_eager"]["median_us"] > 0
    assert printed["command"].startswith("nfsearch ")


# ---- tensor parallelism -------------------------------------------------------------------------

def test_tp_schedule_relaunches_under_torchrun(tp2_file, monkeypatch, world):
    calls = []
    monkeypatch.setattr(nfsearch.launch, "relaunch", lambda tp, argv=None: calls.append(tp) or 7)
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured in the launching process"))
    assert main(["bench", "--schedule", str(tp2_file)]) == 7  # the world's exit code
    assert main(["bench", "--schedule", str(tp2_file), "--tp", "2"]) == 7
    assert calls == [2, 2]


def test_relaunch_runs_torchrun_with_multicast_off(tp2_file, monkeypatch, world):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    argv = ["bench", "--schedule", str(tp2_file), "--layers", "1"]
    monkeypatch.setattr(sys, "argv", ["nfsearch", *argv])
    seen = {}

    def call(cmd, env):
        seen.update(cmd=cmd, env=env)
        return 3
    monkeypatch.setattr(nfsearch.launch.subprocess, "call", call)
    assert main(argv) == 3
    cmd = seen["cmd"]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd
    assert cmd[-len(argv) - 2:] == ["-m", "nfsearch", *argv]
    assert seen["env"]["NCCL_NVLS_ENABLE"] == "0" and seen["env"]["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_too_few_gpus_is_one_line(tp2_file, capsys, monkeypatch, world):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(nfsearch.launch.subprocess, "call", lambda *a, **k: pytest.fail("launched"))
    assert main(["bench", "--schedule", str(tp2_file)]) == 2
    err = capsys.readouterr().err
    assert "--tp 2 needs 2 CUDA GPUs" in err and err.count("\n") == 1


def test_inside_the_world_up_to_the_cuda_check(tp2_file, capsys, monkeypatch, world):
    """A rank of the world does not relaunch; without CUDA it stops at the check, in one line."""
    torch = pytest.importorskip("torch")
    world(0, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nfsearch.launch.subprocess, "call", lambda *a, **k: pytest.fail("relaunched"))
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured without CUDA"))
    assert main(["bench", "--schedule", str(tp2_file), "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and err.count("\n") == 1
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # the rank keeps multicast off


@pytest.mark.parametrize("argv,size,needle", [
    (["--tp", "2"], None, "--tp 2 does not match tp 1 of schedule"),
    (["--tp", "0"], None, "--tp must be >= 1"),
    ([], 2, "schedule has tp 1, but torchrun started 2 processes"),
])
def test_tp_mismatch_is_one_line(schedule_file, capsys, monkeypatch, world, argv, size, needle):
    if size:
        world(0, size)
    monkeypatch.setattr(nfsearch.launch, "relaunch", lambda *a: pytest.fail("launched"))
    assert main(["bench", "--schedule", str(schedule_file), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@pytest.mark.parametrize("tp2,argv", [(True, []), (False, ["--tp", "2"])])
def test_e2e_with_tp_is_one_line(schedule_file, tp2_file, capsys, monkeypatch, world, tp2, argv):
    monkeypatch.setattr(nfsearch.launch, "relaunch", lambda *a: pytest.fail("launched"))
    path = tp2_file if tp2 else schedule_file
    assert main(["bench", "--e2e", "--schedule", str(path), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert "--e2e serves on one GPU (tp 1), not tp 2" in err and err.count("\n") == 1


@pytest.mark.parametrize("rank,err", [(1, 1e-3), (1, 0.5), (0, 1e-3)])
def test_only_rank_0_reports(tp2_file, tmp_path, capsys, monkeypatch, world, rank, err):
    world(rank, 2)
    out = tmp_path / "runs"
    monkeypatch.setattr(bench, "require_cuda", lambda: None)
    monkeypatch.setattr(bench, "measure", lambda cfg, s: _fake_measurements(random.Random(), err=err, tp=2))
    code = main(["bench", "--schedule", str(tp2_file), "--out", str(out), "--json"])
    assert code == (0 if err < 0.1 else 2)  # every rank exits with the check's verdict
    printed = capsys.readouterr()
    if rank:
        assert printed.out == printed.err == "" and not out.exists()
    else:
        (path,) = out.iterdir()
        assert json.loads(path.read_text()) == json.loads(printed.out)


def test_bound_uses_the_measured_nvlink():
    rng = random.Random()
    s = tp_schedule(2)
    meta, model = s.metadata, s.metadata.model_config
    peak, copy, nvlink = rng.uniform(700, 800), rng.uniform(4000, 4400), rng.uniform(100, 400)
    env = {"gpu_slug": "h200"}
    b = bench_measure.bound_for(model, env, meta, peak, copy, nvlink)
    gpu = resolve_gpu("h200").with_overrides(peak_tflops=peak, hbm_gbps=copy, nvlink_gbps=nvlink)
    want = compute_bound(model, gpu, 2, meta.workload, meta.dense_batch)
    assert b.gpu.nvlink_gbps == nvlink and b.network_us > 0
    assert b.network_us == pytest.approx(want.network_us)
    half = bench_measure.bound_for(model, env, meta, peak, copy, nvlink / 2)
    assert half.network_us == pytest.approx(2 * b.network_us)  # bytes over the measured bandwidth
    local = bench_measure.bound_for(model, {"gpu_name": "?", "num_sms": 132}, replace(meta, gpu="nope"),
                                    peak, copy, nvlink)  # no datasheet: the measured numbers alone
    assert local.gpu.nvlink_gbps == nvlink and local.network_us == pytest.approx(b.network_us)


def test_tp_record_is_per_gpu(tmp_path):
    rng = random.Random()
    s = tp_schedule(2)
    cfg = bench.BenchConfig(schedule="tiny-tp2.yaml", out=str(tmp_path))
    m = _fake_measurements(rng, tp=2)
    rec = bench.build_record(cfg, s, s, m, command="nfsearch bench --schedule tiny-tp2.yaml")
    assert json.loads(json.dumps(rec)) == rec
    assert rec["tp"] == rec["world_size"] == 2 and rec["env"]["nccl"] == "2.27.3"
    assert rec["ceilings"]["allreduce_busbw_gbps"] == rec["bound"]["nvlink_gbps"] == m["nvlink_gbps"]
    assert rec["ceilings"]["allreduce_bytes"] == 256 << 20
    assert rec["env"]["nvlink_allreduce_busbw_gbps"] == m["nvlink_gbps"]
    want = compute_bound(s.metadata.model_config, resolve_gpu("h200").with_overrides(
        peak_tflops=m["peak_tflops"], hbm_gbps=m["copy_gbps"], nvlink_gbps=m["nvlink_gbps"]), 2,
        s.metadata.workload, s.metadata.dense_batch)
    assert rec["bound"]["layer_network_us"] > 0
    assert rec["bound"]["layer_network_us"] == pytest.approx(want.network_us)
    optimal = rec["bound"]["optimal_tokens_per_s_per_gpu"]
    assert optimal == pytest.approx(want.optimal_tokens_per_s_per_gpu)
    nano = sorted(m["samples_us"]["nano"])[2]
    r = rec["results"]["nano"]
    assert r["tokens_per_s_per_gpu"] == pytest.approx(256 / (nano * 1e-6) / 2)  # one iteration on 2 GPUs
    assert r["tokens_per_s_all_gpus"] == pytest.approx(256 / (nano * 1e-6))
    assert r["fraction_of_bound"] == pytest.approx(r["tokens_per_s_per_gpu"] / optimal)
    assert bench.record_path("r", rec).name == "tiny-llama-h200-tp2-const-100-32-20261121T082233Z.json"
    table = bench.format_table(rec)
    assert "tp 2: 2 x NVIDIA H200" in table and "NCCL 2.27.3" in table
    assert f"all-reduce 256 MiB bus bandwidth {m['nvlink_gbps']:.0f} GB/s" in table
    one = bench.build_record(cfg, _schedule(), _schedule(), _fake_measurements(rng), command="x")
    assert one["tp"] == 1 and one["ceilings"]["allreduce_busbw_gbps"] is None and "tp 1" not in \
        bench.format_table(one) and "all-reduce" not in bench.format_table(one)


def test_allreduce_bus_bandwidth(monkeypatch):
    """2 (n - 1) / n x bytes / time, from the median time of in-place all-reduces over the group."""
    torch = pytest.importorskip("torch")
    rng = random.Random()
    n, t_us, nbytes = rng.randint(2, 8), rng.uniform(500, 2000), 2 * rng.randint(1, 1 << 12)
    reduced = []

    class Group:
        size, device = n, torch.device("cpu")

        def all_reduce(self, x):
            reduced.append((x.numel(), x.dtype))

    def timed(fn, warmup, reps):
        fn()
        return t_us
    monkeypatch.setattr(bench_measure, "_sync", lambda group: None)
    monkeypatch.setattr(bench_measure, "_event_median_us", timed)
    got = bench_measure.allreduce_busbw_gbps(Group(), nbytes)
    assert reduced == [(nbytes // 2, torch.bfloat16)]
    assert got == pytest.approx(2 * (n - 1) / n * nbytes / (t_us * 1e-6) / 1e9)
