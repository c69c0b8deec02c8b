"""What the profiler measures: the SM, token and context grids, the interference splits.

Pure Python (no torch). The grids cover what `nfsearch solve` asks a profile for: token counts in
64-token granules up to the dense batch (2048 by default; 4096 here, so a larger dense batch
works too), decode contexts and prompt lengths of the built-in workloads (lmsys 92/196 .. splitwise
1155/1260) and of `const:` workloads between 32 and 4096 tokens, and every partition size the GPU
allows. Token grids start at 64, not 0: the format interpolates towards 0 only from a stored
tokens-0 row, and a kernel's latency at a few tokens is far from 0, so none is stored and a
query below 64 tokens raises instead of being flattered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from nfrt.config import ModelConfig

from nfsearch.config import SolveConfig
from nfsearch.errors import NfsearchError
from nfsearch.gpus import GpuSpec
from nfsearch.opgraph import OpSpec, gather_form_ok, layer_ops, tail_ops
from nfsearch.workload import compose_batch, parse_workload

# Decode attention and prefill attention have a context axis; every other op is profiled at 0.
CONTEXT_OPS = ("attn_decode", "attn_prefill")
# Interference: the layer's GEMMs co-run with decode attention, the one memory op that runs long
# beside them in a schedule (kv_append is a few us and barely loads HBM: pairing with it diluted
# the table). Network ops join under TP.
INTERFERENCE_COMPUTE = ("qkv_proj", "o_proj", "gate_up", "down", "expert_gate_up", "expert_down")
INTERFERENCE_MEMORY = ("attn_decode",)
# Under TP the network op co-runs with both (on the top partition, the partner on the rest).
# attn_allreduce and mlp_allreduce are the same all-reduce of [tokens, hidden]: one stands for both.
INTERFERENCE_NETWORK = ("attn_allreduce",)
# The op kinds of nfsearch.opgraph for the ops that co-run (the interference table is by kind).
CORUN_KINDS: dict[str, str] = {**dict.fromkeys(INTERFERENCE_COMPUTE, "compute"),
                               **dict.fromkeys(INTERFERENCE_MEMORY, "memory"),
                               **dict.fromkeys(INTERFERENCE_NETWORK, "network")}
# Top-partition sizes of the interference co-runs (memory, or network under TP); the partner gets
# the rest of the placeable SMs.
FULL_SPLITS = (16, 32, 48, 64, 80)
QUICK_SPLITS = (32, 48, 64)


# Every 64 tokens up to 256 (GEMM tile steps matter most there), then about 1.5x apart.
FULL_TOKENS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
# The GEMMs change speed in steps, at the token counts where another row of output tiles starts
# another wave over the SMs. MoE expert GEMMs (torch._grouped_mm) on an H200: mixtral's
# expert_gate_up takes 905 us at 960 tokens, 1428 at 1024, about the same up to 1600, and 1930 at
# 2048 (benchmarks/probes/sustained_points.py, RESULTS.md, session 8), so a straight line between
# 1024 and 1536 charged 1216 tokens 1315 us where they take 1563. Dense GEMMs likewise: llama3-70b
# TP 4's gate_up of 1088 tokens on 120 SMs ran 406 us in the pipeline where the line between 1024
# and 1536 said 336 (RESULTS.md, 19:1x). The search sizes nano-batches in 64-token granules, so
# every GEMM gets a point every 64 tokens up to 2048, every 256 above. o_proj_col, the all-gather
# form's column-parallel O (TP only), is a GEMM like o_proj and gets the same grid.
GEMM_OPS = ("qkv_proj", "o_proj", "o_proj_col", "gate_up", "down", "expert_gate_up", "expert_down")
FULL_GEMM_TOKENS = (*range(64, 2048, 64), *range(2048, 4097, 256))
# The sustained-clock table (nfsearch.profile_sustained): every layer op but the collectives, each
# timed at the power-limited clock (nfsearch.profiler.held) on a sparse tokens x SMs grid. Decode
# attention is in it: the chip's clock is one, set by the GEMMs around it (RESULTS.md, session 10).
FULL_SUSTAINED_SMS = (32, 64, 96, 112, 120)  # and all SMs
FULL_SUSTAINED_TOKENS = (256, 1024, 2048)


def _ascending(v: tuple[int, ...]) -> bool:
    """Distinct positive integers in ascending order."""
    return all(isinstance(x, int) and x > 0 for x in v) and list(v) == sorted(set(v))


@dataclass(frozen=True)
class ProfileGrid:
    """Every grid the profiler walks; `to_dict()` keys a partial file so --resume can check it."""

    sms: tuple[int, ...]  # partition sizes, ascending, ending at all SMs
    tokens: tuple[int, ...]  # context-free ops (and the LM head)
    decode_requests: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    prefill_contexts: tuple[int, ...]
    splits: tuple[int, ...]  # interference: top-partition SMs; the partner gets placed_sms - split
    interference_tokens: int  # tokens of the compute ops (prefill: prompts of this length too)
    interference_decode: tuple[int, int]  # (requests, context) of attn_decode while co-running
    repeats: int  # timed graph replays per point (median)
    # token counts of GEMM_OPS (empty: `tokens`), within tokens' range
    gemm_tokens: tuple[int, ...] = ()
    # SMs two side-by-side partitions share, as the engine places them (nfrt.partition.make_layout:
    # compute [0, c), memory [placed - m, placed)); 120 of 132 on an H200
    placed_sms: int = 0
    corun_s: float = 0.4  # seconds each interference co-run is sustained (power-capped steady state)
    # the sustained-clock table: SM counts (a subset of sms; empty: no table), token counts, and
    # the seconds each point is replayed between replays of the heater (the second half is timed)
    sustained_sms: tuple[int, ...] = ()
    sustained_tokens: tuple[int, ...] = ()
    sustained_s: float = 0.3
    # the heater (nfsearch.profiler.held): "" for two bf16 8192^3 GEMMs on all SMs; else a workload
    # name, and heat_batch = (decode tokens, decode context, prefill tokens, prefill context) its
    # batch on this GPU: the model's own layer on that batch (`heat_points`), all SMs
    heat: str = ""
    heat_batch: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("sms", "tokens", "decode_requests", "decode_contexts", "prefill_tokens",
                     "prefill_contexts", "splits"):
            v = getattr(self, name)
            if not v or not _ascending(v):
                raise NfsearchError(f"profile grid: {name} must be ascending distinct positive integers, "
                                    f"got {v!r}")
        e = self.gemm_tokens
        if e and (not _ascending(e) or e[-1] > self.tokens[-1]):
            raise NfsearchError(f"profile grid: gemm_tokens must be ascending distinct positive "
                                f"integers up to tokens' last {self.tokens[-1]}, got {e!r}")
        if self.repeats < 1 or self.interference_tokens < 1 or min(self.interference_decode) < 1:
            raise NfsearchError("profile grid: repeats, interference_tokens and interference_decode must "
                                "be positive")
        if self.placed_sms == 0:
            object.__setattr__(self, "placed_sms", self.sms[-1])
        if not 0 < self.placed_sms <= self.sms[-1]:
            raise NfsearchError(f"profile grid: placed_sms {self.placed_sms} must be within "
                                f"1..{self.sms[-1]}")
        if self.splits[-1] >= self.placed_sms:
            raise NfsearchError(f"profile grid: split {self.splits[-1]} must leave compute SMs of the "
                                f"{self.placed_sms} placed SMs")
        if not self.corun_s > 0:
            raise NfsearchError(f"profile grid: corun_s must be positive, got {self.corun_s!r}")
        ss, st = self.sustained_sms, self.sustained_tokens
        if ss and (not _ascending(ss) or not set(ss) <= set(self.sms)):
            raise NfsearchError(f"profile grid: sustained_sms must be ascending distinct SM counts of "
                                f"sms {self.sms!r}, got {ss!r}")
        if bool(ss) != bool(st) or (st and (not _ascending(st) or st[-1] > self.tokens[-1])):
            raise NfsearchError(f"profile grid: sustained_tokens must be ascending distinct positive "
                                f"integers up to tokens' last {self.tokens[-1]}, given exactly when "
                                f"sustained_sms is, got {st!r}")
        if not self.sustained_s > 0:
            raise NfsearchError(f"profile grid: sustained_s must be positive, got {self.sustained_s!r}")
        self._check_heat()

    def _check_heat(self) -> None:
        hb = self.heat_batch
        if not self.heat:
            if hb:
                raise NfsearchError(f"profile grid: heat_batch {hb!r} given without a heat workload")
            return
        if not isinstance(self.heat, str) or len(hb) != 4 or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in hb):
            raise NfsearchError(f"profile grid: heat {self.heat!r} needs heat_batch = (decode tokens, decode "
                                f"context, prefill tokens, prefill context), integers >= 0, got {hb!r}")
        dec, dctx, pre, pctx = hb
        if dec + pre < 1 or (dec and not dctx) or (pre and not pctx):
            raise NfsearchError(f"profile grid: heat_batch {hb!r} must hold tokens, each class with a "
                                f"positive context")
        if dec + pre > self.tokens[-1] or dec > self.decode_requests[-1] or pre > self.prefill_tokens[-1]:
            raise NfsearchError(f"profile grid: heat_batch {hb!r} exceeds the grid's largest batch "
                                f"({self.tokens[-1]} tokens, {self.decode_requests[-1]} decode, "
                                f"{self.prefill_tokens[-1]} prefill)")

    @property
    def num_sms(self) -> int:
        return self.sms[-1]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def sm_sizes(num_sms: int, granularity: int, min_sms: int) -> tuple[int, ...]:
    """Partition sizes of a GPU (nfsearch.gpus.partition_sizes for one not built in)."""
    return tuple(sorted({*range(min_sms, num_sms + 1, granularity), num_sms}))


def _splits(want: tuple[int, ...], sms: tuple[int, ...], placed: int) -> tuple[int, ...]:
    got = tuple(s for s in want if s in sms and s < placed)
    return got or tuple(s for s in sms if 2 * s <= placed)[-3:]


def full_grid(num_sms: int = 132, granularity: int = 8, min_sms: int = 8,
              placed_sms: int | None = None) -> ProfileGrid:
    sms = sm_sizes(num_sms, granularity, min_sms)
    placed = placed_sms or num_sms - num_sms % granularity
    return ProfileGrid(
        sms=sms,
        tokens=FULL_TOKENS,
        decode_requests=(64, 128, 256, 512, 1024, 2048, 4096),
        decode_contexts=(32, 128, 256, 512, 1024, 2048, 4096),
        prefill_tokens=FULL_TOKENS,
        prefill_contexts=(32, 128, 256, 512, 1024, 2048, 4096),
        splits=_splits(FULL_SPLITS, sms, placed),
        interference_tokens=1024, interference_decode=(512, 1024), repeats=7,
        gemm_tokens=FULL_GEMM_TOKENS, placed_sms=placed, corun_s=0.4,
        sustained_sms=_sustained_sms(FULL_SUSTAINED_SMS, sms), sustained_tokens=FULL_SUSTAINED_TOKENS,
        sustained_s=0.3)


def quick_grid(num_sms: int = 132, granularity: int = 8, min_sms: int = 8,
               placed_sms: int | None = None) -> ProfileGrid:
    """A coarse grid (about a fifth of the points) that still covers what solve asks for."""
    every = sm_sizes(num_sms, granularity, min_sms)
    pick = {every[0], num_sms, *(s for s in every if s in (16, 24, 32, 48, 64, 96))}
    if len(pick) < 4:  # a small GPU: take every other size
        pick |= set(every[::2])
    placed = placed_sms or num_sms - num_sms % granularity
    return ProfileGrid(
        sms=tuple(sorted(pick)),
        tokens=(64, 256, 1024, 2048, 4096),
        decode_requests=(64, 256, 1024, 2048, 4096),
        decode_contexts=(32, 256, 1024, 4096),
        prefill_tokens=(64, 256, 1024, 2048, 4096),
        prefill_contexts=(32, 256, 1024, 4096),
        splits=_splits(QUICK_SPLITS, every, placed),
        interference_tokens=1024, interference_decode=(512, 1024), repeats=5, placed_sms=placed, corun_s=0.2,
        sustained_sms=_sustained_sms((64, 96), tuple(sorted(pick))), sustained_tokens=(1024,),
        sustained_s=0.3)


def fit_to_model(grid: ProfileGrid, model: ModelConfig) -> ProfileGrid:
    """`grid` with every context, co-run and sustained prompt length above `model.max_position`
    lowered to it (so the grids end at max_position itself, and the co-run and sustained points stay
    on them); `with_heat` keeps the heater's batch within it the same way. A position past the
    model's rope table reads other memory, so the profiler never times one (`GpuTimer` refuses it);
    the built-in models (4096 positions and up) keep the standard grids as they are, a small model
    (tiny-llama's 512) gets a shorter one."""
    cap = model.max_position

    def within(v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({min(c, cap) for c in v}))

    req, ctx = grid.interference_decode
    return replace(grid, decode_contexts=within(grid.decode_contexts),
                   prefill_contexts=within(grid.prefill_contexts),
                   interference_tokens=min(grid.interference_tokens, cap),
                   interference_decode=(req, min(ctx, cap)),
                   sustained_tokens=within(grid.sustained_tokens) if grid.sustained_tokens else ())


def _sustained_sms(want: tuple[int, ...], sms: tuple[int, ...]) -> tuple[int, ...]:
    """The wanted sizes this GPU has, and all SMs."""
    return tuple(sorted({*(s for s in want if s in sms), sms[-1]}))


def profiled_layer_ops(model: ModelConfig, tp: int = 1) -> tuple[OpSpec, ...]:
    """The layer ops a new profile of `model` measures: under TP the network ops, and the ops of the
    all-gather form of the attention output (`nfsearch.opgraph.GATHER_OPS`) where the model can run
    it (`gather_form_ok`), so a `--gather-form` search finds them."""
    return layer_ops(model, tp, gather=gather_form_ok(model, tp))


def profiled_ops(model: ModelConfig, tp: int = 1) -> tuple[str, ...]:
    """Layer and tail ops a profile of `model` holds (network and gather-form ops only under TP)."""
    return (tuple(op.name for op in profiled_layer_ops(model, tp))
            + tuple(op.name for op in tail_ops(model, tp)))


def profiles_gather(model: ModelConfig, tp: int = 1) -> bool:
    """Whether a new profile of `model` at `tp` holds the all-gather form's ops
    (`profiled_layer_ops` adds them exactly when the model can run the form)."""
    return gather_form_ok(model, tp)


Point = tuple[str, int, int]  # (op, tokens, context)


def op_points(model: ModelConfig, tp: int, grid: ProfileGrid) -> list[Point]:
    """Every (op, tokens, context) to time on each SM size, ops in layer order, tokens ascending."""
    points: list[Point] = []
    for op in profiled_ops(model, tp):
        if op == "attn_decode":
            points += [(op, t, c) for c in grid.decode_contexts for t in grid.decode_requests]
        elif op == "attn_prefill":
            points += [(op, t, c) for c in grid.prefill_contexts for t in grid.prefill_tokens]
        elif op in GEMM_OPS and grid.gemm_tokens:
            points += [(op, t, 0) for t in grid.gemm_tokens]
        else:
            points += [(op, t, 0) for t in grid.tokens]
    return points


def sustained_points(model: ModelConfig, tp: int, grid: ProfileGrid) -> list[Point]:
    """(op, tokens, context) of the sustained-clock table on each of grid.sustained_sms: every
    profiled layer op but the collectives (o_proj_col included) at grid.sustained_tokens; prefill
    attention on prompts of the token count, decode attention at the interference co-runs' context."""
    def context(op: str, tokens: int) -> int:
        return {"attn_prefill": tokens, "attn_decode": grid.interference_decode[1]}.get(op, 0)

    return [(op.name, t, context(op.name, t))
            for op in profiled_layer_ops(model, tp) if op.kind != "network" for t in grid.sustained_tokens]


def heat_points(model: ModelConfig, tp: int, grid: ProfileGrid) -> list[Point]:
    """(op, tokens, context) of the layer heater's launches, in layer order (empty for the GEMM
    heater): every op of the model's standard layer but the collectives, on grid.heat_batch (decode
    attention on its decode tokens, prefill attention on its prefill tokens, the rest on all).

    Why the layer: the held clock is the one the heater's power draw leaves. Two 8192^3 GEMMs draw
    more than an llama3-8b layer, in which decode attention (memory-bound) takes about a third of
    the time, so factors held against them predicted llama3-8b 9-12% long (RESULTS.md, session 11).
    The collectives are left out: they would need every rank's heater in lockstep, and in a
    schedule they run beside the compute anyway."""
    if not grid.heat:
        return []
    dec, dctx, pre, pctx = grid.heat_batch
    size = {"decode": (dec, dctx), "prefill": (pre, pctx)}
    out: list[Point] = []
    for op in layer_ops(model, tp):
        t, c = size.get(op.token_class, (dec + pre, 0))
        if op.kind != "network" and t:
            out.append((op.name, t, c))
    return out


def with_heat(grid: ProfileGrid, model: ModelConfig, tp: int, heat: str, gpu: GpuSpec | None) -> ProfileGrid:
    """`grid` with its heater: "gemm", or a workload whose batch the layer heater runs, composed as
    `nfsearch solve` composes it by default (SolveConfig's dense batch and granule) on `gpu`, its
    contexts held within `model.max_position` (see `fit_to_model`)."""
    if heat == "gemm":
        return replace(grid, heat="", heat_batch=())
    wl = parse_workload(heat)  # an unknown name raises, listing the valid ones
    if gpu is None:
        raise NfsearchError(f"--heat {heat}: the layer heater needs a built-in GPU (its memory sizes the "
                            f"workload's batch); use --heat gemm on this one")
    cfg = SolveConfig()
    b = compose_batch(model, wl, gpu, tp, dense_batch=cfg.dense_batch, round_to=cfg.granularity_tokens).batch
    cap = model.max_position
    return replace(grid, heat=wl.name, heat_batch=(b.decode_tokens, min(b.decode_context, cap),
                                                   b.prefill_tokens, min(b.prefill_context, cap)))


def heat_label(grid: ProfileGrid | None) -> str:
    """The heater of `grid` (None: the GEMM heater) in words, for the profile's notes (--add-ops
    reads it back to hold new ops against the profile's own heater)."""
    if grid is None or not grid.heat:
        return "two bf16 8192^3 GEMMs on all SMs"
    dec, dctx, pre, pctx = grid.heat_batch
    return (f"the model's layer on all SMs on {grid.heat}'s batch ({dec} decode tokens at context {dctx}, "
            f"{pre} prefill tokens of {pctx}-token prompts)")


def split_pairs(grid: ProfileGrid) -> list[tuple[int, int]]:
    """(top SMs, bottom SMs) of each co-run: complementary partitions of the placed SMs (top: the
    memory or network op, bottom: its partner)."""
    return [(s, grid.placed_sms - s) for s in grid.splits]


def interference_ops(model: ModelConfig, tp: int = 1) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compute ops, memory ops) of the model that co-run in the interference table."""
    ops = set(profiled_ops(model, tp))
    return (tuple(o for o in INTERFERENCE_COMPUTE if o in ops),
            tuple(o for o in INTERFERENCE_MEMORY if o in ops))


def network_ops(model: ModelConfig, tp: int = 1) -> tuple[str, ...]:
    """The network op that co-runs in the interference table (none at tp 1)."""
    ops = set(profiled_ops(model, tp))
    return tuple(o for o in INTERFERENCE_NETWORK if o in ops)


def corun_sets(model: ModelConfig, tp: int = 1) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(bottom ops, top ops) co-run on every split, each bottom op beside each top op: the GEMMs
    beside decode attention; under TP also the GEMMs and decode attention beside the network op.
    Kind pairs: (compute, memory), (memory, compute), and under TP (compute, network),
    (network, compute), (memory, network), (network, memory)."""
    comp, mem = interference_ops(model, tp)
    sets = [(comp, mem)]
    net = network_ops(model, tp)
    if net:
        sets.append((comp + mem, net))
    return sets


def grid_point_count(model: ModelConfig, tp: int, grid: ProfileGrid) -> tuple[int, int, int]:
    """(solo points, interference co-runs, sustained points) for the progress bar."""
    pairs = sum(len(bottom) * len(top) for bottom, top in corun_sets(model, tp))
    return (len(op_points(model, tp, grid)) * len(grid.sms), len(grid.splits) * pairs,
            len(sustained_points(model, tp, grid)) * len(grid.sustained_sms))
