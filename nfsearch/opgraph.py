"""One decoder layer as a DAG of ops (docs/architecture.md, "Layer op vocabulary") with their costs.

Costs are per GPU under Megatron tensor parallelism (TP): q/k/v and gate/up are column-parallel,
o and down row-parallel, attention heads and experts' intermediate split across the TP ranks, the
LM head vocabulary-parallel, norms and the router replicated. Everything is bf16 (2 bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import networkx as nx
from nfrt.config import BatchComposition, ModelConfig
from nfrt.schedule import GATHER_OPS as GATHER_OPS

from nfsearch.errors import NfsearchError
from nfsearch.models import check_tp

OpKind = Literal["compute", "memory", "network", "other"]
TokenClass = Literal["all", "decode", "prefill", "gather", "reduce"]
Scope = Literal["token", "prefix"]
DepT = tuple[str, str, bool]  # (pred op, scope, prev_layer)

_B = 2  # bytes per bf16 element
_KINDS = ("compute", "memory", "network", "other")
_TOKEN_CLASSES = ("all", "decode", "prefill", "gather", "reduce")
# The all-gather form of the attention output (docs/tensor-parallel.md, "The all-gather form"): the
# tokens of class `gather` (a prefix of the dense batch, chosen by the search) run GATHER_OPS (the
# schedule contract's names) instead of o_proj + attn_allreduce, which then act on the rest
# (class `reduce`).
_SCOPES = ("token", "prefix")


@dataclass(frozen=True)
class Cost:
    """Work of one op call on one GPU."""

    flops: float
    hbm_bytes: float
    net_bytes: float  # bytes this GPU sends over NVLink

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes,
                    self.net_bytes + other.net_bytes)


ZERO = Cost(0.0, 0.0, 0.0)


class _Dims(NamedTuple):
    """Per-GPU shapes under TP."""

    h: int  # hidden (not split)
    heads: int  # query heads on this GPU
    kv_heads: int
    hd: int
    q: int  # heads * hd
    kv: int  # kv_heads * hd
    inter: int  # (expert) intermediate on this GPU
    vocab: int  # LM head rows on this GPU
    experts: int
    top_k: int
    tp: int
    qkv_bias: bool


def _dims(m: ModelConfig, tp: int) -> _Dims:
    heads, kvh = m.num_heads // tp, m.num_kv_heads // tp
    return _Dims(m.hidden_size, heads, kvh, m.head_dim, heads * m.head_dim, kvh * m.head_dim,
                 m.intermediate_size // tp, -(-m.vocab_size // tp), m.num_experts, m.top_k, tp, m.qkv_bias)


def _gemm(t: float, k: int, n: int, weight_rows: float = 1.0) -> Cost:
    """[t, k] @ [k, n]: weights read once (times `weight_rows` distinct weight matrices), x in, y out."""
    return Cost(2.0 * t * k * n, _B * (weight_rows * k * n + t * k + t * n), 0.0)


def _norm(d: _Dims, t: int, c: int) -> Cost:
    # r = r + h; x = rmsnorm(r) * w: add, square, sum, scale, weight ~ 5 FLOPs per element;
    # read h and r, write r and x, read w.
    return Cost(5.0 * t * d.h, _B * (4 * t * d.h + d.h), 0.0)


def _qkv_proj(d: _Dims, t: int, c: int) -> Cost:
    n = d.q + 2 * d.kv  # [t, h] @ [h, q + 2 kv]
    bias = Cost(float(t * n), float(_B * n), 0.0) if d.qkv_bias else ZERO
    return _gemm(t, d.h, n) + bias


def _rope(d: _Dims, t: int, c: int) -> Cost:
    elems = t * (d.q + d.kv)  # q and k rotated in place: x * cos + rot(x) * sin
    return Cost(3.0 * elems, _B * (2 * elems + t * d.hd), 0.0)


def _kv_append(d: _Dims, t: int, c: int) -> Cost:
    return Cost(0.0, _B * 2 * (2 * t * d.kv), 0.0)  # read k, v; write them into the paged cache


def _attn_decode(d: _Dims, t: int, c: int) -> Cost:
    # t requests, one query each, against a KV cache of c tokens: QK^T and PV, 2 FLOPs per MAC.
    flops = 4.0 * t * c * d.heads * d.hd
    return Cost(flops, _B * (2.0 * t * c * d.kv + 2 * t * d.q), 0.0)


def _attn_prefill(d: _Dims, t: int, c: int) -> Cost:
    # t query tokens of prompts of length c, causal: a query sees (c + 1) / 2 keys on average.
    flops = 4.0 * t * ((c + 1) / 2) * d.heads * d.hd
    # K/V of every prompt read at least once: at least the batch's own tokens, at least one prompt.
    kv_tokens = max(t, c)
    return Cost(flops, _B * (2.0 * kv_tokens * d.kv + 2 * t * d.q), 0.0)


def _o_proj(d: _Dims, t: int, c: int) -> Cost:
    return _gemm(t, d.q, d.h)


def _allreduce(d: _Dims, t: int, c: int) -> Cost:
    # Ring all-reduce of [t, h]: each GPU sends 2 (tp - 1) / tp of the buffer; received chunks
    # are reduced ((tp - 1) / tp adds per element) and land in HBM.
    if d.tp == 1:
        return ZERO
    buf = _B * t * d.h
    net = 2.0 * (d.tp - 1) / d.tp * buf
    return Cost((d.tp - 1) / d.tp * t * d.h, 2.0 * buf + net, net)


def _allgather(d: _Dims, t: int, width: int, copy: bool) -> Cost:
    # Ring all-gather of [t, width] slices: each GPU sends its slice to the tp - 1 others and
    # receives theirs; the [tp, t, width] result lands in HBM (`copy`: then one permute-copy, read
    # and write, into token-major order).
    full = _B * t * width * d.tp
    net = (d.tp - 1) / d.tp * full
    return Cost(0.0, full + (2.0 * full if copy else 0.0) + net, net)


def _attn_allgather(d: _Dims, t: int, c: int) -> Cost:
    return _allgather(d, t, d.q, copy=False)  # this rank's heads' attention output -> every head's


def _o_proj_col(d: _Dims, t: int, c: int) -> Cost:
    # the gathered [tp, t, q] permuted to [t, tp * q], then column-parallel O: [t, tp q] @ [tp q, h / tp]
    copy = Cost(0.0, 2.0 * _B * t * d.q * d.tp, 0.0)
    return copy + _gemm(t, d.q * d.tp, d.h // d.tp)


def _o_allgather(d: _Dims, t: int, c: int) -> Cost:
    return _allgather(d, t, d.h // d.tp, copy=True)  # the O output's hidden slices -> hidden [t, h]


def _gate_up(d: _Dims, t: int, c: int) -> Cost:
    return _gemm(t, d.h, 2 * d.inter)


def _silu_mul(d: _Dims, t: int, c: int, rows_per_token: int = 1) -> Cost:
    elems = t * rows_per_token * d.inter  # silu(g) * u: ~5 FLOPs; read g and u, write one
    return Cost(5.0 * elems, _B * 3.0 * elems, 0.0)


def _down(d: _Dims, t: int, c: int) -> Cost:
    return _gemm(t, d.inter, d.h)


def _router(d: _Dims, t: int, c: int) -> Cost:
    # Gate GEMM [t, h] @ [h, E] plus softmax and top-k; writes k (id int32, weight fp32) per token.
    g = _gemm(t, d.h, d.experts)
    return Cost(g.flops + 5.0 * t * d.experts, g.hbm_bytes + 8.0 * t * d.top_k, 0.0)


def experts_touched(experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts hit by `tokens` tokens each routing to top_k of `experts` uniformly."""
    if tokens <= 0 or experts == 0:
        return 0.0
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def _expert_gate_up(d: _Dims, t: int, c: int) -> Cost:
    rows = t * d.top_k  # tokens replicated to their k experts
    return _gemm(rows, d.h, 2 * d.inter, weight_rows=experts_touched(d.experts, d.top_k, t))


