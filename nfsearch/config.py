"""Configuration of the planning commands: frozen, self-validating, and the CLI's source of defaults.

Kept free of heavy imports so that building the command line stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nfsearch.errors import NfsearchError


@dataclass(frozen=True)
class SolveConfig:
    """Everything `nfsearch solve` takes; the CLI's defaults come from here."""

    model: str = "mixtral"
    gpu: str | None = None
    profile: str | None = None
    tp: int = 1
    workload: str = "splitwise"
    dense_batch: int = 2048
    policy: Literal["auto", "sequential", "overlap"] = "auto"
    granularity_tokens: int = 64
    max_nano_batches: int = 4
    time_limit_s: float = 60.0
    # auto keeps a searched schedule only if predicted at least 1% faster per iteration than the
    # sequential one: six near ties (predicted within 1%) measured 2% slower to 2% faster, four of
    # them slower (benchmarks/RESULTS.md, session 12), inside the prediction's 3-7% error
    min_gain: float = 0.01
    output: str | None = None
    # let the search run a prefix of the nano-batches in the all-gather form of the attention
    # output (TP only; the profile must hold attn_allgather, o_proj_col and o_allgather)
    gather_form: bool = False
    # [S1.family]: stage 2 also on a family of K = 2 structures with a decode-heavy first nano-batch
    # (nfsearch/search/family.py). Opt-in: its picks are predicted within a few percent of each
    # other, inside the prediction's error; it is on only for the schedules where its pick measured
    # faster (examples/make_schedules.py; benchmarks/RESULTS.md, session 14)
    structure_family: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise NfsearchError(f"--tp must be >= 1, got {self.tp}")
        if self.dense_batch <= 0:
            raise NfsearchError(f"--dense-batch must be positive, got {self.dense_batch}")
        if self.policy not in ("auto", "sequential", "overlap"):
            raise NfsearchError(f"--policy must be auto, sequential or overlap, got {self.policy!r}")
        if self.granularity_tokens <= 0:
            raise NfsearchError(f"granularity_tokens must be positive, got {self.granularity_tokens}")
        if not 1 <= self.max_nano_batches <= 8:
            raise NfsearchError(f"max_nano_batches must be in 1..8, got {self.max_nano_batches}")
        if self.time_limit_s <= 0:
            raise NfsearchError(f"--time-limit must be positive, got {self.time_limit_s}")
        if not 0.0 <= self.min_gain < 1.0:
            raise NfsearchError(f"--min-gain must be a fraction in [0, 1), got {self.min_gain}")
        if self.gather_form and self.tp < 2:
            raise NfsearchError(f"--gather-form needs tensor parallelism (--tp >= 2), got tp {self.tp}")
