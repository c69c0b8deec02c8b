"""The runtime's model on CUDA (paged KV) equals Hugging Face transformers.

A tiny checkpoint loads into transformers on CUDA in float32 (the reference) and into the runtime:
tiny-llama in bf16 with the Triton kernels; tiny-mixtral in float32 with the reference kernels,
because in bf16 a token whose 2nd and 3rd router logits are within rounding picks another expert
than the float32 reference (seen on an H200: one flipped token moved logits by 1.2 on a scale of 4),
which says nothing about the code. The bf16 expert GEMM path (`torch._grouped_mm`) is checked on
its own below, with the routing fixed. Batch 1 prefills three prompts and the first chunk of a
fourth; batch 2 decodes one token of each of the three and prefills the fourth's second chunk
(decode and prefill attention read KV written by the earlier batch). Logits at every position
must agree within the dtype's tolerance.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import close  # noqa: E402
from nfrt.batch import Batch, BatchBuffers, BatchShape, DecodeRequest, PrefillChunk  # noqa: E402
from nfrt.kvcache import KVCache  # noqa: E402
from nfrt.model import Model  # noqa: E402
from nfrt.weights import load_hf_weights  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = (7, 19, 40)
CHUNKED = (24, 21)
RTOL = {torch.bfloat16: 3e-2, torch.float32: 1e-3}  # against a float32 reference
CASES = [("tiny-llama", torch.bfloat16), ("tiny-mixtral", torch.float32)]


def run_batch(model: Model, batch: Batch) -> torch.Tensor:
    buffers = BatchBuffers(BatchShape.of(batch), model.device)
    buffers.prepare(batch, model.kv.allocator)
    model.bind(buffers)
    model.logits.fill_(float("nan"))
    return model.forward_sequential().float().clone()


@pytest.mark.parametrize("name,dtype", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_transformers(name, dtype, tiny_checkpoint, monkeypatch):
    import nfrt.kernels

    if dtype == torch.float32:
        monkeypatch.setattr(nfrt.kernels, "_triton", {})  # the reference kernels, on CUDA
    rtol = RTOL[dtype]
    folder = tiny_checkpoint(name, seed=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").to("cuda").eval()
    config, weights = load_hf_weights(folder, "cuda", dtype)
    kv = KVCache.for_model(config, num_pages=48, device="cuda", dtype=dtype)
    model = Model(config, weights, max_tokens=128, kv_cache=kv, device="cuda")
    assert model.dtype == dtype

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
            close(logits1[row: row + n], full[:n], rtol)
            close(logits2[i], full[n], rtol)
            row += n
        full = hf(seqs[3][None, : sum(CHUNKED)].cuda()).logits[0]
        close(logits1[row:], full[: CHUNKED[0]], rtol)
        close(logits2[len(PROMPTS):], full[CHUNKED[0]:], rtol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("least,most", [(0, 40), (80, 128)])
def test_bf16_grouped_expert_gemm_matches_a_per_expert_loop(monkeypatch, backend: str, least: int, most: int):
    """The production MoE GEMM (rows grouped by expert: `torch._grouped_mm` on Hopper, or with
    NFRT_MOE_GEMM=triton the Triton grouped GEMM up to TRITON_MOE_MAX_ROWS rows) on fresh random
    groups, including an empty one, of `least` to `most` rows (below and above 512 rows in all: both
    of the Triton kernel's tile configurations), against float32 matmuls expert by expert."""
    from nfrt.model import TRITON_MOE_MAX_ROWS, _triton_grouped, grouped_mm

    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("NFRT_MOE_GEMM", backend)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    experts, k, n = 8, 256, 384
    sizes = torch.randint(least, most, (experts,), generator=gen)
    sizes[3] = 0  # an expert no token chose
    assert (int(sizes.sum()) >= 512) == (least > 0) and int(sizes.sum()) <= TRITON_MOE_MAX_ROWS
    offs = torch.cumsum(sizes, 0).to(torch.int32).cuda()
    x = torch.randn(int(sizes.sum()), k, generator=gen).cuda().bfloat16()
    assert _triton_grouped(x) == (backend == "triton")  # the path under test is the one taken
    w_t = (torch.randn(experts, k, n, generator=gen) / k**0.5).cuda().bfloat16()
    out = torch.full((x.shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    out.copy_(grouped_mm(x, w_t, offs))
    start = 0
    for e in range(experts):
        end = int(offs[e])
        ref = x[start:end].float() @ w_t[e].float()
        if end > start:
            close(out[start:end], ref, RTOL[torch.bfloat16])
        start = end


def test_triton_grouped_gemm_replays_in_a_graph_on_new_routing():
    """Captured once, the Triton grouped GEMM follows new group sizes written into `offs` (they stay
    on the device: no host sync in the launch), for w in the checkpoint's [E, N, K] layout."""
    pytest.importorskip("triton")
    from nfrt.kernels.triton_grouped_gemm import grouped_mm

    gen = torch.Generator().manual_seed(random.randrange(2**31))
    experts, rows, k, n = 8, 600, 512, 256

    def offs_of() -> torch.Tensor:
        sizes = torch.multinomial(torch.ones(experts), rows, replacement=True, generator=gen)
        return torch.bincount(sizes, minlength=experts).cumsum(0).to(torch.int32).cuda()

    x = torch.randn(rows, k, generator=gen).cuda().bfloat16()
    w = (torch.randn(experts, n, k, generator=gen) / k**0.5).cuda().bfloat16()
    offs, out = offs_of(), torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    grouped_mm(x, w, offs, out=out)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        grouped_mm(x, w, offs, out=out)
    for _ in range(2):
        x.copy_(torch.randn(rows, k, generator=gen).bfloat16())
        offs.copy_(offs_of())
        out.fill_(float("nan"))
        g.replay()
        start = 0
        for e in range(experts):
            end = int(offs[e])
            if end > start:
                close(out[start:end], x[start:end].float() @ w[e].float().t(), RTOL[torch.bfloat16])
            start = end