def _expert_silu_mul(d: _Dims, t: int, c: int) -> Cost:
    return _silu_mul(d, t, c, rows_per_token=d.top_k)


def _expert_down(d: _Dims, t: int, c: int) -> Cost:
    rows = t * d.top_k
    touched = experts_touched(d.experts, d.top_k, t)
    # The weighted combine (scale and sum k rows per token) is fused into the output write.
    return Cost(2.0 * rows * d.inter * d.h + 2.0 * rows * d.h,
                _B * (touched * d.inter * d.h + rows * d.inter + t * d.h), 0.0)


def _lm_head(d: _Dims, t: int, c: int) -> Cost:
    return _gemm(t, d.h, d.vocab)


_COSTS: dict[str, Callable[[_Dims, int, int], Cost]] = {
    "input_norm": _norm, "qkv_proj": _qkv_proj, "rope": _rope, "kv_append": _kv_append,
    "attn_decode": _attn_decode, "attn_prefill": _attn_prefill, "o_proj": _o_proj,
    "attn_allreduce": _allreduce, "attn_allgather": _attn_allgather, "o_proj_col": _o_proj_col,
    "o_allgather": _o_allgather, "post_norm": _norm, "gate_up": _gate_up, "silu_mul": _silu_mul,
    "down": _down, "router": _router, "expert_gate_up": _expert_gate_up,
    "expert_silu_mul": _expert_silu_mul, "expert_down": _expert_down, "mlp_allreduce": _allreduce,
    "final_norm": _norm, "lm_head": _lm_head,
}
OP_NAMES: tuple[str, ...] = tuple(_COSTS)


