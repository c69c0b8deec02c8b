"""`nfsearch ceiling` on a GPU: a tiny schedule's units measured alone, side by side on every placed
split, and the ceiling recomputed from the record; the same at tp 2 on two GPUs (torchrun), with the
all-reduces as a third unit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import has_cuda_bindings  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.schedule import save_schedule  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402

from nfsearch.ceiling import (  # noqa: E402
    PairRate,
    SplitRate,
    TripleRate,
    UnitRate,
    network_ceiling,
    other_ceiling,
    overlap_ceiling,
)
from nfsearch.cli import main  # noqa: E402
from nfsearch.models import resolve_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_ceiling_tiny_schedule(tmp_path, capsys):
    if not has_cuda_bindings():
        pytest.skip("the splits run on green-context partitions (cuda-bindings)")
    from nfrt.partition import make_layout

    from nfsearch.profiler.grid import full_grid

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sched = nano_schedule(resolve_model("tiny-llama"), BatchComposition(256, 192, 64, 100, 32),
                          (0, 96, 192, 256), mlp_on_second=frozenset({1}), num_sms=sms, sizes=(sms - 32, 32))
    path = save_schedule(sched, tmp_path / "tiny.yaml")
    out = tmp_path / "runs"
    assert main(["ceiling", "--schedule", str(path), "--seconds", "0.05", "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    (written,) = out.iterdir()
    assert json.loads(written.read_text()) == rec
    layout = make_layout(0)
    top = layout.aligned
    layout.close()
    want = [s for s in full_grid(sms).sms if top // 3 <= s <= top - 8]
    assert [s["compute_sms"] for s in rec["splits"]] == want
    assert all(s["compute_sms"] + s["memory_sms"] == top for s in rec["splits"])
    assert rec["c_us"] > 0 and rec["m_us"] > 0 and rec["other_us"] > 0 and rec["seq_pair_us"] > 0
    assert rec["best_us"] <= rec["c_us"] + rec["m_us"] + 1e-9  # doing both alone is always a mix
    splits = [SplitRate(s["compute_sms"], s["memory_sms"], s["tc_us"], s["tm_us"]) for s in rec["splits"]]
    ceil = overlap_ceiling(rec["c_us"], rec["m_us"], rec["other_us"], rec["seq_pair_us"], splits)
    assert ceil.mix.time_us == pytest.approx(rec["best_us"])
    assert rec["ceiling_layer_other_free"] >= rec["ceiling_layer_other_serial"] > 0
    # the other ops as a third unit: beside compute and beside memory on every size up to top / 2,
    # and three ways from the three best splits
    o = rec["other_unit_ceiling"]
    o_sizes = [s for s in full_grid(sms).sms if s <= top // 2]
    assert [(p["bottom"], p["top_sms"]) for p in o["pairs"]] == [
        (b, s) for b in ("compute", "memory") for s in o_sizes]
    assert all(p["top"] == "other" and p["bottom_sms"] + p["top_sms"] == top for p in o["pairs"])
    assert o["triples"] and all(t["compute_sms"] + t["other_sms"] + t["memory_sms"] == top
                                for t in o["triples"])
    assert o["o_us"] == rec["other_us"] and o["seq_layer_us"] > 0
    oc = other_ceiling(rec["c_us"], rec["m_us"], o["o_us"], o["seq_layer_us"], splits,
                       [PairRate(**p) for p in o["pairs"]], [TripleRate(**t) for t in o["triples"]])
    assert oc.mix.time_us == pytest.approx(o["best_us"])
    assert o["best_us"] <= (rec["best_us"] + rec["other_us"]) * (1 + 1e-9)  # O alone is one of its modes


ROOT = Path(__file__).resolve().parent.parent


def test_ceiling_tp2_tiny_schedule(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if not has_cuda_bindings():
        pytest.skip("the splits run on green-context partitions (cuda-bindings)")
    from nfrt.schedule import Schedule, load_schedule
    from nfrt.tp import NO_MULTICAST_ENV

    # tiny-llama at tp 2 on the layer graph (network ops included) of a shipped TP schedule
    shipped = load_schedule(ROOT / "schedules" / "llama3-70b-h200-tp4-splitwise.yaml")
    config = resolve_model("tiny-llama")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = replace(shipped.metadata, model=config.name, model_config=config, tp=2, num_sms=sms,
                   batch=BatchComposition(256, 192, 64, 100, 32), dense_batch=256,
                   num_layers=config.num_layers, workload="test")
    path = save_schedule(Schedule.sequential(meta, shipped.layer), tmp_path / "tiny-tp2.yaml")
    out = tmp_path / "runs"
    env = dict(os.environ, **NO_MULTICAST_ENV, OMP_NUM_THREADS="4")
    run = subprocess.run([sys.executable, "-m", "nfsearch", "ceiling", "--schedule", str(path),
                          "--seconds", "0.05", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:] + run.stdout[-4000:]
    (written,) = out.iterdir()
    assert "-tp2-" in written.name
    rec = json.loads(written.read_text())
    assert rec["tp"] == 2 and [n for n, *_ in rec["network_unit"]] == ["attn_allreduce", "mlp_allreduce"]
    for key in ("c_us", "m_us", "n_us", "other_us", "seq_us", "best_us", "pairs_best_us"):
        assert math.isfinite(rec[key]) and rec[key] > 0, key
    kinds = {(p["bottom"], p["top"]) for p in rec["pairs"]}
    assert kinds == {("compute", "memory"), ("compute", "network"), ("memory", "network")}
    top = rec["top_sms"]
    assert all(p["bottom_sms"] + p["top_sms"] == top for p in rec["pairs"])
    assert all(p["top_sms"] <= 32 for p in rec["pairs"] if p["top"] == "network")
    # doing the units one after the other is always a mix; the three-way modes only add to it
    assert rec["best_us"] <= rec["pairs_best_us"] * (1 + 1e-9)
    assert rec["pairs_best_us"] <= (rec["c_us"] + rec["m_us"] + rec["n_us"]) * (1 + 1e-9)
    ceil = network_ceiling(rec["c_us"], rec["m_us"], rec["n_us"], rec["other_us"], rec["seq_us"],
                           [PairRate(**p) for p in rec["pairs"]],
                           [UnitRate(**a) for a in rec["alone_partition"]], top)
    assert ceil.mix.time_us == pytest.approx(rec["best_us"])
    # the sequential triple runs about as fast as its units alone, so every ceiling is about >= 1
    assert rec["ceiling_units"] >= 0.9
    assert rec["ceiling_layer_other_free"] >= rec["ceiling_layer_other_serial"] >= 0.9
