"""The runtime's model equals Hugging Face transformers on tiny Llama, Mistral, Qwen2 and Mixtral
checkpoints.

A dense batch of prompts of different lengths (one of them chunked over two batches) runs as
prefill, then every finished prompt takes one decode step in a mixed batch. Logits at every
position and the paged KV cache must match transformers' forward and past_key_values.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import close  # noqa: E402
from nfrt.batch import Batch, BatchBuffers, BatchShape, DecodeRequest, PrefillChunk  # noqa: E402
from nfrt.errors import NfrtError  # noqa: E402
from nfrt.kvcache import KVCache  # noqa: E402
from nfrt.model import Model  # noqa: E402
from nfrt.weights import load_hf_weights, random_weights, save_hf_checkpoint  # noqa: E402

PROMPTS = (5, 17, 33)  # whole prompts in batch 1, then one decode step each in batch 2
CHUNKED = (24, 16)  # a fourth prompt, prefilled in two chunks (batch 1, batch 2)


def hf_keys_values(cache, layer: int):
    """(keys, values) of one layer of a transformers cache, each [1, kv_heads, len, head_dim]."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]


def checkpoint(name: str, tiny_checkpoint, tmp_path):
    """A saved HF folder: the shared tiny Llama/Mixtral ones, or a Qwen2 (q/k/v biases, its own
    norm eps and rope theta) or a Mistral (Llama weights under MistralForCausalLM) made here."""
    if name in ("tiny-llama", "tiny-mixtral"):
        return tiny_checkpoint(name, seed=3)
    from conftest import tiny_config

    folder = tmp_path / name
    if name == "tiny-qwen2":
        config = replace(tiny_config("tiny-llama"), name=name, qkv_bias=True, rms_norm_eps=1e-6,
                         rope_theta=1e6)
        w = random_weights(config, seed=3)
        gen = torch.Generator().manual_seed(5)
        for key in [k for k in w if k.endswith("qkv_bias")]:  # biases that change the result
            w[key] = 0.2 * torch.randn(w[key].shape, generator=gen)
        save_hf_checkpoint(config, w, folder)
        return folder
    config = replace(tiny_config("tiny-llama"), name=name)
    save_hf_checkpoint(config, random_weights(config, seed=3), folder)
    d = json.loads((folder / "config.json").read_text())
    for key in ("attention_bias", "mlp_bias"):
        d.pop(key, None)
    d.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    (folder / "config.json").write_text(json.dumps(d))
    return folder


def run_batch(model: Model, batch: Batch) -> torch.Tensor:
    buffers = BatchBuffers(BatchShape.of(batch), model.device)
    buffers.prepare(batch, model.kv.allocator)
    model.bind(buffers)
    return model.forward_sequential().clone()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-mixtral"])
