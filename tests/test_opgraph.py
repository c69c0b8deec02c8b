"""The layer op graph against docs/architecture.md, and its costs against independent formulas."""

from __future__ import annotations

import random

import networkx as nx
import pytest
from nfrt.config import BatchComposition

from nfsearch.errors import NfsearchError
from nfsearch.models import resolve_model
from nfsearch.opgraph import build_layer_graph, experts_touched, groups, layer_ops, op_tokens, tail_ops

# (name, kind, group, token class) per docs/architecture.md
ATTN = [("input_norm", "other", "qkv", "all"), ("qkv_proj", "compute", "qkv", "all"),
        ("rope", "other", "qkv", "all"), ("kv_append", "memory", "qkv", "all"),
        ("attn_decode", "memory", "attn_decode", "decode"),
        ("attn_prefill", "compute", "attn_prefill", "prefill"), ("o_proj", "compute", "o_proj", "all")]
AR1 = [("attn_allreduce", "network", "attn_allreduce", "all")]
DENSE = [("post_norm", "other", "ffn_up", "all"), ("gate_up", "compute", "ffn_up", "all"),
         ("silu_mul", "other", "ffn_up", "all"), ("down", "compute", "ffn_down", "all")]
MOE = [("post_norm", "other", "moe_up", "all"), ("router", "compute", "moe_up", "all"),
       ("expert_gate_up", "compute", "moe_up", "all"), ("expert_silu_mul", "other", "moe_up", "all"),
       ("expert_down", "compute", "moe_down", "all")]
AR2 = [("mlp_allreduce", "network", "mlp_allreduce", "all")]


def _rows(model: str, tp: int):
    return [(o.name, o.kind, o.group, o.token_class) for o in layer_ops(resolve_model(model), tp)]


def test_vocabulary_matches_contract() -> None:
    assert _rows("llama3-8b", 1) == ATTN + DENSE
    assert _rows("llama3-70b", 8) == ATTN + AR1 + DENSE + AR2
    assert _rows("mixtral", 1) == ATTN + MOE
    assert _rows("mixtral", 8) == ATTN + AR1 + MOE + AR2
    assert [(o.name, o.kind, o.token_class) for o in tail_ops(resolve_model("llama3-8b"))] == [
        ("final_norm", "other", "all"), ("lm_head", "compute", "decode")]


def _batch(rng: random.Random, dense_max: int = 4096) -> BatchComposition:
    dense = rng.randint(2, dense_max)
    d = rng.randint(1, dense - 1)
    return BatchComposition(dense_batch=dense, decode_tokens=d, prefill_tokens=dense - d,
                            decode_context=rng.randint(1, 8000), prefill_context=rng.randint(1, 4000))


@pytest.mark.parametrize("model,tp", [("llama3-8b", 1), ("llama2-70b", 8), ("mixtral", 1), ("mixtral", 8)])
def test_graph_is_dag_with_listed_edges(model: str, tp: int) -> None:
    m = resolve_model(model)
    g = build_layer_graph(m, _batch(random.Random()), tp)
    assert nx.is_directed_acyclic_graph(g)
    last = "expert_down" if m.is_moe else "down"
    attn_out = "attn_allreduce" if tp > 1 else "o_proj"
    edges = {("input_norm", "qkv_proj"): "token", ("qkv_proj", "rope"): "token",
             ("rope", "kv_append"): "token", ("kv_append", "attn_decode"): "token",
             ("kv_append", "attn_prefill"): "prefix", ("attn_decode", "o_proj"): "token",
             ("attn_prefill", "o_proj"): "token", (attn_out, "post_norm"): "token"}
    if tp > 1:
        edges |= {("o_proj", "attn_allreduce"): "token", (last, "mlp_allreduce"): "token"}
    if m.is_moe:
        edges |= {("post_norm", "router"): "token", ("router", "expert_gate_up"): "token",
                  ("expert_gate_up", "expert_silu_mul"): "token", ("expert_silu_mul", "expert_down"): "token"}
    else:
        edges |= {("post_norm", "gate_up"): "token", ("gate_up", "silu_mul"): "token",
                  ("silu_mul", "down"): "token"}
    assert {(u, v): a["scope"] for u, v, a in g.edges(data=True)} == edges
    assert list(nx.topological_sort(g))[0] == "input_norm"
    assert g.nodes["input_norm"]["op"].deps == (("mlp_allreduce" if tp > 1 else last, "token", True),)
    for _, a in g.nodes(data=True):
        assert {"op", "kind", "group", "token_class", "tokens", "context", "flops", "hbm_bytes",
                "net_bytes"} <= set(a)


@pytest.mark.parametrize("model,tp", [("llama2-70b", 8), ("llama3-8b", 1), ("llama3-70b", 4),
                                      ("qwen2-72b", 8), ("mixtral", 8), ("mixtral", 2)])
