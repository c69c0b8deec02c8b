"""The executor on a GPU (bf16): CUDA-graph replay equals eager; nano-batched equals sequential."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import close, has_cuda_bindings, tiny_config  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.engine import Engine  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_REL = 3e-2


def make_engine(name: str, partitions: bool) -> Engine:
    config = tiny_config(name)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    comp = BatchComposition(256, 192, 64, 100, 32)
    sched = nano_schedule(config, comp, (0, 96, 192, 256), mlp_on_second=frozenset({1}), num_sms=num_sms,
                          sizes=(num_sms - 32, 32))
    return Engine.from_schedule(sched, device="cuda", seed=0, use_partitions=partitions)


@pytest.mark.parametrize("partitions", [False, pytest.param(True, marks=pytest.mark.skipif(
    not has_cuda_bindings(), reason="green contexts need cuda-bindings"))])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_graph_replay_and_nano_batching(name, partitions):
    eng = make_engine(name, partitions)
    assert eng.model.dtype == torch.bfloat16
    b0, b1 = eng.synthetic_batch(seed=1), eng.synthetic_batch(seed=2)
    eager0 = eng.run(b0)
    seq0 = eng.sequential_twin().run(b0)
    close(eager0, seq0, BF16_REL)
    eager1 = eng.run(b1)
    assert not torch.allclose(eager0, eager1)  # different inputs, different logits

    eng.prepare(b0)
    eng.capture()
    eng.prepare(b1)  # same shape: refreshes the captured graph's inputs in place
    close(eng.replay().float(), eager1, BF16_REL)
    eng.prepare(b0)
    close(eng.replay().float(), eager0, BF16_REL)
    torch.cuda.synchronize()
    eng.close()


def test_sequential_twin_graph_matches_eager():
    eng = make_engine("tiny-llama", partitions=False).sequential_twin()
    batch = eng.synthetic_batch(seed=5)
    eager = eng.run(batch)
    eng.capture()
    close(eng.replay().float(), eager, rel=1e-2)