def test_matches_transformers(name, tiny_checkpoint, tmp_path):
    folder = checkpoint(name, tiny_checkpoint, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    config, weights = load_hf_weights(folder, "cpu", torch.float32)
    assert config.num_experts == (4 if name == "tiny-mixtral" else 0)
    assert config.qkv_bias == (name == "tiny-qwen2")
    model = Model(config, weights, max_tokens=128, kv_cache=KVCache.for_model(config, num_pages=32))

    gen = torch.Generator().manual_seed(11)
    lengths = PROMPTS + (sum(CHUNKED),)
    seqs = [torch.randint(0, config.vocab_size, (n + 1,), generator=gen) for n in lengths]  # + 1 decode token

    # Batch 1: three whole prompts and the first chunk of the fourth; sample every position.
    chunks = [PrefillChunk(i, 0, n) for i, n in enumerate(PROMPTS)] + [PrefillChunk(3, 0, CHUNKED[0])]
    ids = [t for c in chunks for t in seqs[c.seq_id][: c.length].tolist()]
    b1 = Batch((), tuple(chunks), tuple(ids), sample_positions=tuple(range(len(ids))))
    logits1 = run_batch(model, b1)

    # Batch 2: one decode step of each whole prompt, then the second chunk of the fourth.
    decodes = tuple(DecodeRequest(i, n + 1) for i, n in enumerate(PROMPTS))
    tail = PrefillChunk(3, CHUNKED[0], CHUNKED[1])
    ids2 = [int(seqs[i][n]) for i, n in enumerate(PROMPTS)] + seqs[3][CHUNKED[0]: sum(CHUNKED)].tolist()
    b2 = Batch(decodes, (tail,), tuple(ids2), sample_positions=tuple(range(len(ids2))))
    logits2 = run_batch(model, b2)

    row1 = 0
    with torch.no_grad():
        for i, n in enumerate(PROMPTS):
            out = hf(seqs[i][None, :n], use_cache=True)
            close(logits1[row1: row1 + n], out.logits[0])
            row1 += n
            step = hf(seqs[i][None, n: n + 1], past_key_values=out.past_key_values, use_cache=True)
            close(logits2[i], step.logits[0, 0])
            for layer in range(config.num_layers):
                k_ref, v_ref = hf_keys_values(step.past_key_values, layer)
                k, v = model.kv.gather(layer, i, n + 1)  # [len, kv_heads, head_dim]
                close(k, k_ref[0].transpose(0, 1))
                close(v, v_ref[0].transpose(0, 1))
        full = hf(seqs[3][None, : sum(CHUNKED)], use_cache=True)
        close(logits1[row1: row1 + CHUNKED[0]], full.logits[0, : CHUNKED[0]])
        close(logits2[len(PROMPTS):], full.logits[0, CHUNKED[0]:])
        for layer in range(config.num_layers):
            k_ref, v_ref = hf_keys_values(full.past_key_values, layer)
            k, v = model.kv.gather(layer, 3, sum(CHUNKED))
            close(k, k_ref[0].transpose(0, 1))
            close(v, v_ref[0].transpose(0, 1))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_any_token_split_equals_one_pass(name, tiny_configs):
    """Ops run per token range, in any range split that respects the layer order, give the same logits."""
    config = tiny_configs[name]
    weights = random_weights(config, seed=5)
    model = Model(config, weights, max_tokens=64, kv_cache=KVCache.for_model(config, num_pages=32))
    gen = torch.Generator().manual_seed(7)
    decodes = tuple(DecodeRequest(i, 3 + 9 * i) for i in range(5))
    prefills = (PrefillChunk(10, 0, 20), PrefillChunk(11, 4, 9))
    ids = tuple(torch.randint(0, config.vocab_size, (5 + 29,), generator=gen).tolist())
    batch = Batch(decodes, prefills, ids)
    ref = run_batch(model, batch)
    model.logits.fill_(float("nan"))
    model.embed()
    cuts = (0, 3, 5, 17, 34)  # ranges that straddle the decode/prefill boundary
    from nfrt.model import layer_ops
    for layer in range(config.num_layers):
        for op in layer_ops(config):
            for a, b in zip(cuts, cuts[1:], strict=False):
                model.run_op(layer, op, a, b)
    close(model.tail(), ref, rel=1e-5)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("tiny-llama")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(NfrtError, match="model.layers.1.self_attn.k_proj.weight"):
        load_hf_weights(tmp_path)


def test_random_weights_deterministic(tiny_configs):
    config = tiny_configs["tiny-mixtral"]
    a, b, c = (random_weights(config, seed=s) for s in (1, 1, 2))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.qkv"], c["layers.0.qkv"])
    assert a["layers.1.experts_gate_up"].shape == (4, 192, 64)
    assert a["layers.0.qkv"].dtype == torch.float32


def test_moe_gemm_backend_is_chosen_by_env(monkeypatch):
    """NFRT_MOE_GEMM picks the expert GEMM: torch (default) or triton; another value names both. On
    the CPU the Triton grouped GEMM is never taken."""
    from nfrt.model import _triton_grouped, moe_gemm_backend

    monkeypatch.delenv("NFRT_MOE_GEMM", raising=False)
    assert moe_gemm_backend() == "torch"
    monkeypatch.setenv("NFRT_MOE_GEMM", "Triton")
    assert moe_gemm_backend() == "triton"
    assert not _triton_grouped(torch.zeros(4, 8, dtype=torch.bfloat16))
    monkeypatch.setenv("NFRT_MOE_GEMM", "cutlass")
    with pytest.raises(NfrtError, match="'cutlass' is not one of torch, triton"):
        moe_gemm_backend()