def test_layer_flops_match_shapes(model: str, tp: int) -> None:
    """Sum of graph FLOPs = 2 x (active GEMM params per GPU) x tokens + attention, within 1%."""
    rng = random.Random()
    m = resolve_model(model)
    b = _batch(rng)
    h, hd = m.hidden_size, m.head_dim
    qkv = h * (m.num_heads + 2 * m.num_kv_heads) * hd / tp
    o = m.num_heads * hd * h / tp
    mlp = 3 * h * m.intermediate_size / tp
    if m.is_moe:
        mlp = m.top_k * mlp + h * m.num_experts  # top-k experts plus the (replicated) router
    gemm = 2 * (qkv + o + mlp) * b.dense_batch
    heads = m.num_heads / tp
    attn = (4 * b.decode_tokens * b.decode_context * heads * hd
            + 4 * b.prefill_tokens * (b.prefill_context + 1) / 2 * heads * hd)
    g = build_layer_graph(m, b, tp)
    total = sum(a["flops"] for _, a in g.nodes(data=True))
    assert abs(total - (gemm + attn)) / (gemm + attn) < 0.01, (b, total, gemm + attn)
    decode_flops = 4 * b.decode_tokens * b.decode_context * heads * hd
    assert g.nodes["attn_decode"]["flops"] == pytest.approx(decode_flops)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_allreduce_ring_bytes(tp: int) -> None:
    m = resolve_model("llama3-70b")
    b = _batch(random.Random())
    g = build_layer_graph(m, b, tp)
    net = {n: a["net_bytes"] for n, a in g.nodes(data=True) if a["kind"] == "network"}
    expected = 2 * (tp - 1) / tp * b.dense_batch * m.hidden_size * 2
    assert net == {"attn_allreduce": pytest.approx(expected), "mlp_allreduce": pytest.approx(expected)}
    assert all(a["net_bytes"] == 0 for _, a in g.nodes(data=True) if a["kind"] != "network")
    assert not any(a["kind"] == "network" for _, a in build_layer_graph(m, b, 1).nodes(data=True))


