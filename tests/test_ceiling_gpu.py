"""`nfsearch ceiling` on a GPU: a tiny schedule's units measured alone, side by side on every placed
split, and the ceiling recomputed from the record."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from conftest import has_cuda_bindings  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.schedule import save_schedule  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402

from nfsearch.ceiling import SplitRate, overlap_ceiling  # noqa: E402
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
