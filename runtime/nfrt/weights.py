"""Model weights in the runtime's fused layout: random (for benchmarks) or from a HF checkpoint.

Weights are a flat dict of tensors named (linear weights are [out, in], as in torch):

    embed [V, H]   final_norm [H]   lm_head [V, H] (the embedding itself when tied)
    layers.{i}.input_norm [H]        layers.{i}.qkv [q+2kv, H]     layers.{i}.qkv_bias [q+2kv] (Qwen2)
    layers.{i}.o_proj [H, q]         layers.{i}.post_norm [H]
    dense:  layers.{i}.gate_up [2I, H]  layers.{i}.down [H, I]
    MoE:    layers.{i}.router [E, H]    layers.{i}.experts_gate_up [E, 2I, H]
            layers.{i}.experts_down [E, H, I]
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import torch

from nfrt.atomic import atomic_write, atomic_write_text
from nfrt.config import ModelConfig
from nfrt.errors import NfrtError

Weights = dict[str, torch.Tensor]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the fused layout and its shape."""
    c = config
    h, i, e = c.hidden_size, c.intermediate_size, c.num_experts
    qkv = c.q_size + 2 * c.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (c.vocab_size, h), "final_norm": (h,)}
    if not c.tie_embeddings:
        shapes["lm_head"] = (c.vocab_size, h)
    for n in range(c.num_layers):
        p = f"layers.{n}."
        shapes[p + "input_norm"] = (h,)
        shapes[p + "qkv"] = (qkv, h)
        if c.qkv_bias:
            shapes[p + "qkv_bias"] = (qkv,)
        shapes[p + "o_proj"] = (h, c.q_size)
        shapes[p + "post_norm"] = (h,)
        if c.is_moe:
            shapes[p + "router"] = (e, h)
            shapes[p + "experts_gate_up"] = (e, 2 * i, h)
            shapes[p + "experts_down"] = (e, h, i)
        else:
            shapes[p + "gate_up"] = (2 * i, h)
            shapes[p + "down"] = (h, i)
    return shapes


