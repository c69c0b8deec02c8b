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
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p, n, got in zip(prompts, news, outs, strict=True):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == ref


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
    assert main(["bench", "--e2e", "--schedule", str(path), "--num-requests", "0", "--device", "cpu"]) == 2
