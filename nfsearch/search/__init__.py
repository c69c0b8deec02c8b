"""The two-stage MILP search: `solve(SearchProblem) -> Solution` (no torch, no I/O).

OR-Tools loads on first use of `solve`, so the problem types import on machines without it
(the GPU image).
"""

from __future__ import annotations

from typing import Any

from nfsearch.search.problem import Dep, NanoOp, SearchProblem, Solution, StageOp

__all__ = ["Dep", "NanoOp", "SearchProblem", "Solution", "StageOp", "solve", "validate"]


def __getattr__(name: str) -> Any:
    if name in ("solve", "validate"):
        import importlib

        module = importlib.import_module("nfsearch.search.twostage")
        # cache the functions as module attributes
        globals().update(solve=module.solve, validate=module.validate)
        return globals()[name]
    raise AttributeError(f"module 'nfsearch.search' has no attribute {name!r}")
