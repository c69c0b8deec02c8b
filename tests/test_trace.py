"""nfrt.trace on the CPU: the engine's stamps, the per-layer analysis and the --timeline record/PNG."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nfrt.engine import Engine  # noqa: E402
from nfrt.errors import NfrtError  # noqa: E402
from nfrt.schedule import load_schedule  # noqa: E402
from nfrt.trace import FIRST_OP_SLOT, Tracer, compare, layer_rows, stream_stats  # noqa: E402

DATA = Path(__file__).parent / "data"


def test_cpu_engine_stamps_every_nano_op_and_keeps_the_output():
    s = load_schedule(DATA / "tiny_llama_3stream.yaml")
    seed = random.randrange(1000)
    plain = Engine.from_schedule(s, device="cpu", seed=seed)
    traced = Engine(s, plain.model, trace=True)
    assert plain.tracer is None
    batch = plain.synthetic_batch(seed=seed)
    ref = plain.run(batch)
    got = traced.run(batch)
    assert torch.equal(ref, got)
    st = traced.tracer.read()
    L, n = s.metadata.num_layers, len(traced.order)
    assert len(st) == FIRST_OP_SLOT + 2 * L * n and all(x > 0 for x in st)
    assert st[0] <= min(st[FIRST_OP_SLOT:]) and st[1] >= max(st[FIRST_OP_SLOT:])
    order = [(nop.name, s.streams[si].name, bool(traced.waits.get(nop.name))) for si, nop in traced.order]
    for layer in range(L):
        rows = layer_rows(st, layer, order, L)
        assert min(r.start_us for r in rows) == 0.0
        # the CPU executor is synchronous: each nano-op starts after the previous one ended
        for a, b in zip(rows, rows[1:], strict=False):
            assert b.start_us >= a.end_us >= a.start_us
    pred = {e.nano_op: (e.start_us, e.end_us) for e in s.prediction.timeline}
    cmp = compare(layer_rows(st, 1, order, L), pred)
    assert {c["nano_op"] for c in cmp} == set(pred)
    assert min(c["predicted_start_us"] for c in cmp) == 0.0
    for c in cmp:
        assert c["predicted_duration_us"] == pytest.approx(pred[c["nano_op"]][1] - pred[c["nano_op"]][0])


def test_analysis_on_random_stamps():
    rng = random.Random()
    order = [("a.0", "s1", False), ("b.0", "s2", True), ("a.1", "s1", True), ("c.0", "s1", False)]
    L, n = 3, len(order)
    st = [0] * (FIRST_OP_SLOT + 2 * L * n)
    st[0], st[1] = 1, 10**9
    times = {}
    for layer in range(L):
        t = 10**6 * (layer + 1)
        base = FIRST_OP_SLOT + 2 * layer * n
        # s1: a.0, gap g1 (waits), a.1, gap g2 (no wait), c.0; s2: b.0 concurrent
        g1, g2 = rng.randint(1, 9000), rng.randint(1, 9000)
        d = [rng.randint(1000, 50000) for _ in range(4)]
        a0 = (t, t + d[0])
        a1 = (a0[1] + g1, a0[1] + g1 + d[2])
        c0 = (a1[1] + g2, a1[1] + g2 + d[3])
        b0 = (t + 500, t + 500 + d[1])
        for i, (s0, e0) in enumerate((a0, b0, a1, c0)):
            st[base + 2 * i], st[base + 2 * i + 1] = s0, e0
        times[layer] = (g1, g2, d)
    rows = layer_rows(st, 2, order, L)
    g1, g2, d = times[2]
    stats = stream_stats(rows)
    assert stats["s1"]["event_wait_gap_us"] == pytest.approx(g1 / 1e3)
    assert stats["s1"]["other_gap_us"] == pytest.approx(g2 / 1e3)
    assert stats["s1"]["busy_us"] == pytest.approx((d[0] + d[2] + d[3]) / 1e3)
    assert stats["s2"]["busy_us"] == pytest.approx(d[1] / 1e3)
    assert rows[1].start_us == pytest.approx(0.5)
    st[FIRST_OP_SLOT + 2 * n] = 0  # an unwritten stamp of layer 1
    with pytest.raises(NfrtError, match="unwritten"):
        layer_rows(st, 1, order, L)
    with pytest.raises(NfrtError, match="do not fit"):
        layer_rows(st[:-1], 0, order, L)
    with pytest.raises(NfrtError):
        Tracer(2, 3, "cpu").slot(2, 0, False)


def test_timeline_record_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    from nfsearch.bench_timeline import draw_timeline, format_lines, timeline_summary

    s = load_schedule(DATA / "tiny_llama_3stream.yaml")
    eng = Engine.from_schedule(s, device="cpu", trace=True)
    eng.run(eng.synthetic_batch())
    order = [(nop.name, s.streams[si].name, bool(eng.waits.get(nop.name))) for si, nop in eng.order]
    v = {"stamps": eng.tracer.read(), "order": order, "num_layers": s.metadata.num_layers,
         "iteration_us": 123.0}
    sustained = {"window": (100.0, 102.5), "replays": 40, "iteration_us": 61000.0,
                 "gpu": {"samples": 12, "sm_clock_mhz": 1620.0, "power_w": 699.0, "temperature_c": 60.0}}
    tl = timeline_summary(s, {"variants": {"nano": v, "nano_serialized": dict(v, sustained=sustained)},
                              "stream_check": None})
    nano = tl["variants"]["nano"]
    assert "sustained" not in nano
    sus = tl["variants"]["nano_serialized"]["sustained"]
    assert sus["seconds"] == 2.5 and sus["replays"] == 40 and sus["gpu"]["sm_clock_mhz"] == 1620.0
    assert any("sustained 2.5 s (40 replays): iteration 61.000 ms" in line and "sm_clock_mhz 1620.0" in line
               for line in format_lines(tl))
    assert len(nano["nano_ops"]) == len(order)
    assert all(r["measured_over_predicted"] > 0 for r in nano["nano_ops"])
    busy = {st.name: sum(e.end_us - e.start_us for e in s.prediction.timeline if e.stream == st.name)
            for st in s.streams}
    for st, d in nano["streams"].items():
        assert d["predicted_busy_us"] == pytest.approx(busy[st])
    assert any("compute-132" in line for line in format_lines(tl))
    rec = {"model": s.metadata.model, "workload": s.metadata.workload, "timeline": tl}
    png = draw_timeline(s, rec, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
