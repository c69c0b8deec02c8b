"""nfrt: the nano-batch pipeline runtime.

Importing `nfrt` does not import torch: `nfrt.config` and `nfrt.schedule` are pure Python and the
compiler (`nfsearch`) uses them on machines without a GPU. Torch-backed parts load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Engine": "nfrt.engine",
    "LLM": "nfrt.llm",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'nfrt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