@dataclass(frozen=True)
class OpSpec:
    """A layer (or tail) op with the model shape and TP degree that fix its cost."""

    name: str
    kind: OpKind
    group: str
    token_class: TokenClass
    deps: tuple[DepT, ...]  # (pred, scope, prev_layer)
    model: ModelConfig = field(repr=False)
    tp: int = 1

    def __post_init__(self) -> None:
        if self.name not in _COSTS:
            raise NfsearchError(f"unknown op {self.name!r}; valid: {', '.join(OP_NAMES)}")
        if self.kind not in _KINDS or self.token_class not in _TOKEN_CLASSES:
            raise NfsearchError(f"op {self.name!r}: bad kind {self.kind!r} or token class "
                                f"{self.token_class!r}")
        for pred, scope, _prev in self.deps:
            if scope not in _SCOPES:
                raise NfsearchError(f"op {self.name!r}: dep on {pred!r} has bad scope {scope!r}")
        check_tp(self.model, self.tp)

    def cost(self, tokens: int, context: int = 0) -> Cost:
        """Per-GPU cost of one call on `tokens` tokens of its class (see `op_tokens`)."""
        if tokens < 0 or context < 0:
            raise NfsearchError(f"op {self.name!r}: tokens {tokens} and context {context} must be >= 0")
        if tokens == 0:
            return ZERO  # a piece with none of this op's tokens is not launched
        return _COSTS[self.name](_dims(self.model, self.tp), tokens, context)


def gather_form_ok(model: ModelConfig, tp: int) -> bool:
    """Can this model run the all-gather form at this TP degree (the hidden size splits evenly)?"""
    return tp > 1 and model.hidden_size % tp == 0


def layer_ops(model: ModelConfig, tp: int = 1, gather: bool = False) -> tuple[OpSpec, ...]:
    """The ops of one decoder layer in a topological order of the in-layer deps. `gather`: with the
    all-gather form of the attention output beside the all-reduce one (TP only; `GATHER_OPS` of
    class gather, o_proj and attn_allreduce of class reduce)."""
    check_tp(model, tp)
    if gather and not gather_form_ok(model, tp):
        raise NfsearchError(f"the all-gather form needs tp > 1 dividing hidden_size "
                            f"({model.hidden_size}); got tp {tp}")
    net, moe = tp > 1, model.is_moe
    mlp_last = "expert_down" if moe else "down"
    layer_out = "mlp_allreduce" if net else mlp_last
    attn_out = "attn_allreduce" if net else "o_proj"
    up = "moe_up" if moe else "ffn_up"
    rows: list[tuple[str, OpKind, str, TokenClass, tuple[DepT, ...]]] = [
        ("input_norm", "other", "qkv", "all", ((layer_out, "token", True),)),
        ("qkv_proj", "compute", "qkv", "all", (("input_norm", "token", False),)),
        ("rope", "other", "qkv", "all", (("qkv_proj", "token", False),)),
        ("kv_append", "memory", "qkv", "all", (("rope", "token", False),)),
        ("attn_decode", "memory", "attn_decode", "decode", (("kv_append", "token", False),)),
        ("attn_prefill", "compute", "attn_prefill", "prefill", (("kv_append", "prefix", False),)),
    ]
    attn = (("attn_decode", "token", False), ("attn_prefill", "token", False))
    reduce: TokenClass = "reduce" if gather else "all"
    if gather:
        rows += [
            ("attn_allgather", "network", "attn_allgather", "gather", attn),
            ("o_proj_col", "compute", "o_proj_col", "gather", (("attn_allgather", "token", False),)),
            ("o_allgather", "network", "o_allgather", "gather", (("o_proj_col", "token", False),)),
        ]
    rows.append(("o_proj", "compute", "o_proj", reduce, attn))
    if net:
        rows.append(("attn_allreduce", "network", "attn_allreduce", reduce, (("o_proj", "token", False),)))
    post_deps: tuple[DepT, ...] = ((attn_out, "token", False),)
    if gather:
        post_deps += (("o_allgather", "token", False),)
    rows.append(("post_norm", "other", up, "all", post_deps))
    if moe:
        rows += [
            ("router", "compute", "moe_up", "all", (("post_norm", "token", False),)),
            ("expert_gate_up", "compute", "moe_up", "all", (("router", "token", False),)),
            ("expert_silu_mul", "other", "moe_up", "all", (("expert_gate_up", "token", False),)),
            ("expert_down", "compute", "moe_down", "all", (("expert_silu_mul", "token", False),)),
        ]
    else:
        rows += [
            ("gate_up", "compute", "ffn_up", "all", (("post_norm", "token", False),)),
            ("silu_mul", "other", "ffn_up", "all", (("gate_up", "token", False),)),
            ("down", "compute", "ffn_down", "all", (("silu_mul", "token", False),)),
        ]
    if net:
        rows.append(("mlp_allreduce", "network", "mlp_allreduce", "all", ((mlp_last, "token", False),)))
    return tuple(OpSpec(n, k, g, c, d, model, tp) for n, k, g, c, d in rows)


