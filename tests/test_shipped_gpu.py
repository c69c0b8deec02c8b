"""The shipped schedules for this GPU, on real model shapes cut to a few layers: the nano-batched
engine (green-context partitions, events, CUDA graph) computes what its sequential twin computes.

Fresh random inputs for every run; the logits buffer is poisoned with NaN before each forward.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nfrt.engine import Engine  # noqa: E402
from nfrt.schedule import load_schedule  # noqa: E402

from nfsearch.bench import truncate  # noqa: E402
from nfsearch.gpus import gpu_slug_for_device_name  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCHEDULES = sorted((Path(__file__).resolve().parent.parent / "schedules").glob("*.yaml"))
LAYERS = 2
RTOL = 3e-2  # bf16


def _for_this_gpu() -> list[Path]:
    if not torch.cuda.is_available():
        return []
    slug = gpu_slug_for_device_name(torch.cuda.get_device_name(0))
    out = []
    for p in SCHEDULES:
        meta = load_schedule(p).metadata
        if meta.gpu == slug and meta.tp == 1 and not p.stem.endswith("-hand"):
            out.append(p)
    return out


@pytest.mark.parametrize("path", _for_this_gpu(), ids=lambda p: p.stem)
def test_shipped_schedule_nano_equals_sequential(path):
    schedule = truncate(load_schedule(path), LAYERS)
    eng = Engine.from_schedule(schedule, device="cuda", seed=random.randrange(2**31))
    twin = eng.sequential_twin()
    batch = eng.synthetic_batch(seed=random.randrange(2**31))
    try:
        eng.prepare(batch)
        eng.model.logits.fill_(float("nan"))
        nano = eng.run()
        twin.prepare(batch)
        twin.model.logits.fill_(float("nan"))
        seq = twin.run()
        assert torch.isfinite(nano).all() and torch.isfinite(seq).all()
        err = (nano - seq).abs().max().item()
        assert err <= RTOL * seq.abs().max().item(), f"{path.name}: max error {err}"
        eng.prepare(batch)
        eng.capture()
        eng.model.logits.fill_(float("nan"))
        replayed = eng.replay().float()
        torch.cuda.synchronize()
        err = (replayed - nano).abs().max().item()
        assert err <= RTOL * nano.abs().max().item(), f"{path.name}: graph replay differs by {err}"
    finally:
        eng.close()
        del eng, twin
        torch.cuda.empty_cache()
