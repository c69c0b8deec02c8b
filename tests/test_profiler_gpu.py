"""The profiler on a real GPU: a tiny model over a tiny grid, end to end (skipped without CUDA)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from nfsearch.models import resolve_model  # noqa: E402
from nfsearch.profile import load_profile  # noqa: E402
from nfsearch.profiler.grid import ProfileGrid, op_points  # noqa: E402
from nfsearch.profiler.run import partial_path, run_profile  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny_grid() -> ProfileGrid:
    props = torch.cuda.get_device_properties(0)
    total, small = props.multi_processor_count, (8 if props.major >= 9 else 4)
    return ProfileGrid(sms=(small, 2 * small, total), tokens=(64, 256), decode_requests=(64, 128),
                       decode_contexts=(32, 256), prefill_tokens=(64, 128), prefill_contexts=(32, 128),
                       splits=(2 * small,), interference_tokens=128, interference_decode=(64, 256), repeats=3,
                       placed_sms=4 * small, corun_s=0.05)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_tiny_profile_end_to_end(tmp_path, name: str) -> None:
    from nfsearch.profiler.measure import GpuTimer

    model = resolve_model(name)
    grid = _tiny_grid()
    out = tmp_path / f"{name}-tp1.json"
    timer = GpuTimer(model, 1, grid, rotate_layers=2, kv_pool_bytes=64 << 20)
    prof = run_profile(model, 1, grid, timer, out, gpu_slug="test-gpu", sm_granularity=8, nvlink_gbps=0.0)
    assert not partial_path(out).exists() and load_profile(out) == prof
    assert len(prof.latency) == len(op_points(model, 1, grid)) * len(grid.sms)
    lat = prof.latency["latency_us"].to_numpy()
    assert (lat > 0).all() and all(math.isfinite(x) for x in lat)
    assert prof.meta.gpu_name == torch.cuda.get_device_name(0) and prof.meta.torch == torch.__version__
    assert 10 < prof.meta.peak_tflops < 5000 and 100 < prof.meta.hbm_gbps < 20000
    assert (prof.interference["slowdown"] >= 1.0).all() and len(prof.interference) > 0
    # decode attention reads 8x the KV at 256 than at 32 tokens of context: it must take longer
    s = grid.sms[-1]
    assert prof.latency_us("attn_decode", 128, 256, s) > prof.latency_us("attn_decode", 128, 32, s)
