"""The search's input and output as plain data: no torch, no files, no profile objects.

`nfsearch.plan` builds a `SearchProblem` from a model, a batch and a profile; `solve(problem)`
returns a `Solution`; `nfsearch.plan` turns that into a schedule file. Labels in brackets refer to
docs/formulation.md.

Time is in microseconds (float) here; the solver scales it to integers internally.
Tokens are counted in granules of `granularity_tokens`; the dense batch is `num_granules` granules,
of which the first `decode_granules` are decode tokens and the rest prefill tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["compute", "memory", "network"]
TokenClass = Literal["all", "decode", "prefill", "gather", "reduce"]
TOKEN_CLASSES: tuple[TokenClass, ...] = ("all", "decode", "prefill", "gather", "reduce")
# The classes of the attention output's two forms: `gather` is the dense-batch prefix
# [0, gather_granules) that takes the all-gather form, `reduce` the rest [S1.form].
FORM_CLASSES: tuple[TokenClass, ...] = ("gather", "reduce")
Scope = Literal["token", "prefix"]
Policy = Literal["auto", "sequential", "overlap"]
Status = Literal["OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN"]

KINDS: tuple[Kind, ...] = ("compute", "memory", "network")


@dataclass(frozen=True)
class Dep:
    """Stage op `op` (in this layer, or the previous one when `prev_layer`) must finish first.

    scope "token": a nano-op on tokens [a, b) waits for the pieces of `op` that overlap [a, b).
    scope "prefix": it waits for the pieces of `op` that overlap [start of its token class, b)
    (prefill attention needs the K/V of all earlier prompt tokens in the batch).
    """

    op: str
    scope: Scope = "token"
    prev_layer: bool = False


@dataclass(frozen=True)
class StageOp:
    """A schedulable op: one or more fused layer-graph ops, run as one nano-op per piece.

    latency_us[n][j]: solo latency with n granules of this op's token class on sm_options[j] SMs
    (n = 0 .. num_granules; latency_us[0][j] == 0: a piece with none of its tokens costs nothing).

    scale[a][n]: optional factor (finite, >= 0) on latency_us[n][·] for a piece whose own-class
    granules start at granule `a` of the class (a = 0 .. C, n = 0 .. C - a, C = the class's granule
    count: row a holds C + 1 - a factors). None means 1.0 everywhere: the cost depends only on how
    many tokens a piece has. Prefill attention needs it: a query at prompt position p attends to
    p + 1 keys, so a piece deep in a prompt costs more than latency_us[n], which was measured on
    tokens from position 0 [S1.lat-pos].
    """

    name: str
    kind: Kind
    token_class: TokenClass
    graph_ops: tuple[str, ...]
    deps: tuple[Dep, ...]
    latency_us: tuple[tuple[float, ...], ...]
    scale: tuple[tuple[float, ...], ...] | None = None

    def piece_latency_us(self, a: int, n: int, j: int) -> float:
        """Solo latency of a piece of n own-class granules from class granule a on sm_options[j]."""
        base = self.latency_us[n][j]
        return base if self.scale is None else base * self.scale[a][n]


@dataclass(frozen=True)
class SearchProblem:
    ops: tuple[StageOp, ...]  # in a topological order of the in-layer deps
    num_granules: int
    granularity_tokens: int
    decode_granules: int
    num_sms: int
    sm_options: tuple[int, ...]  # allowed partition sizes, ascending, the last == num_sms
    # interference[(kind, other_kind)][j]: slowdown (>= 1) of `kind` on sm_options[j] SMs while
    # `other_kind` runs on other SMs; a missing pair means 1.0.
    interference: dict[tuple[Kind, Kind], tuple[float, ...]] = field(default_factory=dict)
    # SMs that nano-ops running at the same time on different streams may use together; 0 means
    # num_sms. The runtime's SM layout splits the GPU into 8-SM groups, so on a 132-SM GPU only
    # 128 are placeable side by side; the 4 left over serve a nano-op that takes the whole GPU.
    concurrent_sms: int = 0
    num_layers: int = 1
    tail_us: float = 0.0  # per-iteration work outside the layers (final norm, LM head): full GPU
    max_nano_batches: int = 4
    split_options: tuple[int, ...] = (1, 2, 4)  # pieces an op may be cut into (divisors of K used)
    policy: Policy = "auto"
    # auto keeps a searched schedule only if it is predicted at least this fraction faster per
    # iteration than the sequential one (docs/formulation.md, "Selection")
    min_gain: float = 0.0
    time_limit_s: float = 60.0
    seed: int = 0
    # Granules [0, gather_granules) of class `gather`, the rest of class `reduce`. Stage 1 chooses it
    # (a nano-batch boundary) when some op has a form class; stage 2 and the prediction take the
    # problem with stage 1's value filled in.
    gather_granules: int = 0
    # [S1.family]: stage 2 also on the K = 2 structure family of nfsearch/search/family.py
    structure_family: bool = False

    @property
    def has_forms(self) -> bool:
        """Does the attention output have two forms to choose from (ops of class gather/reduce)?"""
        return any(o.token_class in FORM_CLASSES for o in self.ops)


@dataclass(frozen=True)
class NanoOp:
    name: str  # f"{op}.{piece}"
    op: str
    piece: int
    granules: tuple[int, int]  # [start, end) of the dense batch, in granules
    stream: Kind
    num_sms: int  # this nano-op's own SM count [S2.size]
    start_us: float  # within one layer period of the steady state
    end_us: float
    overlapped: bool  # stage 2 charged the interference slowdown


@dataclass(frozen=True)
class Solution:
    status: Status
    num_nano_batches: int
    boundaries: tuple[int, ...]  # granule boundaries: 0 = b0 < b1 < ... < bK = num_granules
    splits: dict[str, int]  # op -> number of pieces
    nano_ops: tuple[NanoOp, ...]
    stream_order: dict[Kind, tuple[str, ...]]  # per stream, nano-op names in issue order
    partitions: dict[Kind, int]  # per stream, the largest num_sms of its nano-ops (see formulation.md)
    period_us: float  # steady-state layer period T
    layer_span_us: float  # first start to last end of one layer's nano-ops
    iteration_us: float  # predicted: all layers + tail
    stage1_period_us: float
    objective_gap: float  # relative gap of the final MILP (0 when proven optimal)
    solve_time_s: float
    message: str = ""
    gather_granules: int = 0  # granules [0, this) take the all-gather form (class gather)
