"""Runtime kernels with one signature each (docs/architecture.md, "Runtime kernels").

Dispatch: on CUDA tensors, the Triton version of a kernel when some `nfrt.kernels.triton_*`
module defines it and imports (Triton present); otherwise the plain-torch reference. The Triton
modules are discovered and imported lazily, once. `NFRT_KERNELS=reference` forces the references
(to time or check them on a GPU).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from typing import Any

import torch

from nfrt.kernels import reference
from nfrt.kernels.reference import rope_cos_sin

KERNELS = ("kv_append", "decode_attention", "prefill_attention", "fused_add_rms_norm", "rms_norm", "rope",
           "silu_mul", "moe_route")

_triton: dict[str, Callable[..., Any]] | None = None


def triton_kernels() -> dict[str, Callable[..., Any]]:
    """Kernel name -> Triton function, from every importable `triton_*` module of this package."""
    global _triton
    if _triton is None:
        found: dict[str, Callable[..., Any]] = {}
        if os.environ.get("NFRT_KERNELS", "").lower() != "reference":
            names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("triton_"))
            for mod_name in names:
                try:
                    mod = importlib.import_module(f"{__name__}.{mod_name}")
                except ImportError:  # no Triton here, or that module is not written yet
                    continue
                for k in KERNELS:
                    fn = getattr(mod, k, None)
                    if callable(fn) and k not in found:
                        found[k] = fn
        _triton = found
    return _triton


def implementation(name: str, on_cuda: bool) -> Callable[..., Any]:
    """The function that runs kernel `name` for tensors on CUDA (`on_cuda`) or elsewhere."""
    if on_cuda:
        fn = triton_kernels().get(name)
        if fn is not None:
            return fn
    return getattr(reference, name)


def _pick(name: str, t: torch.Tensor) -> Callable[..., Any]:
    return implementation(name, t.is_cuda)


def kv_append(k, v, k_cache, v_cache, slot_mapping) -> None:
    _pick("kv_append", k)(k, v, k_cache, v_cache, slot_mapping)


def decode_attention(q, k_cache, v_cache, page_table, context_lens, scale, out) -> None:
    _pick("decode_attention", q)(q, k_cache, v_cache, page_table, context_lens, scale, out)


def prefill_attention(q, k_cache, v_cache, page_table, token_req, token_pos, scale, out) -> None:
    _pick("prefill_attention", q)(q, k_cache, v_cache, page_table, token_req, token_pos, scale, out)


def fused_add_rms_norm(h, residual, weight, eps, out, first) -> None:
    _pick("fused_add_rms_norm", h)(h, residual, weight, eps, out, first)


def rms_norm(x, weight, eps, out) -> None:
    _pick("rms_norm", x)(x, weight, eps, out)


def rope(q, k, positions, cos_sin) -> None:
    _pick("rope", q)(q, k, positions, cos_sin)


def silu_mul(gate_up, out) -> None:
    _pick("silu_mul", gate_up)(gate_up, out)


def moe_route(logits, top_k, weights_out, ids_out) -> None:
    _pick("moe_route", logits)(logits, top_k, weights_out, ids_out)


__all__ = [*KERNELS, "implementation", "rope_cos_sin", "triton_kernels"]
