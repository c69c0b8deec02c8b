"""The two-stage MILP search: `solve(SearchProblem) -> Solution` (no torch, no I/O)."""

from __future__ import annotations

from nfsearch.search.problem import Dep, NanoOp, SearchProblem, Solution, StageOp
from nfsearch.search.solve import solve, validate

__all__ = ["Dep", "NanoOp", "SearchProblem", "Solution", "StageOp", "solve", "validate"]
