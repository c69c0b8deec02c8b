"""Model registry, HF config.json loading, parameter counts, and the GPU registry."""

from __future__ import annotations

import json
import random

import pytest
from nfrt.config import ModelConfig

from nfsearch.errors import NfsearchError
from nfsearch.gpus import GpuSpec, gpu_slug_for_device_name, partition_sizes, resolve_gpu
from nfsearch.models import builtin_models, check_tp, param_counts, resolve_model, weight_bytes_per_gpu

# Published sizes (model cards / papers), in parameters.
REFERENCE_TOTAL = {
    "llama2-70b": 69.0e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "qwen2-72b": 72.7e9,
    "mixtral-8x7b": 46.7e9,
}


@pytest.mark.parametrize("name,expected", sorted(REFERENCE_TOTAL.items()))
def test_total_params_match_published(name: str, expected: float) -> None:
    pc = param_counts(resolve_model(name))
    assert abs(pc.total - expected) / expected < 0.01, (name, pc.total)


def test_mixtral_active_params() -> None:
    pc = param_counts(resolve_model("mixtral"))
    assert abs(pc.active - 12.9e9) / 12.9e9 < 0.01, pc.active
    assert pc.per_layer_active < pc.per_layer_total
    dense = param_counts(resolve_model("llama3-70b"))
    assert dense.active == dense.total and dense.per_layer_active == dense.per_layer_total


def test_builtin_order_and_tiny_shapes() -> None:
    names = [m.name for m in builtin_models()]
    assert names == ["llama2-70b", "llama3-8b", "llama3-70b", "qwen2-72b", "mixtral-8x7b",
                     "tiny-llama", "tiny-mixtral"]
    assert [m.name for m in builtin_models()] == names  # stable
    tl, tm = resolve_model("tiny-llama"), resolve_model("tiny-mixtral")
    assert (tl.vocab_size, tl.hidden_size, tl.num_layers, tl.num_heads, tl.num_kv_heads, tl.head_dim,
            tl.intermediate_size, tl.max_position, tl.num_experts) == (256, 64, 2, 4, 2, 16, 128, 512, 0)
    assert (tm.vocab_size, tm.hidden_size, tm.num_layers, tm.num_heads, tm.num_kv_heads, tm.head_dim,
            tm.intermediate_size, tm.num_experts, tm.top_k, tm.max_position) == (
        256, 64, 2, 4, 2, 16, 96, 4, 2, 512)
    q = resolve_model("qwen2-72b")
    assert q.qkv_bias and q.rope_theta == 1e6 and q.rms_norm_eps == 1e-6
    assert resolve_model("llama3-8b").rope_theta == 500000.0


def test_unknown_model_lists_names_and_closest() -> None:
    with pytest.raises(NfsearchError) as e:
        resolve_model("llama3-80b")
    msg = str(e.value)
    assert "\n" not in msg and "llama2-70b" in msg and "tiny-mixtral" in msg
    assert "did you mean 'llama3-8b'" in msg or "did you mean 'llama3-70b'" in msg


def _hf(arch: str, model_type: str, rng: random.Random, **extra: object) -> dict:
    heads = rng.choice([4, 8, 16])
    kv = rng.choice([h for h in (1, 2, 4) if heads % h == 0])
    hd = rng.choice([16, 32])
    d = {"architectures": [arch], "model_type": model_type, "hidden_size": heads * hd,
         "num_hidden_layers": rng.randint(1, 6), "num_attention_heads": heads, "num_key_value_heads": kv,
         "intermediate_size": rng.choice([96, 128, 256]), "vocab_size": rng.randint(100, 5000),
         "rms_norm_eps": 1e-6, "rope_theta": 12345.0, "max_position_embeddings": 1024,
         "tie_word_embeddings": False}
    d.update(extra)
    return d