def test_decode_attention_reads_kv_cache() -> None:
    rng = random.Random()
    m, tp = resolve_model("llama3-70b"), 8
    op = next(o for o in layer_ops(m, tp) if o.name == "attn_decode")
    t, c = rng.randint(1, 2000), rng.randint(1, 8000)
    kv = t * c * (m.num_kv_heads // tp) * m.head_dim * 2 * 2
    cost = op.cost(t, c)
    assert kv <= cost.hbm_bytes < kv * 1.01 + 4 * t * m.num_heads * m.head_dim
    assert op.cost(t, 2 * c).flops == pytest.approx(2 * cost.flops)


def test_gemm_bytes_and_zero_tokens() -> None:
    m, tp = resolve_model("llama2-70b"), 8
    ops = {o.name: o for o in layer_ops(m, tp)}
    for name in ops:
        assert ops[name].cost(0, 100).flops == 0 and ops[name].cost(0, 100).hbm_bytes == 0
    w = m.hidden_size * 2 * m.intermediate_size / tp * 2  # gate_up weights per GPU, bytes
    assert ops["gate_up"].cost(1, 0).hbm_bytes == pytest.approx(w, rel=0.01)  # GEMV: weight-bound
    with pytest.raises(NfsearchError):
        ops["gate_up"].cost(-1, 0)


def test_moe_expert_bytes() -> None:
    m, tp = resolve_model("mixtral"), 2
    op = next(o for o in layer_ops(m, tp) if o.name == "expert_gate_up")
    one_expert = m.hidden_size * 2 * m.intermediate_size / tp * 2
    assert experts_touched(8, 2, 1) == pytest.approx(2)
    assert experts_touched(8, 2, 10_000) == pytest.approx(8)
    rng = random.Random()
    t = rng.randint(1, 64)
    c = op.cost(t, 0)
    act = 2 * (t * 2 * m.hidden_size + t * 2 * 2 * m.intermediate_size / tp)
    assert c.hbm_bytes == pytest.approx(experts_touched(8, 2, t) * one_expert + act)
    assert c.flops == pytest.approx(2 * t * 2 * m.hidden_size * 2 * m.intermediate_size / tp)


def test_op_tokens_per_class() -> None:
    b = BatchComposition(dense_batch=1000, decode_tokens=300, prefill_tokens=700, decode_context=900,
                         prefill_context=500)
    m = resolve_model("llama3-8b")
    got = {o.name: op_tokens(o, b) for o in layer_ops(m) + tail_ops(m)}
    assert got["attn_decode"] == (300, 900) and got["attn_prefill"] == (700, 500)
    assert got["qkv_proj"] == (1000, 0) and got["lm_head"] == (300, 0) and got["final_norm"] == (1000, 0)


def test_groups() -> None:
    g1 = groups(resolve_model("llama3-8b"), 1)
    assert list(g1) == ["qkv", "attn_decode", "attn_prefill", "o_proj", "ffn_up", "ffn_down"]
    assert g1["qkv"].kind == "compute" and g1["qkv"].ops == ("input_norm", "qkv_proj", "rope", "kv_append")
    assert g1["qkv"].deps == (("ffn_down", "token", True),)
    assert (g1["attn_decode"].kind, g1["attn_decode"].token_class) == ("memory", "decode")
    assert g1["attn_prefill"].deps == (("qkv", "prefix", False),)
    assert g1["o_proj"].deps == (("attn_decode", "token", False), ("attn_prefill", "token", False))
    assert g1["ffn_up"].ops == ("post_norm", "gate_up", "silu_mul")
    g8 = groups(resolve_model("mixtral"), 8)
    assert list(g8) == ["qkv", "attn_decode", "attn_prefill", "o_proj", "attn_allreduce", "moe_up",
                        "moe_down", "mlp_allreduce"]
    assert g8["qkv"].deps == (("mlp_allreduce", "token", True),)
    assert g8["moe_up"].deps == (("attn_allreduce", "token", False),)
    assert g8["mlp_allreduce"].kind == "network"
    kind, token_class, ops, deps = g8["moe_down"]  # a plain tuple too
    assert (kind, ops, deps) == ("compute", ("expert_down",), (("moe_up", "token", False),))


def test_tp_must_divide() -> None:
    with pytest.raises(NfsearchError, match="tp 3 does not divide 32 heads"):
        layer_ops(resolve_model("llama3-8b"), 3)
    with pytest.raises(NfsearchError, match="kv heads"):
        groups(resolve_model("tiny-llama"), 4)


# ---- the all-gather form of the attention output (TP) ------------------------------------------

@pytest.mark.parametrize("model,tp", [("llama3-70b", 4), ("mixtral-8x7b", 2), ("qwen2-72b", 8)])
def test_gather_form_layer_graph(model, tp):
    m = resolve_model(model)
    rows = [(o.name, o.kind, o.group, o.token_class) for o in layer_ops(m, tp, gather=True)]
    gather = [("attn_allgather", "network", "attn_allgather", "gather"),
              ("o_proj_col", "compute", "o_proj_col", "gather"),
              ("o_allgather", "network", "o_allgather", "gather")]
    for row in gather + [("o_proj", "compute", "o_proj", "reduce"),
                         ("attn_allreduce", "network", "attn_allreduce", "reduce")]:
        assert row in rows
    names = [r[0] for r in rows]
    # the standard layer is unchanged apart from the classes of the two reduce-form ops
    std = [(o.name, o.kind, o.group, o.token_class) for o in layer_ops(m, tp)]
    assert [r for r in rows if r[0] not in {g[0] for g in gather}] == [
        (n, k, g, "reduce" if n in ("o_proj", "attn_allreduce") else c) for n, k, g, c in std]
    g = build_layer_graph(m, BatchComposition(2048, 320, 1728, 1261, 1540), tp, gather=True)
    assert nx.is_directed_acyclic_graph(g)
    assert set(g.predecessors("post_norm")) == {"attn_allreduce", "o_allgather"}
    assert list(nx.topological_sort(g.subgraph(["attn_decode", "attn_allgather", "o_proj_col",
                                                "o_allgather"]))) == \
        ["attn_decode", "attn_allgather", "o_proj_col", "o_allgather"]
    assert names.index("attn_allgather") < names.index("o_proj_col") < names.index("o_allgather")
    grp = groups(m, tp, gather=True)
    post = "moe_up" if m.is_moe else "ffn_up"
    assert ("o_allgather", "token", False) in grp[post].deps


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_gather_form_moves_the_bytes_of_one_all_reduce(tp):
    """Ring all-gather of the attention output plus the O output's all-gather: the same bytes on
    NVLink as one ring all-reduce of hidden (q = hidden for llama), and the column O GEMM the same
    FLOPs as the row-parallel one."""
    m = resolve_model("llama3-70b")
    ops = {o.name: o for o in layer_ops(m, tp, gather=True)}
    t = random.randint(1, 4096)
    ag = ops["attn_allgather"].cost(t).net_bytes + ops["o_allgather"].cost(t).net_bytes
    assert ag == pytest.approx(ops["attn_allreduce"].cost(t).net_bytes)
    assert ag == pytest.approx(2 * (tp - 1) / tp * t * m.hidden_size * 2)
    assert ops["o_proj_col"].cost(t).flops == pytest.approx(ops["o_proj"].cost(t).flops)
    q_full = m.num_heads * m.head_dim
    assert ops["o_proj_col"].cost(t).flops == pytest.approx(2 * t * m.hidden_size * q_full / tp)


def test_gather_form_needs_tp():
    with pytest.raises(NfsearchError, match="all-gather form needs tp > 1"):
        layer_ops(resolve_model("llama3-70b"), 1, gather=True)
