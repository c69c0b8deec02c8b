"""Built-in model shapes, Hugging Face `config.json` loading and parameter counts.

The shapes are public facts of each model's `config.json`; `param_counts` recomputes the parameter
totals from them so the bound and the KV-cache budget never rely on a retyped "70B".
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from nfrt.config import ModelConfig
from nfrt.errors import ConfigError

from nfsearch.errors import NfsearchError

_BUILTINS: tuple[ModelConfig, ...] = (
    ModelConfig(name="llama2-70b", vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64,
                num_kv_heads=8, head_dim=128, intermediate_size=28672, max_position=4096),
    ModelConfig(name="llama3-8b", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, intermediate_size=14336, rope_theta=500000.0),
    ModelConfig(name="llama3-70b", vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
                num_kv_heads=8, head_dim=128, intermediate_size=28672, rope_theta=500000.0),
    ModelConfig(name="qwen2-72b", vocab_size=152064, hidden_size=8192, num_layers=80, num_heads=64,
                num_kv_heads=8, head_dim=128, intermediate_size=29568, qkv_bias=True,
                rope_theta=1e6, rms_norm_eps=1e-6, max_position=32768),
    ModelConfig(name="mixtral-8x7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, intermediate_size=14336, num_experts=8, top_k=2,
                rope_theta=1e6, max_position=32768),
    # Tiny models for CPU tests and runtime smoke tests: every code path, negligible weights.
    ModelConfig(name="tiny-llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, intermediate_size=128, max_position=512),
    ModelConfig(name="tiny-mixtral", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, intermediate_size=96, num_experts=4, top_k=2,
                max_position=512),
)
_BY_NAME = {m.name: m for m in _BUILTINS}
_ALIASES = {"mixtral": "mixtral-8x7b"}


def builtin_models() -> tuple[ModelConfig, ...]:
    """The built-in models, large ones first, in a stable order."""
    return _BUILTINS


def model_names() -> tuple[str, ...]:
    """Every name `resolve_model` accepts besides paths: built-in names, then aliases."""
    return tuple(_BY_NAME) + tuple(_ALIASES)


def resolve_model(name_or_path: str | Path) -> ModelConfig:
    """A built-in model by name or alias, or one read from a HF `config.json` (file or folder)."""
    key = str(name_or_path)
    if key in _BY_NAME or key in _ALIASES:
        return _BY_NAME[_ALIASES.get(key, key)]
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise NfsearchError(f"model folder {key!r} holds no config.json")
    if path.is_file():
        return _load_hf_config(path)
    valid = model_names()
    raise NfsearchError(f"unknown model {key!r} (not a built-in name nor an existing path); "
                        f"valid names: {', '.join(valid)}{did_you_mean(key, valid)}")


def did_you_mean(name: str, valid: tuple[str, ...] | list[str]) -> str:
    """"; did you mean 'x'?" for the closest valid name (a completion first, then difflib), or ""."""
    low = name.lower()
    close = [v for v in valid if v.startswith(low)] or difflib.get_close_matches(low, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _load_hf_config(path: Path) -> ModelConfig:
    # A config.json's model is named after its folder (HF checkpoints are folders named by model).
    name = path.parent.resolve().name if path.name == "config.json" else path.stem
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise NfsearchError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise NfsearchError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise NfsearchError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    try:
        return ModelConfig.from_hf_config(cfg, name)
    except ConfigError as e:
        raise NfsearchError(f"{path}: {e}") from None


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model (numbers of parameters, not bytes).

    `active` counts what one token touches: the router and top-k experts of an MoE layer, not all
    experts. `embedding` is the input embedding plus, when untied, the LM head.
    """

    total: int
    active: int
    per_layer_total: int
    per_layer_active: int
    embedding: int

    def __post_init__(self) -> None:
        if not 0 < self.active <= self.total or not 0 < self.per_layer_active <= self.per_layer_total:
            raise NfsearchError(f"inconsistent parameter counts {self}")


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer's parameters by op; experts are counted once each (one expert's MLP)."""

    qkv: int  # q, k, v projections with biases
    o: int
    mlp: int  # dense MLP (gate, up, down); 0 for MoE
    expert: int  # one expert's gate, up, down; 0 for dense
    router: int
    norms: int  # input and post-attention RMSNorm weights


def layer_params(model: ModelConfig) -> LayerParams:
    h = model.hidden_size
    qkv_out = model.q_size + 2 * model.kv_size
    mlp = 3 * h * model.intermediate_size
    return LayerParams(
        qkv=h * qkv_out + (qkv_out if model.qkv_bias else 0),
        o=model.q_size * h,
        mlp=0 if model.is_moe else mlp,
        expert=mlp if model.is_moe else 0,
        router=h * model.num_experts,
        norms=2 * h,
    )


def param_counts(model: ModelConfig) -> ParamCounts:
    lp = layer_params(model)
    common = lp.qkv + lp.o + lp.mlp + lp.router + lp.norms
    per_layer_total = common + model.num_experts * lp.expert
    per_layer_active = common + model.top_k * lp.expert
    embed = model.vocab_size * model.hidden_size
    embedding = embed if model.tie_embeddings else 2 * embed
    final_norm = model.hidden_size
    return ParamCounts(
        total=model.num_layers * per_layer_total + embedding + final_norm,
        active=model.num_layers * per_layer_active + embedding + final_norm,
        per_layer_total=per_layer_total,
        per_layer_active=per_layer_active,
        embedding=embedding,
    )


def weight_bytes_per_gpu(model: ModelConfig, tp: int = 1, bytes_per_param: int = 2) -> int:
    """bf16 weights one GPU holds under Megatron TP: everything sharded but the norms and the router.

    The embedding and LM head are vocabulary-parallel; norms and the (tiny) router are replicated.
    """
    lp = layer_params(model)
    replicated = model.num_layers * (lp.norms + lp.router) + model.hidden_size
    sharded = param_counts(model).total - replicated
    return bytes_per_param * (replicated + -(-sharded // tp))


def _check_positive(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise NfsearchError(f"{what} must be a positive integer, got {value!r}")


def check_tp(model: ModelConfig, tp: int) -> None:
    """Megatron TP splits heads, KV heads and the (expert) intermediate size evenly.

    The vocabulary need not divide: frameworks pad it, and the LM head cost rounds up.
    """
    _check_positive(tp, "tp")
    for count, what in ((model.num_heads, "heads"), (model.num_kv_heads, "kv heads"),
                        (model.intermediate_size, "intermediate size")):
        if count % tp:
            raise NfsearchError(f"tp {tp} does not divide {count} {what} of model {model.name!r}")
