"""Hand-built tensor-parallel schedules with the all-gather form of the attention output (FORMS.md):
nano-batches that end at or before `gather_tokens` run attn_allgather -> o_proj_col -> o_allgather,
the rest o_proj -> attn_allreduce. Torch-free (the schedule tests use it too)."""

from __future__ import annotations

from nfrt.config import BatchComposition, ModelConfig
from nfrt.schedule import (
    Dependency,
    LayerOp,
    Metadata,
    NanoBatch,
    NanoOp,
    OpDep,
    Partition,
    ProfileInfo,
    Schedule,
    SolverInfo,
    Stream,
)

PRE = ("input_norm", "qkv_proj", "rope", "kv_append", "attn_decode", "attn_prefill")


def tp_layer(config: ModelConfig, gather: bool) -> tuple[LayerOp, ...]:
    """The TP layer graph (all-reduces after o_proj and the MLP); `gather`: with the gather form
    beside the reduce form (o_proj and attn_allreduce of class reduce)."""
    last = "expert_down" if config.is_moe else "down"
    red = "reduce" if gather else "all"
    attn = (OpDep("attn_decode"), OpDep("attn_prefill"))
    ops = [LayerOp("input_norm", "other", deps=(OpDep("mlp_allreduce", prev_layer=True),)),
           LayerOp("qkv_proj", "compute", deps=(OpDep("input_norm"),)),
           LayerOp("rope", "other", deps=(OpDep("qkv_proj"),)),
           LayerOp("kv_append", "memory", deps=(OpDep("rope"),)),
           LayerOp("attn_decode", "memory", "decode", deps=(OpDep("kv_append"),)),
           LayerOp("attn_prefill", "compute", "prefill", deps=(OpDep("kv_append", scope="prefix"),))]
    if gather:
        ops += [LayerOp("attn_allgather", "network", "gather", deps=attn),
                LayerOp("o_proj_col", "compute", "gather", deps=(OpDep("attn_allgather"),)),
                LayerOp("o_allgather", "network", "gather", deps=(OpDep("o_proj_col"),))]
    ops += [LayerOp("o_proj", "compute", red, deps=attn),
            LayerOp("attn_allreduce", "network", red, deps=(OpDep("o_proj"),)),
            LayerOp("post_norm", "other", deps=(OpDep("attn_allreduce"),)
                    + ((OpDep("o_allgather"),) if gather else ()))]
    chain = (("router", "compute"), ("expert_gate_up", "compute"), ("expert_silu_mul", "other"),
             ("expert_down", "compute")) if config.is_moe else (
             ("gate_up", "compute"), ("silu_mul", "other"), ("down", "compute"))
    prev = "post_norm"
    for name, kind in chain:
        ops.append(LayerOp(name, kind, deps=(OpDep(prev),)))
        prev = name
    ops.append(LayerOp("mlp_allreduce", "network", deps=(OpDep(last),)))
    return tuple(ops)


def gather_schedule(config: ModelConfig, batch: BatchComposition, bounds: tuple[int, ...],
                    gather_tokens: int, tp: int = 2, num_sms: int = 132, net_sms: int = 16) -> Schedule:
    """Stream "c" (compute, SMs [0, num_sms - net_sms)): pre.k (norm .. attention) of every nano-batch,
    then o.k (o_proj_col or o_proj), then mlp.k (post_norm + MLP). Stream "n" (network, the top
    `net_sms`): ag.k (attn_allgather) of the gather nano-batches, then og.k / ar.k (o_allgather or
    attn_allreduce), then mr.k (mlp_allreduce)."""
    mlp = tuple(op.name for op in tp_layer(config, False)[8:-1])  # post_norm .. down/expert_down
    nbs = list(zip(bounds, bounds[1:], strict=False))
    csms = num_sms - net_sms
    c_ops: list[NanoOp] = [NanoOp(f"pre.{k}", PRE, rng, csms) for k, rng in enumerate(nbs)]
    n_ops: list[NanoOp] = []
    deps: list[Dependency] = []
    for k, rng in enumerate(nbs):
        if rng[1] <= gather_tokens:
            n_ops.append(NanoOp(f"ag.{k}", ("attn_allgather",), rng, net_sms))
            deps += [Dependency(f"pre.{k}", f"ag.{k}"), Dependency(f"ag.{k}", f"o.{k}")]
    for k, rng in enumerate(nbs):
        gather = rng[1] <= gather_tokens
        c_ops.append(NanoOp(f"o.{k}", ("o_proj_col",) if gather else ("o_proj",), rng, csms))
        x = f"og.{k}" if gather else f"ar.{k}"
        n_ops.append(NanoOp(x, ("o_allgather",) if gather else ("attn_allreduce",), rng, net_sms))
        deps += [Dependency(f"o.{k}", x), Dependency(x, f"mlp.{k}")]
    for k, rng in enumerate(nbs):
        c_ops.append(NanoOp(f"mlp.{k}", mlp, rng, csms))
        n_ops.append(NanoOp(f"mr.{k}", ("mlp_allreduce",), rng, net_sms))
        deps += [Dependency(f"mlp.{k}", f"mr.{k}"), Dependency(f"mr.{k}", f"pre.{k}", prev_layer=True)]
    meta = Metadata(model=config.name, model_config=config, gpu="test", num_sms=num_sms, tp=tp,
                    workload="test", dense_batch=batch.dense_batch, batch=batch,
                    num_layers=config.num_layers, profile=ProfileInfo(hash="none", source="analytic"),
                    solver=SolverInfo(name="hand", policy="hand", status="n/a"), nfsearch_version="0.1.0",
                    gather_tokens=gather_tokens)
    return Schedule(schema_version=1, metadata=meta, layer=tp_layer(config, gather_tokens > 0),
                    partitions=(Partition("pc", csms), Partition("pn", net_sms, first_sm=csms)),
                    streams=(Stream("c", "compute", "pc", tuple(c_ops)),
                             Stream("n", "network", "pn", tuple(n_ops))),
                    nano_batches=tuple(NanoBatch(f"nb{k}", a, b) for k, (a, b) in enumerate(nbs)),
                    dependencies=tuple(deps))
