"""nfrt.trace on a GPU: stamps captured in the CUDA graph, rewritten by each replay, in order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import has_cuda_bindings, tiny_config  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.engine import Engine  # noqa: E402
from nfrt.schedule import load_schedule  # noqa: E402
from nfrt.trace import ITER_END, ITER_START, Tracer, layer_rows  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DATA = Path(__file__).parent / "data"


def test_stamp_kernel_measures_device_time():
    tr = Tracer(1, 1, "cuda")
    tr.stamp(0)
    torch.cuda._sleep(2_000_000)  # ~1 ms of spinning at ~2 GHz
    tr.stamp(1)
    a, b = tr.read()[:2]
    assert 100_000 < b - a < 100_000_000  # ns


@pytest.mark.parametrize("partitions", [False, pytest.param(True, marks=pytest.mark.skipif(
    not has_cuda_bindings(), reason="needs cuda-bindings"))])
def test_traced_graph_replay(partitions):
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    if partitions:  # disjoint partitions that any GPU's SM split can make
        comp = BatchComposition(256, 192, 64, 100, 32)
        s = nano_schedule(tiny_config("tiny-llama"), comp, (0, 96, 192, 256), mlp_on_second=frozenset({1}),
                          num_sms=num_sms, sizes=(num_sms - 32, 32))
    else:  # overlapping partitions (plain streams here), a predicted timeline
        s = load_schedule(DATA / "tiny_llama_3stream.yaml")
    seed = random.randrange(1000)
    plain = Engine.from_schedule(s, device="cuda", seed=seed, use_partitions=partitions)
    traced = Engine(s, plain.model, use_partitions=partitions, trace=True)
    try:
        batch = plain.synthetic_batch(seed=seed)
        ref = plain.run(batch).clone()
        traced.prepare(batch)
        traced.capture()
        traced.tracer.clear()
        got = traced.replay().float().clone()
        err = (got - ref).abs().max().item()
        assert torch.isfinite(got).all() and err <= 3e-2 * ref.abs().max().item()
        st = traced.tracer.read()
        assert all(x > 0 for x in st), "a stamp was not written by the replay"
        assert st[ITER_START] <= min(st[2:]) and st[ITER_END] >= max(st[2:])
        L = s.metadata.num_layers
        order = [(nop.name, s.streams[si].name, bool(traced.waits.get(nop.name))) for si, nop in traced.order]
        for layer in range(L):
            rows = {r.nano_op: r for r in layer_rows(st, layer, order, L)}
            for stream in s.streams:  # FIFO on each stream
                seq = [rows[n.name] for n in stream.nano_ops]
                for a, b in zip(seq, seq[1:], strict=False):
                    assert b.start_us >= a.end_us
            for d in s.dependencies:  # same-layer event waits hold
                if not d.prev_layer:
                    assert rows[d.after].start_us >= rows[d.before].end_us
        first = list(st)
        traced.tracer.clear()
        traced.replay()
        again = traced.tracer.read()
        assert all(x > 0 for x in again) and again[ITER_START] > first[ITER_END]
        ser = Engine(s, plain.model, use_partitions=partitions, trace=True, serialize=True)
        try:  # serialized: each nano-op starts after the one issued before it has ended
            ser.prepare(batch)
            ser.capture()
            got = ser.replay().float()
            assert (got - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()
            st = ser.tracer.read()
            for layer in range(L):
                rows = layer_rows(st, layer, order, L)
                for a, b in zip(rows, rows[1:], strict=False):
                    assert b.start_us >= a.end_us
        finally:
            ser.close()
    finally:
        traced.close()
        plain.close()
