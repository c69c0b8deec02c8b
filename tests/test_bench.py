"""`nfsearch bench` without a GPU: argument checks, the record, the output check's refusal, errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace

import pytest
from nfrt.config import BatchComposition
from nfrt.schedule import Metadata, Prediction, ProfileInfo, Schedule, SolverInfo, save_schedule
from schedules_util import layer_graph

from nfsearch import bench
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


@pytest.fixture
def schedule_file(tmp_path):
    return save_schedule(_schedule(), tmp_path / "tiny.yaml")


def _fake_measurements(rng: random.Random, err: float = 1e-3) -> dict:
    samples = {k: [rng.uniform(lo, lo * 1.1) for _ in range(5)]
               for k, lo in (("nano", 900.0), ("sequential", 1000.0), ("sequential_eager", 1100.0))}
    return {"date": "2026-11-21T08:22:33Z",
            "env": {"gpu_name": "NVIDIA H200", "gpu_slug": "h200", "num_sms": 132, "memory_gib": 139.8,
                    "driver": "580.159.04", "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0"},
            "peak_tflops": rng.uniform(700, 800), "copy_gbps": rng.uniform(4000, 4400), "tokens": 256,
            "samples_us": samples, "check": {"max_rel_err": err, "eager_rel_err": err / 2, "finite": True},
            "breakdown": None}


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
