"""The executor on the CPU: nano-batched schedules equal the sequential twin and Hugging Face."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import close  # noqa: E402
from nfrt.batch import Batch, DecodeRequest, PrefillChunk  # noqa: E402
from nfrt.config import BatchComposition  # noqa: E402
from nfrt.engine import Engine  # noqa: E402
from nfrt.errors import NfrtError, ScheduleError  # noqa: E402
from nfrt.schedule import dumps, load_schedule, loads  # noqa: E402
from nfrt.weights import random_weights  # noqa: E402
from schedules_util import nano_schedule  # noqa: E402

DATA = Path(__file__).parent / "data"
PROMPTS = (6, 19, 30, 11)  # batch 1 prefills these; batch 2 decodes one token each
CHUNK = 13  # batch 2 also prefills a fifth prompt of this length


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_nano_batched_equals_sequential_and_hf(name, tiny_checkpoint):
    folder = tiny_checkpoint(name, seed=4)
    from nfrt.weights import load_hf_weights

    config, _ = load_hf_weights(folder)
    gen = torch.Generator().manual_seed(21)
    seqs = [torch.randint(0, config.vocab_size, (n + 1,), generator=gen) for n in PROMPTS]
    seqs.append(torch.randint(0, config.vocab_size, (CHUNK,), generator=gen))

    # Batch 1: four prompts, no decodes; nano-batches cut through prompts.
    n1 = sum(PROMPTS)
    comp1 = BatchComposition(n1, 0, n1, 1, 17)
    s1 = nano_schedule(config, comp1, (0, 10, 40, n1), mlp_on_second=frozenset({1}))
    eng1 = Engine.from_schedule(s1, weights=folder, device="cpu", num_pages=64)
    chunks = tuple(PrefillChunk(i, 0, n) for i, n in enumerate(PROMPTS))
    b1 = Batch((), chunks, tuple(t for i, n in enumerate(PROMPTS) for t in seqs[i][:n].tolist()),
               sample_positions=tuple(range(n1)))
    got1 = eng1.run(b1)
    ref1 = eng1.sequential_twin().run(b1)

    # Batch 2 on the same model and KV cache: a decode step of each prompt, then a fresh prompt.
    n2 = len(PROMPTS) + CHUNK
    comp2 = BatchComposition(n2, len(PROMPTS), CHUNK, 20, CHUNK)
    s2 = nano_schedule(config, comp2, (0, 2, 7, n2), mlp_on_second=frozenset({0, 2}))
    eng2 = Engine(s2, eng1.model)
    b2 = Batch(tuple(DecodeRequest(i, n + 1) for i, n in enumerate(PROMPTS)), (PrefillChunk(9, 0, CHUNK),),
               tuple([int(seqs[i][n]) for i, n in enumerate(PROMPTS)] + seqs[4].tolist()),
               sample_positions=tuple(range(n2)))
    got2 = eng2.run(b2)
    ref2 = eng2.sequential_twin().run(b2)

    close(got1, ref1, rel=1e-5)
    close(got2, ref2, rel=1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        row = 0
        for i, n in enumerate(PROMPTS):
            full = hf(seqs[i][None]).logits[0]  # [n + 1, vocab]
            close(got1[row: row + n], full[:n])
            close(got2[i], full[n])
            row += n
        close(got2[len(PROMPTS):], hf(seqs[4][None]).logits[0])


def test_hand_written_schedule_file_runs(tmp_path):
    """tests/data's 2-stream schedule with random weights: synthetic batch, equal to sequential."""
    sched = load_schedule(DATA / "tiny_llama_2stream.yaml")
    eng = Engine.from_schedule(DATA / "tiny_llama_2stream.yaml", device="cpu", seed=1)
    assert eng.config == sched.metadata.model_config
    batch = eng.synthetic_batch(seed=3)
    assert (batch.num_tokens, batch.num_decode) == (256, 192)
    got = eng.run(batch)
    ref = eng.sequential_twin().run(batch)
    assert got.shape == (len(batch.sample_positions), sched.metadata.model_config.vocab_size)
    close(got, ref, rel=1e-5)
    other = Engine.from_schedule(sched, device="cpu", seed=2).run(batch)
    assert not torch.allclose(other, got)  # the seed picks the weights


def test_schedule_for_other_model_is_refused(tiny_checkpoint):
    folder = tiny_checkpoint("tiny-mixtral")
    with pytest.raises(ScheduleError, match="schedule is for tiny-llama, weights are tiny-mixtral"):
        Engine.from_schedule(DATA / "tiny_llama_2stream.yaml", weights=folder, device="cpu")


def test_newer_schema_is_refused():
    text = (DATA / "tiny_llama_2stream.yaml").read_text().replace("schema_version: 1", "schema_version: 99")
    with pytest.raises(ScheduleError, match="newer"):
        loads(text)
    sched = load_schedule(DATA / "tiny_llama_2stream.yaml")
    assert "schema_version: 1" in dumps(sched)


def test_op_of_other_family_is_refused(tiny_configs):
    moe = tiny_configs["tiny-mixtral"]
    sched = nano_schedule(moe, BatchComposition(8, 2, 6, 4, 6), (0, 4, 8))
    llama = replace(tiny_configs["tiny-llama"], name=moe.name)
    with pytest.raises(ScheduleError, match="layers.0.router"):
        Engine.from_schedule(sched, weights=random_weights(llama), device="cpu")
    model = Engine.from_schedule(nano_schedule(llama, BatchComposition(8, 2, 6, 4, 6), (0, 8)),
                                 device="cpu").model
    with pytest.raises(ScheduleError, match="op router does not exist"):
        Engine(sched, model)


def test_batch_checks(tiny_configs):
    config = tiny_configs["tiny-llama"]
    sched = nano_schedule(config, BatchComposition(8, 2, 6, 4, 6), (0, 4, 8))
    eng = Engine.from_schedule(sched, device="cpu", num_pages=8)
    with pytest.raises(NfrtError, match="no batch prepared"):
        eng.run()
    with pytest.raises(ScheduleError, match="decode tokens"):
        eng.run(Batch((DecodeRequest(0, 3),), (PrefillChunk(1, 0, 7),), tuple(range(8))))
    with pytest.raises(NfrtError, match="out of pages"):
        eng.run(Batch((DecodeRequest(0, 100), DecodeRequest(1, 100)), (PrefillChunk(2, 0, 6),),
                      tuple(range(8))))
