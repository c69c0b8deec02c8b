"""`nfrt.LLM` on the CPU: greedy equals transformers, bad input, rejection, page accounting, sampling."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.errors import NfrtError  # noqa: E402
from nfrt.llm import LLM, RejectedError  # noqa: E402
from nfrt.sampling import sample  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402

COMP = BatchComposition(24, 6, 18, 20, 10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny ops run faster on one thread, and do not stall when CI's two cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(name: str, weights=None, **kw) -> LLM:
    sched = nano_schedule(tiny_config(name), COMP, (0, 5, 13, 24), mlp_on_second=frozenset({1}))
    kw.setdefault("max_seq_len", 64)
    return LLM(sched, weights, device="cpu", **kw)


def prompts_of(lengths, seed: int, vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_greedy_equals_transformers_generate(name, tiny_checkpoint):
    folder = tiny_checkpoint(name, seed=6)
    llm = make_llm(name, folder, prefill_rows=3)  # few rows: decodes overflow into the prefill region
    lengths = (1, 3, 7, 12, 20, 33, 5, 9, 17, 2, 40, 11, 26, 4)
    news = [8, 3, 12, 1, 6, 9, 10, 4, 7, 12, 5, 8, 2, 11]
    prompts = prompts_of(lengths, seed=int(torch.randint(0, 1000, ())))
    outs = llm.generate(prompts, max_new_tokens=news)
    assert llm.free_pages == llm.usable_pages
    assert llm.stats["iterations"] < sum(news)  # requests really ran concurrently
    assert llm.stats["loop"]["shapes"]["decode_only"]["iterations"] > 0  # the drain's shape ran too
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p, n, got in zip(prompts, news, outs, strict=True):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == ref


def test_drain_shape_and_instrumentation():
    from nfrt.loop_stats import COLUMNS

    seed = int(torch.randint(0, 1000, ()))
    llm = make_llm("tiny-llama", seed=seed, instrument=True)
    assert llm.drain is not None and llm.drain.slots == COMP.decode_tokens
    gen = torch.Generator().manual_seed(seed)
    n = 20
    lengths = torch.randint(1, 30, (n,), generator=gen).tolist()
    news = torch.randint(1, 16, (n,), generator=gen).tolist()
    prompts = prompts_of(lengths, seed=seed)
    outs = llm.generate(prompts, max_new_tokens=news)
    assert llm.free_pages == llm.usable_pages
    plain = make_llm("tiny-llama", seed=seed, drain_shape=False)
    assert plain.drain is None
    assert plain.generate(prompts, max_new_tokens=news) == outs  # the drain's shape changes no token

    st, loop = llm.stats, llm.stats["loop"]
    rows = llm.loop.rows
    shapes, phases = loop["shapes"], loop["phases"]
    assert st["tokens"] == sum(lengths) + sum(news) - n  # every position fed once (the last token never)
    assert st["iterations"] == len(rows["iteration"]) == rows["iteration"][-1] + 1
    assert sum(d["iterations"] for d in shapes.values()) == sum(d["iterations"] for d in phases.values()) \
        == st["iterations"]
    assert sum(d["slots"] for d in shapes.values()) == st["slots"]
    for name, d in phases.items():
        assert 0 <= d["padding"] == d["slots"] - d["tokens"]
        mine = [i for i, p in enumerate(rows["phase"]) if p == name]
        assert d["tokens"] == sum(rows["tokens"][i] for i in mine)
    assert phases["drain"]["iterations"] == shapes["decode_only"]["iterations"] > 0
    # the drain's iterations are decode-only and come last
    first = rows["shape"].index("decode_only")
    assert set(rows["shape"][first:]) == {"decode_only"} and set(rows["phase"][first:]) == {"drain"}
    last = len(rows["shape"])
    assert all(rows["prefill_decodes"][i] == rows["prefill_prompt"][i] == 0 for i in range(first, last))
    for i in range(last):  # the make-up adds up to the batch
        made_of = (rows["decode_slot_decodes"][i] + rows["decode_slot_prompt"][i] + rows["prefill_decodes"][i]
                   + rows["prefill_prompt"][i])
        assert rows["tokens"][i] == made_of <= rows["slots"][i]
    for h in ("plan", "fill", "enqueue", "wait", "collect"):  # host times: every iteration, sane
        v = rows[f"{h}_us"]
        assert all(0 <= x < 60e6 for x in v), h
        assert shapes["dense"]["median_us"][h] >= 0 and shapes["decode_only"]["median_us"][h] >= 0
    assert shapes["dense"]["median_us"]["forward"] is None  # device events: CUDA only
    text = llm.loop.csv_text().splitlines()
    assert text[0] == ",".join(COLUMNS) and len(text) == st["iterations"] + 1
    quiet = make_llm("tiny-llama", seed=seed)  # not instrumented: counts only
    quiet.generate(prompts[:3], max_new_tokens=news[:3])
    assert "median_us" not in quiet.stats["loop"]["shapes"]["dense"] and not quiet.loop.rows["iteration"]


def test_device_times_from_events(monkeypatch):
    """The event arithmetic of nfrt.loop_stats, on fake CUDA events stamped from a fake clock."""
    import math

    from nfrt.loop_stats import LoopStats
    from nfrt.scheduler import Item, Plan, Request

    clock = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def elapsed_time(self, end):  # ms, as torch.cuda.Event
            if self.t is None or end.t is None:
                raise RuntimeError("event not recorded")
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    loop = LoopStats(instrument=True, cuda=True)
    r = Request(0, (1, 2, 3), 4)
    want = []
    for k in range(5):
        up, fwd, smp, idle = (torch.rand(4, generator=gen) * 10).tolist()
        clock[0] += idle
        row = loop.add(Plan(k, (Item(r, 3 + k, 1, 0),), ()), "dense", 4)
        ev = loop.events(row)
        for e, dt in zip(ev, (up, fwd, smp, 0.0), strict=True):
            e.record()
            clock[0] += dt
        want.append((up, fwd, smp, idle))
    loop.events(loop.add(Plan(5, (Item(r, 8, 1, 0),), ()), "dense", 4))  # launched, never recorded
    loop.read_device()
    rows = loop.rows
    for k, (up, fwd, smp, idle) in enumerate(want):
        got = (rows["upload_us"][k], rows["forward_us"][k], rows["sample_us"][k])
        assert got == pytest.approx((up * 1e3, fwd * 1e3, smp * 1e3))
        if k:
            assert rows["idle_us"][k] == pytest.approx(idle * 1e3)
            assert rows["period_us"][k - 1] == pytest.approx((sum(want[k - 1][:3]) + idle) * 1e3)
    assert math.isnan(rows["idle_us"][0]) and math.isnan(rows["period_us"][4])
    assert math.isnan(rows["forward_us"][5])  # the unrecorded iteration is skipped, not an error
    summary = loop.summary()["shapes"]["dense"]
    assert summary["total_s"]["forward"] == pytest.approx(sum(w[1] for w in want) * 1e-3)
    assert summary["iterations"] == 6
    span = sum(sum(w[:3]) for w in want) + sum(w[3] for w in want[1:])
    assert loop.summary()["device_span_s"] == pytest.approx(span * 1e-3)


def test_bad_input_is_refused_before_anything_runs():
    llm = make_llm("tiny-llama")
    good = [1, 2, 3]
    cases = [([good, []], "prompt 1 is empty"),
             ([good, [5, 256]], "prompt 1: token id 256 at position 1 is outside the vocabulary [0, 256)"),
             ([[-3]], "token id -3 at position 0"),
             ([[1.5]], "token ids must be integers"),
             ("abc", "prompts must be a list")]
    for prompts, needle in cases:
        with pytest.raises(NfrtError, match=needle.replace("[", r"\[").replace(")", r"\)")):
            llm.generate(prompts, max_new_tokens=2)
    with pytest.raises(NfrtError, match="max_new_tokens must be an integer >= 1"):
        llm.generate([good], max_new_tokens=0)
    with pytest.raises(NfrtError, match="top_p"):
        llm.generate([good], top_p=0.0)
    with pytest.raises(NfrtError, match="temperature"):
        llm.generate([good], temperature=-1.0)
    assert llm.free_pages == llm.usable_pages
    assert llm.generate([good], max_new_tokens=2)[0].__len__() == 2  # still usable


def test_request_that_never_fits_is_rejected_others_complete():
    llm = make_llm("tiny-llama", num_pages=4)  # 3 usable pages of 16: 48 positions
    prompts = prompts_of((5, 60, 9, 40), seed=3)
    news = [4, 4, 3, 10]  # 60 + 4 - 1 = 63 and 40 + 10 - 1 = 49 positions: 4 pages each
    with pytest.raises(RejectedError, match="request 1 rejected.*4 pages of 16, the KV cache has 3") as e:
        llm.generate(prompts, max_new_tokens=news)
    assert set(e.value.errors) == {1, 3} and "and 1 more" in str(e.value)
    assert e.value.outputs[1] is None and e.value.outputs[3] is None
    alone = llm.generate([prompts[0], prompts[2]], max_new_tokens=[4, 3])
    assert [e.value.outputs[0], e.value.outputs[2]] == alone
    too_long = list(llm.stream([[1] * 60, [2]], max_new_tokens=[10, 2]))
    assert too_long[0].finish_reason == "rejected" and "max_seq_len 64" in too_long[0].error
    assert too_long[1].finish_reason == "length" and len(too_long[1].token_ids) == 2
    assert llm.free_pages == llm.usable_pages == 3


def test_hundreds_of_requests_none_lost_or_duplicated():
    llm = make_llm("tiny-llama", num_pages=24)  # far fewer pages than the requests need at once
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    n = 300
    lengths = torch.randint(1, 7, (n,), generator=gen).tolist()
    news = torch.randint(1, 4, (n,), generator=gen).tolist()
    prompts = prompts_of(lengths, seed=5)
    seen = []
    for c in llm.stream(prompts, max_new_tokens=news):
        assert c.finish_reason == "length" and len(c.token_ids) == news[c.index]
        assert all(0 <= t < 256 for t in c.token_ids)
        seen.append(c.index)
        assert llm.free_pages <= llm.usable_pages
    assert sorted(seen) == list(range(n))
    assert llm.free_pages == llm.usable_pages
    # batching does not change a request's tokens
    pick = [0, 17, 123, 299]
    many = llm.generate(prompts, max_new_tokens=news)
    assert llm.generate([prompts[i] for i in pick], max_new_tokens=[news[i] for i in pick]) == \
        [many[i] for i in pick]


def test_stopping_a_stream_early_frees_every_page():
    llm = make_llm("tiny-llama")
    it = llm.stream(prompts_of((3, 30, 8, 14), seed=2), max_new_tokens=[1, 20, 20, 20])
    first = next(it)
    assert first.index == 0 and llm.free_pages < llm.usable_pages
    it.close()
    assert llm.free_pages == llm.usable_pages
    assert len(llm.generate([[4, 5]], max_new_tokens=3)[0]) == 3


def test_sampling_is_seeded_and_batch_independent():
    llm = make_llm("tiny-llama", seed=3)
    prompts = prompts_of((4, 11, 7, 19, 2), seed=8)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
    a = llm.generate(prompts, seed=1, **kw)
    assert llm.generate(prompts, seed=1, **kw) == a
    assert llm.generate(prompts, seed=2, **kw) != a
    # the same request alone (index 0 under the same seed) draws the same tokens
    assert llm.generate([prompts[0]], seed=1, **kw) == [a[0]]
    greedy = llm.generate(prompts, max_new_tokens=10)
    assert a != greedy
    assert llm.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=4) == greedy


def test_sample_frequencies_follow_softmax_and_nucleus():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    logits = torch.randn(1, 6, generator=gen) * 1.5
    n = 6000
    rows = logits.expand(n, 6).contiguous()
    temp = torch.full((n,), 0.8)
    out = torch.empty(n, dtype=torch.int64)
    keys = torch.full((n,), 12345, dtype=torch.int64)
    steps = torch.arange(n, dtype=torch.int64)
    sample(rows, temp, torch.ones(n), keys, steps, out)
    want = torch.softmax(logits[0] / 0.8, 0)
    freq = torch.bincount(out, minlength=6).float() / n
    assert (freq - want).abs().max() < 0.03
    # top-p 0.6: only the smallest set of tokens reaching 60% of the mass, renormalised
    p, order = torch.sort(want, descending=True)
    keep = order[: int((torch.cumsum(p, 0) - p < 0.6).sum())]
    sample(rows, temp, torch.full((n,), 0.6), keys, steps, out)
    freq = torch.bincount(out, minlength=6).float() / n
    assert set(torch.nonzero(freq).flatten().tolist()) == set(keep.tolist())
    assert (freq[keep] - want[keep] / want[keep].sum()).abs().max() < 0.03


def test_example_script_runs_on_cpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "generate.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--requests", "5",
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("request ") == 5 and "KV pages free again: True" in out.stdout


def test_bench_e2e_on_cpu(tmp_path, capsys):
    import json

    from nfrt.schedule import save_schedule

    from nfsearch import bench_e2e
    from nfsearch.cli import main

    pairs = bench_e2e.synthetic_lengths(12, 6, 4000, seed=int(torch.randint(0, 1000, ())))
    assert all(1 <= a <= 23 and 1 <= b <= 11 for a, b in pairs)
    assert abs(sum(a for a, _ in pairs) / 4000 - 12) < 0.3 and abs(sum(b for _, b in pairs) / 4000 - 6) < 0.2
    assert bench_e2e.fit_lengths([(50, 10), (5, 3)], 40) == ([(31, 10), (5, 3)], 1)
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,7,3\n1,20,2\n2,1,5\n")
    assert bench_e2e.read_trace(str(trace), 2) == [(7, 3), (20, 2)]

    sched = nano_schedule(tiny_config("tiny-llama"), COMP, (0, 5, 13, 24))
    path = save_schedule(sched, tmp_path / "s.yaml")
    argv = ["bench", "--e2e", "--schedule", str(path), "--trace", str(trace), "--device", "cpu", "--json",
            "--out", str(tmp_path / "runs")]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["num_requests"] == 3 and rec["served_tokens"] == 38 and rec["pages_free_after"]
    assert rec["tokens_per_s_per_gpu"] > 0 and rec["iteration"]["tokens_per_s"] > 0
    assert list((tmp_path / "runs").glob("*-e2e.json"))
    loop = rec["loop"]
    assert rec["iterations"] == sum(d["iterations"] for d in loop["phases"].values())
    assert rec["iterations_decode_only"] == loop["shapes"]["decode_only"]["iterations"] > 0
    assert 0 < rec["batch_utilization"] <= 1 and rec["decode_only_slots"] == COMP.decode_tokens
    assert loop["shapes"]["dense"]["median_us"]["plan"] > 0
    lines = (tmp_path / "runs" / rec["iterations_csv"].split("/")[-1]).read_text().splitlines()
    assert len(lines) == rec["iterations"] + 1 and lines[0].startswith("iteration,shape,phase")
    assert main(["bench", "--e2e", "--schedule", str(path), "--trace", str(trace), "--device", "cpu",
                 "--out", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "padding slots" in table and "decode-only" in table and "fill (pinned staging)" in table
    for d in loop["shapes"].values():  # the CUDA-only lines, on made-up device times
        for key in ("upload", "forward", "sample", "idle", "period"):
            d["median_us"][key] = d["total_s"][key] = 1.5
    loop["device_span_s"] = 0.5
    loop["dense_forward_median_us"]["prefill_decode_runs"] = 1.5
    from datetime import datetime

    base = datetime(2026, 11, 21, 10, 0, 0)
    lines = [f"{base.replace(second=i).strftime('%Y/%m/%d %H:%M:%S')}.250, {1980 - 10 * i}, "
             f"{'[N/A]' if i == 3 else 600 + i}, {60 + i}" for i in range(8)]
    smi = "\n".join(lines) + "\nNo devices were found\n"
    t0 = base.timestamp()
    gpu = bench_e2e.GpuMonitor.parse(smi, {"serving": (t0, t0 + 4.9), "iteration_level": (t0 + 5, t0 + 9)})
    assert gpu["serving"] == {"samples": 5, "sm_clock_mhz": 1960.0, "power_w": 602.0, "temperature_c": 62.0}
    assert gpu["iteration_level"]["samples"] == 3 and gpu["iteration_level"]["sm_clock_mhz"] == 1920.0
    rec["gpu_clocks"] = gpu
    cuda_table = bench_e2e.format_e2e(rec)
    assert "sm_clock_mhz 1960.0 / 1920.0" in cuda_table
    assert "dense forward in the loop vs back to back" in cuda_table and "attention reads" in cuda_table
    assert main(["bench", "--e2e", "--schedule", str(path), "--num-requests", "0", "--device", "cpu"]) == 2


def test_time_iteration_warms_before_timing(monkeypatch):
    import time

    llm = make_llm("tiny-llama", seed=int(torch.randint(0, 1000, ())))
    launches = []
    real = llm._launch
    plans = []
    monkeypatch.setattr(llm, "_launch", lambda *a: (launches.append(time.perf_counter()), plans.append(a[0]),
                                                    real(*a))[2])
    t0 = time.perf_counter()
    it = llm.time_iteration(iters=4, warmup=1, warm_s=0.3)
    # the tokens it feeds are random ids (real data), not one repeated id: a power-capped GPU clocks
    # identical rows higher
    items = plans[-1].decode + plans[-1].prefill
    fed = [i.request.prompt[i.start + k] for i in items for k in range(i.length)]
    assert len(fed) == COMP.dense_batch and len(set(fed)) > len(fed) // 4
    assert it["warm_s"] == 0.3 and it["forward_us"] > 0
    # the prefill region laid out as make_batch lays it out (length-biased phase, nfrt.layout)
    from nfrt.layout import position_sum, prefill_chunks

    pre = llm.shape.prefill_tokens
    assert it["prefill_position_sum"] == position_sum(prefill_chunks(pre, it["prefill_context"]))
    assert it["decode_context_sum"] == llm.shape.decode_slots * it["decode_context"]
    # the last 5 launches are the timed ones (1 warmup + 4); the untimed ones fill the 0.3 s before
    assert launches[-5] - t0 >= 0.3 and len(launches) > 5
    assert llm.free_pages == llm.usable_pages
    launches.clear()
    llm.time_iteration(iters=4, warmup=1)  # no warm replays by default
    assert len(launches) == 5


def test_bench_e2e_refuses_negative_warm(tmp_path, capsys):
    from nfrt.schedule import save_schedule

    from nfsearch.cli import main

    sched = nano_schedule(tiny_config("tiny-llama"), COMP, (0, 5, 13, 24))
    path = save_schedule(sched, tmp_path / "s.yaml")
    argv = ["bench", "--e2e", "--schedule", str(path), "--iteration-warm-s", "-1", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--iteration-warm-s must be >= 0, got -1.0" in err and err.count("\n") == 1
