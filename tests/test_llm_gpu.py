"""`nfrt.LLM` on a GPU: greedy tokens equal transformers' up to near-ties; one graph, no recapture.

tiny-llama runs in bf16 with the Triton kernels; tiny-mixtral in float32 with the reference kernels
on CUDA, because in bf16 a router near-tie sends a token to another expert than the reference does
(tests/test_model_hf_gpu.py), and greedy decoding then diverges by more than a logit near-tie.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.llm import LLM  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TIE_REL = 0.02  # a divergence is a tie when the two tokens' logits differ by < 2% of the logit scale


DTYPES = {"tiny-llama": torch.bfloat16, "tiny-mixtral": torch.float32}


def make_llm(name: str, weights, **kw) -> LLM:
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    sched = nano_schedule(tiny_config(name), BatchComposition(64, 16, 48, 40, 24), (0, 24, 40, 64),
                          mlp_on_second=frozenset({1}), num_sms=num_sms, sizes=(num_sms - 32, 32))
    # explicit pages: the default takes 90% of the free device memory, as a server would
    return LLM(sched, weights, device="cuda", max_seq_len=256, use_partitions=False, num_pages=512,
               dtype=DTYPES[name], **kw)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_greedy_matches_transformers(name, tiny_checkpoint, monkeypatch):
    import nfrt.kernels

    if DTYPES[name] == torch.float32:
        monkeypatch.setattr(nfrt.kernels, "_triton", {})  # the reference kernels, on CUDA
    folder = tiny_checkpoint(name, seed=6)
    llm = make_llm(name, folder, prefill_rows=4)
    graph, drain_graph = llm.engine.graph, llm.drain.engine.graph
    assert drain_graph is not None
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    lengths = torch.randint(1, 90, (24,), generator=gen).tolist()
    news = torch.randint(1, 24, (24,), generator=gen).tolist()
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    outs = llm.generate(prompts, max_new_tokens=news)
    assert llm.engine.graph is graph and llm.graph  # captured once, replayed for every batch mix
    assert llm.drain.engine.graph is drain_graph  # the drain's decode-only graph: also captured once
    assert llm.stats["loop"]["shapes"]["decode_only"]["iterations"] > 0
    assert llm.free_pages == llm.usable_pages
    eager = make_llm(name, folder, prefill_rows=4, cuda_graph=False)
    assert eager.generate(prompts, max_new_tokens=news) == outs  # the graph replays the eager forward

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[name]).cuda().eval()
    exact = 0
    for p, n, got in zip(prompts, news, outs, strict=True):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert len(got) == n
        if got == ref:
            exact += 1
            continue
        j = next(i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b)
        with torch.no_grad():  # the first divergence must be a near-tie in the reference's own logits
            logits = hf(torch.tensor([p + got[:j]], device="cuda")).logits[0, -1].float()
        gap = (logits[ref[j]] - logits[got[j]]).abs().item()
        assert gap <= TIE_REL * logits.abs().max().item(), f"request diverges at {j} with gap {gap}"
    assert exact >= len(prompts) // 2


def test_instrumented_loop_reads_device_times():
    import math

    llm = make_llm("tiny-llama", None, instrument=True)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    lengths = torch.randint(1, 90, (40,), generator=gen).tolist()
    news = torch.randint(1, 24, (40,), generator=gen).tolist()
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    outs = llm.generate(prompts, max_new_tokens=news)
    assert [len(o) for o in outs] == news and llm.free_pages == llm.usable_pages
    rows, shapes = llm.loop.rows, llm.stats["loop"]["shapes"]
    n = len(rows["iteration"])
    assert n == llm.stats["iterations"] and shapes["decode_only"]["iterations"] > 0
    for i in range(n):
        assert rows["forward_us"][i] > 0 and rows["upload_us"][i] >= 0 and rows["sample_us"][i] >= 0
        if i:
            assert rows["idle_us"][i] >= 0
        if i < n - 1:  # start to start covers the iteration's own device work
            busy = rows["upload_us"][i] + rows["forward_us"][i] + rows["sample_us"][i]
            assert rows["period_us"][i] >= busy - 1.0
    assert math.isnan(rows["period_us"][-1]) and math.isnan(rows["idle_us"][0])
    for d in shapes.values():
        assert d["median_us"]["forward"] > 0 and d["total_s"]["forward"] > 0