@pytest.mark.parametrize("arch,model_type,extra", [
    ("LlamaForCausalLM", "llama", {}),
    ("MistralForCausalLM", "mistral", {}),
    ("Qwen2ForCausalLM", "qwen2", {}),
    ("MixtralForCausalLM", "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
])
def test_hf_config_each_architecture(tmp_path, arch, model_type, extra) -> None:
    rng = random.Random()
    cfg = _hf(arch, model_type, rng, **extra)
    folder = tmp_path / f"my-{model_type}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    for where in (folder, folder / "config.json", str(folder)):
        m = resolve_model(where)
        assert m.name == f"my-{model_type}"
        assert m.hidden_size == cfg["hidden_size"] and m.num_layers == cfg["num_hidden_layers"]
        assert m.num_heads == cfg["num_attention_heads"] and m.num_kv_heads == cfg["num_key_value_heads"]
        assert m.head_dim == cfg["hidden_size"] // cfg["num_attention_heads"]
        assert m.intermediate_size == cfg["intermediate_size"] and m.vocab_size == cfg["vocab_size"]
        assert m.rope_theta == 12345.0 and m.rms_norm_eps == 1e-6 and m.max_position == 1024
        assert m.qkv_bias == (model_type == "qwen2")
        assert (m.num_experts, m.top_k) == ((4, 2) if model_type == "mixtral" else (0, 0))


@pytest.mark.parametrize("text", ['{"hidden_size": 64,', '[1, 2]',
                                  '{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}',
                                  '{"architectures": ["GPT2LMHeadModel"]}'])
def test_malformed_config_is_one_line_error(tmp_path, text) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(NfsearchError) as e:
        resolve_model(tmp_path)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(NfsearchError, match="no config.json"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_param_counts_match_transformers(name: str) -> None:
    """Independent check: instantiate the HF model on the meta device and count its parameters."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = resolve_model(name)
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
                  intermediate_size=m.intermediate_size, tie_word_embeddings=False)
    if m.is_moe:
        cfg = transformers.MixtralConfig(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                                         **common)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    with torch.device("meta"):
        hf = cls(cfg)
    assert param_counts(m).total == sum(p.numel() for p in hf.parameters())


def test_qwen2_biases_counted() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(cfg)
    m = ModelConfig.from_hf_config(cfg.to_dict() | {"architectures": ["Qwen2ForCausalLM"]}, "q")
    assert param_counts(m).total == sum(p.numel() for p in hf.parameters())


def test_weight_bytes_and_tp_check() -> None:
    m = resolve_model("llama2-70b")
    assert weight_bytes_per_gpu(m, 1) == 2 * param_counts(m).total
    w8 = weight_bytes_per_gpu(m, 8)
    assert 2 * param_counts(m).total / 8 < w8 < 2 * param_counts(m).total / 8 * 1.001
    with pytest.raises(NfsearchError, match="tp 3 does not divide 32 heads"):
        check_tp(resolve_model("llama3-8b"), 3)
    with pytest.raises(NfsearchError, match="does not divide 8 kv heads"):
        check_tp(resolve_model("llama3-8b"), 16)
    with pytest.raises(NfsearchError, match="tp"):
        check_tp(m, 0)


def test_gpu_registry() -> None:
    h100, h200, a100 = resolve_gpu("h100-sxm"), resolve_gpu("h200"), resolve_gpu("a100-80gb")
    assert (h100.peak_tflops, h100.hbm_gbps, h100.nvlink_gbps, h100.num_sms) == (989.4, 3350.0, 450.0, 132)
    assert (h200.hbm_gbps, h200.num_sms) == (4800.0, 132) and h200.memory_gib > 139
    assert (a100.peak_tflops, a100.hbm_gbps, a100.nvlink_gbps, a100.num_sms) == (312.0, 2039.0, 300.0, 108)
    assert gpu_slug_for_device_name("NVIDIA H200") == "h200"
    assert gpu_slug_for_device_name("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpu_slug_for_device_name("NVIDIA GeForce RTX 4090") is None
    assert resolve_gpu("NVIDIA H200") == h200
    with pytest.raises(NfsearchError) as e:
        resolve_gpu("h100")
    assert "h200" in str(e.value) and "did you mean 'h100-sxm'" in str(e.value)


def test_partition_sizes() -> None:
    h = partition_sizes(resolve_gpu("h200"))
    assert h[0] == 8 and h[-1] == 132 and all(s % 8 == 0 for s in h[:-1]) and len(h) == 17
    a = partition_sizes(resolve_gpu("a100-80gb"))
    assert a[0] == 4 and a[-1] == 108 and all(s % 2 == 0 for s in a) and list(a) == sorted(set(a))


def test_gpu_overrides_and_validation() -> None:
    g = resolve_gpu("a100-80gb")
    x = g.with_overrides(peak_tflops=260.0)
    assert x.peak_tflops == 260.0 and x.hbm_gbps == g.hbm_gbps and g.peak_tflops == 312.0
    with pytest.raises(NfsearchError, match="peak_tflops"):
        g.with_overrides(peak_tflops=-1.0)
    with pytest.raises(NfsearchError, match="num_sms"):
        GpuSpec("x", "X", 1.0, 1.0, 1.0, 0, 1.0, 8)