def tail_ops(model: ModelConfig, tp: int = 1) -> tuple[OpSpec, ...]:
    """Once per iteration after the last layer: the final norm and the LM head (sampled positions)."""
    check_tp(model, tp)
    last = "mlp_allreduce" if tp > 1 else ("expert_down" if model.is_moe else "down")
    return (OpSpec("final_norm", "other", "final_norm", "all", ((last, "token", True),), model, tp),
            OpSpec("lm_head", "compute", "lm_head", "decode", (("final_norm", "token", False),), model, tp))


def op_tokens(op: OpSpec, batch: BatchComposition) -> tuple[int, int]:
    """(tokens, context) an op processes in the whole dense batch."""
    if op.name == "attn_decode":
        return batch.decode_tokens, batch.decode_context if batch.decode_tokens else 0
    if op.name == "attn_prefill":
        return batch.prefill_tokens, batch.prefill_context if batch.prefill_tokens else 0
    # gather / reduce: the split is the schedule's; the whole batch is the most either can have
    tokens = {"all": batch.dense_batch, "decode": batch.decode_tokens, "prefill": batch.prefill_tokens,
              "gather": batch.dense_batch, "reduce": batch.dense_batch}[op.token_class]
    return tokens, 0


def build_layer_graph(model: ModelConfig, batch: BatchComposition, tp: int = 1,
                      gather: bool = False) -> nx.DiGraph:
    """One layer as a DAG; nodes carry the op, its token counts and its per-GPU cost."""
    g = nx.DiGraph(model=model.name, tp=tp, batch=batch.to_dict())
    ops = layer_ops(model, tp, gather)
    for op in ops:
        tokens, context = op_tokens(op, batch)
        c = op.cost(tokens, context)
        g.add_node(op.name, op=op, kind=op.kind, group=op.group, token_class=op.token_class,
                   tokens=tokens, context=context, flops=c.flops, hbm_bytes=c.hbm_bytes,
                   net_bytes=c.net_bytes)
    for op in ops:
        for pred, scope, prev_layer in op.deps:
            if not prev_layer:  # the graph is one layer; cross-layer deps stay in OpSpec.deps
                g.add_edge(pred, op.name, scope=scope)
    return g


class GroupSpec(NamedTuple):
    """A schedulable group of ops (a stage op): run back to back on one stream per token range."""

    kind: OpKind
    token_class: TokenClass
    ops: tuple[str, ...]
    deps: tuple[DepT, ...]  # (pred group, scope, prev_layer)


def groups(model: ModelConfig, tp: int = 1, gather: bool = False) -> dict[str, GroupSpec]:
    """Groups in a topological order; kind and token class are those of the group's main op
    (its first op that is not `other`)."""
    ops = layer_ops(model, tp, gather)
    group_of = {op.name: op.group for op in ops}
    members: dict[str, list[OpSpec]] = {}
    for op in ops:
        members.setdefault(op.group, []).append(op)
    out: dict[str, GroupSpec] = {}
    for name, gops in members.items():
        main = next(op for op in gops if op.kind != "other")
        deps: list[DepT] = []
        for op in gops:
            for pred, scope, prev in op.deps:
                dep = (group_of[pred], scope, prev)
                if (prev or group_of[pred] != name) and dep not in deps:
                    deps.append(dep)
        out[name] = GroupSpec(main.kind, main.token_class, tuple(op.name for op in gops), tuple(deps))
    return out