def tensor_seed(seed: int, name: str) -> int:
    """Seed of one named tensor: random weights do not depend on which other tensors exist."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def random_tensor(name: str, shape: tuple[int, ...], seed: int = 0, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor `name` of the random weights: scaled normal init, deterministic per (seed, name,
    device type), so a tensor is the same whichever other tensors are made (TP shards need this)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, name))
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("input_norm", "post_norm", "final_norm"):
        mean, std = 1.0, 0.1  # not all ones, so that a dropped norm weight shows in the tests
    elif leaf == "embed":
        mean, std = 0.0, 1.0
    elif leaf == "qkv_bias":
        mean, std = 0.0, 0.1
    else:
        mean, std = 0.0, 1.0 / math.sqrt(shape[-1])  # fan-in scaling: activations stay O(1) per layer
    t = torch.empty(shape, device=device, dtype=dtype)
    t.normal_(mean, std, generator=gen)
    return t


def random_weights(config: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> Weights:
    """Every tensor of `config` from `random_tensor`."""
    out = {name: random_tensor(name, shape, seed, device, dtype)
           for name, shape in weight_shapes(config).items()}
    if config.tie_embeddings:
        out["lm_head"] = out["embed"]
    return out


def _hf_names(config: ModelConfig, layer: int) -> dict[str, list[str]]:
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    names = {"input_norm": [p + "input_layernorm.weight"],
             "post_norm": [p + "post_attention_layernorm.weight"],
             "qkv": [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
             "o_proj": [a + "o_proj.weight"]}
    if config.qkv_bias:
        names["qkv_bias"] = [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
    if not config.is_moe:
        m = p + "mlp."
        names["gate_up"] = [m + "gate_proj.weight", m + "up_proj.weight"]
        names["down"] = [m + "down_proj.weight"]
    return names


def load_hf_weights(folder: str | os.PathLike[str], device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, name: str | None = None) -> tuple[ModelConfig, Weights]:
    """Read config.json and *.safetensors of a Llama/Mistral/Mixtral/Qwen2 checkpoint folder.

    The model is named `name`, else the folder's name. Mixtral experts are read from the original
    `block_sparse_moe.experts.N.w1/w2/w3` names or from transformers-5's fused `mlp.experts.*`.
    """
    from safetensors import safe_open

    folder = Path(folder)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise NfrtError(f"weights folder {folder}: no config.json")
    config = ModelConfig.from_hf_config(json.loads(cfg_path.read_text()), name or folder.name)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise NfrtError(f"weights folder {folder}: no *.safetensors files")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                where[k] = f

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise NfrtError(f"weights folder {folder}: missing tensor {key!r}")
        with safe_open(str(where[key]), framework="pt", device=str(device)) as sf:
            return sf.get_tensor(key).to(dtype)

    def cat(keys: list[str]) -> torch.Tensor:
        return torch.cat([get(k) for k in keys], dim=0)

    w: Weights = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight")}
    if config.tie_embeddings and "lm_head.weight" not in where:
        w["lm_head"] = w["embed"]
    else:
        w["lm_head"] = get("lm_head.weight")
    for n in range(config.num_layers):
        p = f"layers.{n}."
        for ours, keys in _hf_names(config, n).items():
            w[p + ours] = cat(keys)
        if config.is_moe:
            w.update(_load_experts(config, n, get, where))
    _check_shapes(config, w, folder)
    return config, w


def _load_experts(config: ModelConfig, n: int, get, where: dict[str, Path]) -> Weights:
    p = f"model.layers.{n}."
    fused = p + "mlp.experts.gate_up_proj"
    if fused in where:  # transformers >= 5 layout: [E, 2I, H] and [E, H, I]
        return {f"layers.{n}.router": get(p + "mlp.gate.weight"), f"layers.{n}.experts_gate_up": get(fused),
                f"layers.{n}.experts_down": get(p + "mlp.experts.down_proj")}
    m = p + "block_sparse_moe."
    experts = range(config.num_experts)
    gate_up = torch.stack([torch.cat([get(f"{m}experts.{e}.w1.weight"), get(f"{m}experts.{e}.w3.weight")])
                           for e in experts])
    down = torch.stack([get(f"{m}experts.{e}.w2.weight") for e in experts])
    return {f"layers.{n}.router": get(m + "gate.weight"), f"layers.{n}.experts_gate_up": gate_up,
            f"layers.{n}.experts_down": down}


def _check_shapes(config: ModelConfig, w: Weights, folder: Path) -> None:
    for key, shape in weight_shapes(config).items():
        if tuple(w[key].shape) != shape:
            raise NfrtError(f"weights folder {folder}: tensor {key} has shape {tuple(w[key].shape)}, "
                            f"config.json implies {shape}")


def hf_config_dict(config: ModelConfig) -> dict:
    """A Hugging Face config.json for `config` (Llama, Mixtral or Qwen2 architecture)."""
    arch, model_type = "LlamaForCausalLM", "llama"
    if config.is_moe:
        arch, model_type = "MixtralForCausalLM", "mixtral"
    elif config.qkv_bias:
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    d = {"architectures": [arch], "model_type": model_type, "hidden_size": config.hidden_size,
         "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
         "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
         "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
         "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
         "max_position_embeddings": config.max_position, "tie_word_embeddings": config.tie_embeddings,
         "hidden_act": "silu", "torch_dtype": "float32"}
    if config.is_moe:
        d.update(num_local_experts=config.num_experts, num_experts_per_tok=config.top_k,
                 router_jitter_noise=0.0)
    if model_type == "llama":
        d["attention_bias"] = False
        d["mlp_bias"] = False
    return d


def save_hf_checkpoint(config: ModelConfig, weights: Weights, folder: str | os.PathLike[str]) -> Path:
    """Write config.json + model.safetensors (original HF names) that transformers can load."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = config
    q, kv, i = c.q_size, c.kv_size, c.intermediate_size
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": weights["embed"],
                                  "model.norm.weight": weights["final_norm"]}
    if not c.tie_embeddings:
        t["lm_head.weight"] = weights["lm_head"]
    for n in range(c.num_layers):
        src, p = f"layers.{n}.", f"model.layers.{n}."
        a = p + "self_attn."
        t[p + "input_layernorm.weight"] = weights[src + "input_norm"]
        t[p + "post_attention_layernorm.weight"] = weights[src + "post_norm"]
        for part, (lo, hi) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv)), strict=True):
            t[f"{a}{part}_proj.weight"] = weights[src + "qkv"][lo:hi]
            if c.qkv_bias:
                t[f"{a}{part}_proj.bias"] = weights[src + "qkv_bias"][lo:hi]
        t[a + "o_proj.weight"] = weights[src + "o_proj"]
        if c.is_moe:
            m = p + "block_sparse_moe."
            t[m + "gate.weight"] = weights[src + "router"]
            for e in range(c.num_experts):
                t[f"{m}experts.{e}.w1.weight"] = weights[src + "experts_gate_up"][e, :i]
                t[f"{m}experts.{e}.w3.weight"] = weights[src + "experts_gate_up"][e, i:]
                t[f"{m}experts.{e}.w2.weight"] = weights[src + "experts_down"][e]
        else:
            t[p + "mlp.gate_proj.weight"] = weights[src + "gate_up"][:i]
            t[p + "mlp.up_proj.weight"] = weights[src + "gate_up"][i:]
            t[p + "mlp.down_proj.weight"] = weights[src + "down"]
    t = {k: v.detach().to("cpu").contiguous().clone() for k, v in t.items()}
    atomic_write(folder / "model.safetensors", lambda path: save_file(t, path, metadata={"format": "pt"}))
    atomic_write_text(folder / "config.json", json.dumps(hf_config_dict(config), indent=2))
    return folder


