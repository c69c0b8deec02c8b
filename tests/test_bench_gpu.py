"""`nfsearch bench` on a GPU: a tiny two-stream schedule end to end, record and output check; on
two GPUs, a tp 2 schedule through the relaunch under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from conftest import has_cuda_bindings  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.schedule import save_schedule  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402
from test_bench import tp_schedule  # noqa: E402

from nfsearch.cli import main  # noqa: E402
from nfsearch.models import resolve_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_bench_tiny_schedule(name, tmp_path, capsys):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sched = nano_schedule(resolve_model(name), BatchComposition(256, 192, 64, 100, 32), (0, 96, 192, 256),
                          mlp_on_second=frozenset({1}), num_sms=sms, sizes=(sms - 32, 32))
    path = save_schedule(sched, tmp_path / f"{name}.yaml")
    out = tmp_path / "runs"
    argv = ["bench", "--schedule", str(path), "--iters", "4", "--warmup", "1", "--out", str(out), "--json",
            "--breakdown", "--layers", "1" if name == "tiny-mixtral" else "2"]
    if not has_cuda_bindings():
        argv.append("--no-partitions")
    assert main(argv) == 0, capsys.readouterr().err
    rec = json.loads(capsys.readouterr().out)
    (written,) = out.iterdir()
    assert json.loads(written.read_text()) == rec
    assert rec["check"]["ok"] and rec["check"]["finite"] and rec["check"]["max_rel_err"] < 3e-2
    assert rec["check"]["eager_vs_graph_rel_err"] < 3e-2
    assert rec["env"]["num_sms"] == sms and rec["env"]["torch"] == torch.__version__
    assert 50 < rec["ceilings"]["gemm_bf16_tflops"] < 5000 and 100 < rec["ceilings"]["copy_gbps"] < 20000
    for key in ("nano", "sequential", "sequential_eager"):
        r = rec["results"][key]
        assert len(r["samples_us"]) == 4 and 0 < r["min_us"] <= r["median_us"] <= r["max_us"]
        assert r["tokens_per_s_per_gpu"] == pytest.approx(256 / (r["median_us"] * 1e-6))
    bd = rec["breakdown"]
    assert {row["nano_op"] for row in bd["nano"]["nano_ops"]} == {n.name for s in sched.streams
                                                                 for n in s.nano_ops}
    assert all(row["solo_us"] > 0 for row in bd["nano"]["nano_ops"] + bd["sequential"]["nano_ops"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_bench_tp2_relaunches_and_rank0_reports(tmp_path):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    path = save_schedule(tp_schedule(2, num_sms=sms), tmp_path / "tiny-tp2.yaml")
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "nfsearch", "bench", "--schedule", str(path), "--iters", "4",
           "--warmup", "1", "--out", str(out), "--breakdown", "--timeline", str(tmp_path / "tl.png")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (written,) = out.iterdir()  # one record: rank 0's
    rec = json.loads(written.read_text())
    assert run.stdout.count("nano-batched (graph)") == 1  # one table
    assert rec["tp"] == rec["world_size"] == rec["env"]["world_size"] == 2 and rec["env"]["nccl"]
    assert rec["check"]["ok"] and rec["check"]["max_rel_err"] < 3e-2
    busbw = rec["ceilings"]["allreduce_busbw_gbps"]
    assert 10 < busbw < 2000 and rec["bound"]["nvlink_gbps"] == busbw
    assert rec["env"]["nvlink_allreduce_busbw_gbps"] == busbw and rec["bound"]["layer_network_us"] > 0
    for key in ("nano", "sequential", "sequential_eager"):
        r = rec["results"][key]
        assert len(r["samples_us"]) == 4 and r["median_us"] > 0
        assert r["tokens_per_s_per_gpu"] == pytest.approx(256 / (r["median_us"] * 1e-6) / 2)
    assert {row["nano_op"] for row in rec["breakdown"]["nano"]["nano_ops"]} >= {"attn_allreduce.0",
                                                                                "mlp_allreduce.0"}
    assert (tmp_path / "tl.png").stat().st_size > 0
