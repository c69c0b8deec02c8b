"""Hand-built multi-stream schedules for the engine tests (CPU and GPU), from the schedule dataclasses."""

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

ATTN = ("input_norm", "qkv_proj", "rope", "kv_append")


def layer_graph(config: ModelConfig) -> tuple[LayerOp, ...]:
    last = "expert_down" if config.is_moe else "down"
    ops = [LayerOp("input_norm", "other", deps=(OpDep(last, prev_layer=True),)),
           LayerOp("qkv_proj", "compute", deps=(OpDep("input_norm"),)),
           LayerOp("rope", "other", deps=(OpDep("qkv_proj"),)),
           LayerOp("kv_append", "memory", deps=(OpDep("rope"),)),
           LayerOp("attn_decode", "memory", "decode", deps=(OpDep("kv_append"),)),
           LayerOp("attn_prefill", "compute", "prefill", deps=(OpDep("kv_append", scope="prefix"),)),
           LayerOp("o_proj", "compute", deps=(OpDep("attn_decode"), OpDep("attn_prefill"))),
           LayerOp("post_norm", "other", deps=(OpDep("o_proj"),))]
    chain = (("router", "compute"), ("expert_gate_up", "compute"), ("expert_silu_mul", "other"),
             ("expert_down", "compute")) if config.is_moe else (
             ("gate_up", "compute"), ("silu_mul", "other"), ("down", "compute"))
    prev = "post_norm"
    for name, kind in chain:
        ops.append(LayerOp(name, kind, deps=(OpDep(prev),)))
        prev = name
    return tuple(ops)


def mlp_ops(config: ModelConfig) -> tuple[str, ...]:
    return tuple(op.name for op in layer_graph(config)[6:])


def nano_schedule(config: ModelConfig, batch: BatchComposition, bounds: tuple[int, ...],
                  mlp_on_second: frozenset[int] = frozenset(), num_sms: int = 132,
                  sizes: tuple[int, int] = (96, 32)) -> Schedule:
    """Two streams. Stream "a": QKV of every nano-batch, prefill attention per nano-batch, then
    the O-proj + MLP of nano-batches not in `mlp_on_second`. Stream "b": decode attention per
    nano-batch, then the O-proj + MLP of the nano-batches in `mlp_on_second`."""
    nbs = list(zip(bounds, bounds[1:], strict=False))
    a_ops, b_ops, deps = [], [], []

    def nop(name: str, ops: tuple[str, ...], rng: tuple[int, int], stream: list, sms: int) -> None:
        stream.append(NanoOp(name=name, ops=ops, tokens=rng, num_sms=sms))

    for k, rng in enumerate(nbs):
        nop(f"qkv.{k}", ATTN, rng, a_ops, sizes[0])
    for k, rng in enumerate(nbs):
        nop(f"prefill.{k}", ("attn_prefill",), rng, a_ops, sizes[0])
        nop(f"decode.{k}", ("attn_decode",), rng, b_ops, sizes[1])
        deps.append(Dependency(before=f"qkv.{k}", after=f"decode.{k}"))
    for k, rng in enumerate(nbs):
        on_b = k in mlp_on_second
        nop(f"mlp.{k}", mlp_ops(config), rng, b_ops if on_b else a_ops, sizes[1] if on_b else sizes[0])
        if on_b:
            deps.append(Dependency(before=f"prefill.{k}", after=f"mlp.{k}"))
            deps.append(Dependency(before=f"mlp.{k}", after=f"qkv.{k}", prev_layer=True))
        else:
            deps.append(Dependency(before=f"decode.{k}", after=f"mlp.{k}"))
    meta = Metadata(model=config.name, model_config=config, gpu="test", num_sms=num_sms, tp=1,
                    workload="test", dense_batch=batch.dense_batch, batch=batch,
                    num_layers=config.num_layers, profile=ProfileInfo(hash="none", source="analytic"),
                    solver=SolverInfo(name="hand", policy="hand", status="n/a"), nfsearch_version="0.1.0")
    return Schedule(schema_version=1, metadata=meta, layer=layer_graph(config),
                    partitions=(Partition("pa", sizes[0]), Partition("pb", sizes[1], first_sm=sizes[0])),
                    streams=(Stream("a", "compute", "pa", tuple(a_ops)),
                             Stream("b", "memory", "pb", tuple(b_ops))),
                    nano_batches=tuple(NanoBatch(f"nb{k}", a, b) for k, (a, b) in enumerate(nbs)),
                    dependencies=tuple(deps))
