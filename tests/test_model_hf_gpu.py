"""The runtime's model on CUDA in bf16 (Triton kernels, paged KV) equals Hugging Face transformers.

A tiny checkpoint loads into transformers on CUDA in float32 (the reference) and into the runtime in
bf16. Batch 1 prefills three prompts and the first chunk of a fourth; batch 2 decodes one token of
each of the three and prefills the fourth's second chunk (decode and prefill attention read KV
written by the earlier batch). Logits at every position must agree within bf16 tolerance.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nfrt.batch import Batch, BatchBuffers, BatchShape, DecodeRequest, PrefillChunk  # noqa: E402
from nfrt.kvcache import KVCache  # noqa: E402
from nfrt.model import Model  # noqa: E402
from nfrt.weights import load_hf_weights  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = (7, 19, 40)
CHUNKED = (24, 21)
RTOL = 3e-2  # bf16 weights and activations against a float32 reference


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ours).all()
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"max error {err} vs scale {ref.abs().max().item()}"


def run_batch(model: Model, batch: Batch) -> torch.Tensor:
    buffers = BatchBuffers(BatchShape.of(batch), model.device)
    buffers.prepare(batch, model.kv.allocator)
    model.bind(buffers)
    model.logits.fill_(float("nan"))
    return model.forward_sequential().float().clone()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_bf16_cuda_matches_transformers(name, tiny_checkpoint):
    folder = tiny_checkpoint(name, seed=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").to("cuda").eval()
    config, weights = load_hf_weights(folder, "cuda", torch.bfloat16)
    kv = KVCache.for_model(config, num_pages=48, device="cuda", dtype=torch.bfloat16)
    model = Model(config, weights, max_tokens=128, kv_cache=kv, device="cuda")
    assert model.dtype == torch.bfloat16

    gen = torch.Generator().manual_seed(random.randrange(2**31))  # fresh inputs every run
    lengths = PROMPTS + (sum(CHUNKED),)
    seqs = [torch.randint(0, config.vocab_size, (n + 1,), generator=gen) for n in lengths]

    chunks = [PrefillChunk(i, 0, n) for i, n in enumerate(PROMPTS)] + [PrefillChunk(3, 0, CHUNKED[0])]
    ids = [t for c in chunks for t in seqs[c.seq_id][: c.length].tolist()]
    logits1 = run_batch(model, Batch((), tuple(chunks), tuple(ids), sample_positions=tuple(range(len(ids)))))

    decodes = tuple(DecodeRequest(i, n + 1) for i, n in enumerate(PROMPTS))
    ids2 = [int(seqs[i][n]) for i, n in enumerate(PROMPTS)] + seqs[3][CHUNKED[0]: sum(CHUNKED)].tolist()
    b2 = Batch(decodes, (PrefillChunk(3, CHUNKED[0], CHUNKED[1]),), tuple(ids2),
               sample_positions=tuple(range(len(ids2))))
    logits2 = run_batch(model, b2)

    row = 0
    with torch.no_grad():
        for i, n in enumerate(PROMPTS):
            full = hf(seqs[i][None, : n + 1].cuda()).logits[0]  # [n + 1, vocab]
            close(logits1[row: row + n], full[:n])
            close(logits2[i], full[n])
            row += n
        full = hf(seqs[3][None, : sum(CHUNKED)].cuda()).logits[0]
        close(logits1[row:], full[: CHUNKED[0]])
        close(logits2[len(PROMPTS):], full[CHUNKED[0]:])
