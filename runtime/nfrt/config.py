"""Model shape and batch composition: the plain data the compiler and the runtime share.

Pure Python (no torch): `nfsearch` imports this module to describe models and batches, and
the schedule file carries both as dictionaries.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from nfrt.errors import ConfigError

# The environment of every tensor-parallel process (the launcher's children, `nfrt.tp.TPGroup`):
# NVLink multicast off. On the shared multi-GPU hosts a program that creates multicast objects can
# take every GPU of the host out of service.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}

_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    """Layer shapes of a decoder-only transformer (Llama, Mistral, Mixtral, Qwen2 families)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_experts: int = 0  # 0: dense MLP; else a top-k mixture of experts in every layer
    top_k: int = 0
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    tie_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 8192

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model {self.name!r}: num_heads {self.num_heads} is not a multiple of "
                              f"num_kv_heads {self.num_kv_heads}")
        if self.num_experts < 0 or self.top_k < 0:
            raise ConfigError(f"model {self.name!r}: num_experts and top_k must be >= 0")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model {self.name!r}: top_k {self.top_k} must be in 1..num_experts "
                              f"({self.num_experts})")
        if not self.num_experts and self.top_k:
            raise ConfigError(f"model {self.name!r}: top_k set on a dense model")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in d)
        if missing:
            raise ConfigError(f"model config: missing field(s) {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str) -> ModelConfig:
        """Read a Hugging Face `config.json` dictionary (Llama, Mistral, Mixtral, Qwen2)."""
        archs = cfg.get("architectures") or []
        family = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
        if family is None:
            mt = cfg.get("model_type")
            family = {"llama": "llama", "mistral": "llama", "mixtral": "mixtral", "qwen2": "qwen2"}.get(mt)
        if family is None:
            raise ConfigError(f"{name}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                              f"supported: {', '.join(sorted(_HF_ARCHS))}")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            return cls(
                name=name,
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                num_experts=int(cfg.get("num_local_experts", 0)) if family == "mixtral" else 0,
                top_k=int(cfg.get("num_experts_per_tok", 0)) if family == "mixtral" else 0,
                qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                max_position=int(cfg.get("max_position_embeddings", 8192)),
            )
        except KeyError as e:
            raise ConfigError(f"{name}: config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: malformed config.json ({e})") from None


@dataclass(frozen=True)
class BatchComposition:
    """One steady-state dense batch: decode tokens first, then chunked-prefill tokens.

    Tokens [0, decode_tokens) are one token each of `decode_tokens` running requests, whose mean
    KV length (including the new token) is `decode_context`; tokens
    [decode_tokens, dense_batch) are prefill tokens of prompts of length `prefill_context`: the
    length-biased prompt length E[L^2]/E[L] (docs/workload.md), laid out by `nfrt.layout`.
    """

    dense_batch: int
    decode_tokens: int
    prefill_tokens: int
    decode_context: int
    prefill_context: int

    def __post_init__(self) -> None:
        for f in ("dense_batch", "decode_tokens", "prefill_tokens", "decode_context", "prefill_context"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"batch: {f} must be a non-negative integer, got {v!r}")
        if self.dense_batch <= 0:
            raise ConfigError(f"batch: dense_batch must be positive, got {self.dense_batch}")
        if self.decode_tokens + self.prefill_tokens != self.dense_batch:
            raise ConfigError(f"batch: decode_tokens {self.decode_tokens} + prefill_tokens "
                              f"{self.prefill_tokens} != dense_batch {self.dense_batch}")
        if self.decode_tokens and self.decode_context < 1:
            raise ConfigError("batch: decode_context must be >= 1 when there are decode tokens")
        if self.prefill_tokens and self.prefill_context < 1:
            raise ConfigError("batch: prefill_context must be >= 1 when there are prefill tokens")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchComposition:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"batch: unknown field(s) {', '.join(unknown)}")
        missing = sorted(known - set(d))
        if missing:
            raise ConfigError(f"batch: missing field(s) {', '.join(missing)}")
        return cls(**d)
