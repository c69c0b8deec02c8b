"""Tensor parallelism: Megatron-style shards of the fused weights, and the process groups that the
network nano-ops run on (torch.distributed; NCCL on GPUs, gloo on the CPU).

Sharding (tp ranks, rank r):
- attention: q, k and v heads split evenly (`qkv` rows per head block), `o_proj` split on its input
  columns (row-parallel: each rank writes a partial sum into `hidden`; `attn_allreduce` sums it);
- dense MLP: `gate_up` rows (gate and up halves each), `down` input columns (partial sums again,
  `mlp_allreduce`); MoE: every expert's intermediate size split the same way, so routing stays
  local and identical on every rank (the router and the norms are replicated);
- embedding replicated; LM head vocabulary-parallel (rows padded to a multiple of tp with zeros),
  its logits all-gathered in the tail;
- the all-gather form of the attention output (a gather-form schedule) also holds `o_proj_col`:
  rows [r*H/tp, (r+1)*H/tp) of the full o_proj (column parallel over the output, full q input).

NVLink multicast stays off (`nfrt.config.NO_MULTICAST_ENV`): on the shared multi-GPU hosts a program that uses
it can take the GPUs out of service. The launcher (`nfsearch.launch`) sets these variables for the
child processes, and `TPGroup.from_env` sets them again before NCCL starts.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from nfrt.config import NO_MULTICAST_ENV, ModelConfig
from nfrt.errors import ConfigError, NfrtError
from nfrt.schedule import OpDep, Schedule, standard_layer
from nfrt.weights import Weights, default_dtype, random_tensor, weight_shapes

# NCCL launches one CTA per channel; its kernels get at most this many (its channel limit).
MAX_NCCL_CTAS = 32


def apply_no_multicast() -> None:
    """Set the no-multicast variables in this process's environment (before NCCL starts)."""
    os.environ.update(NO_MULTICAST_ENV)


def check_tp(config: ModelConfig, tp: int) -> None:
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"tp must be a positive integer, got {tp!r}")
    for count, what in ((config.num_heads, "num_heads"), (config.num_kv_heads, "num_kv_heads"),
                        (config.intermediate_size, "intermediate_size")):
        if count % tp:
            raise ConfigError(f"tp {tp} does not divide {what} {count} of model {config.name!r}")


def shard_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The layer shapes one rank runs: heads, KV heads and the intermediate size divided by tp
    (hidden size and vocabulary stay whole; the LM head shard is `vocab_shard(config, tp)` rows)."""
    check_tp(config, tp)
    if tp == 1:
        return config
    return replace(config, num_heads=config.num_heads // tp, num_kv_heads=config.num_kv_heads // tp,
                   intermediate_size=config.intermediate_size // tp)


def vocab_shard(config: ModelConfig, tp: int) -> int:
    """LM head rows per rank (the vocabulary padded up to a multiple of tp)."""
    return -(-config.vocab_size // tp)


def _blocks(t: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int, tp: int) -> torch.Tensor:
    """Concatenate rank's 1/tp slice of each consecutive block of `sizes` along `dim`."""
    parts, lo = [], 0
    for size in sizes:
        step = size // tp
        parts.append(t.narrow(dim, lo + rank * step, step))
        lo += size
    return torch.cat(parts, dim=dim).contiguous()


def shard_tensor(name: str, t: torch.Tensor, config: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s shard of the full tensor `name` of the fused layout (nfrt.weights)."""
    if not 0 <= rank < tp:
        raise NfrtError(f"rank {rank} outside [0, {tp})")
    if tp == 1:
        return t
    c = config
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("qkv", "qkv_bias"):
        return _blocks(t, 0, (c.q_size, c.kv_size, c.kv_size), rank, tp)
    if leaf == "o_proj":
        return _blocks(t, 1, (c.q_size,), rank, tp)
    if leaf == "o_proj_col":  # `t` is the full o_proj [H, q]
        return _blocks(t, 0, (c.hidden_size,), rank, tp)
    if leaf == "gate_up":
        return _blocks(t, 0, (c.intermediate_size, c.intermediate_size), rank, tp)
    if leaf == "down":
        return _blocks(t, 1, (c.intermediate_size,), rank, tp)
    if leaf == "experts_gate_up":
        return _blocks(t, 1, (c.intermediate_size, c.intermediate_size), rank, tp)
    if leaf == "experts_down":
        return _blocks(t, 2, (c.intermediate_size,), rank, tp)
    if leaf == "lm_head":
        rows = vocab_shard(c, tp)
        lo, hi = rank * rows, min((rank + 1) * rows, c.vocab_size)
        out = t.new_zeros(rows, t.shape[1])
        if hi > lo:
            out[: hi - lo] = t[lo:hi]
        return out
    return t  # embed, norms, router: replicated


def check_gather_form(config: ModelConfig, tp: int) -> None:
    """The all-gather form needs tp > 1 dividing the hidden size (o_proj_col splits it)."""
    check_tp(config, tp)
    if tp < 2 or config.hidden_size % tp:
        raise ConfigError(f"the all-gather form needs tp > 1 dividing hidden_size {config.hidden_size} of "
                          f"model {config.name!r}, got tp {tp}")


def shard_weights(weights: Weights, config: ModelConfig, rank: int, tp: int,
                  gather_form: bool = False) -> Weights:
    """Rank `rank`'s weights from the full (unsharded) weight dict of `config`; `gather_form`: with
    `layers.{l}.o_proj_col` (from the full o_proj) for the all-gather form."""
    check_tp(config, tp)
    if gather_form:
        check_gather_form(config, tp)
    for key, shape in weight_shapes(config).items():
        if key not in weights or tuple(weights[key].shape) != shape:
            got = tuple(weights[key].shape) if key in weights else "missing"
            raise NfrtError(f"weights for {config.name}: {key} should be {shape}, got {got}")
    out = {k: shard_tensor(k, v, config, rank, tp) for k, v in weights.items()
           if not k.endswith(".o_proj_col")}  # made from the full o_proj below
    if gather_form:
        for n in range(config.num_layers):
            key = f"layers.{n}.o_proj_col"
            out[key] = shard_tensor(key, weights[f"layers.{n}.o_proj"], config, rank, tp)
    return out


def random_shard_weights(config: ModelConfig, rank: int, tp: int, seed: int = 0,
                         device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                         gather_form: bool = False) -> Weights:
    """Rank `rank`'s shard of `nfrt.weights.random_weights(config, seed)`, one full tensor at a time
    (a 70B model never exists whole on one GPU). `gather_form`: also `layers.{l}.o_proj_col`, cut
    from the same full o_proj, so the all-gather form computes what tp 1 computes."""
    check_tp(config, tp)
    if gather_form:
        check_gather_form(config, tp)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    out: Weights = {}
    for name, shape in weight_shapes(config).items():
        full = random_tensor(name, shape, seed, device, dtype)
        out[name] = shard_tensor(name, full, config, rank, tp)
        if gather_form and name.endswith(".o_proj"):
            out[name + "_col"] = shard_tensor(name + "_col", full, config, rank, tp)
        del full
    if config.tie_embeddings:  # the embedding is replicated whole; the head is its vocab shard
        out["lm_head"] = shard_tensor("lm_head", out["embed"], config, rank, tp)
    return out


class TPGroup:
    """This process's rank in a tensor-parallel group, and one process group per network lane.

    `comm(num_sms, lane)` is the process group a network stream uses: NCCL's CTAs capped at the
    stream's partition size (it runs fenced to those SMs), one communicator per lane so that
    collectives issued on different streams never queue behind each other inside NCCL. Groups
    are created in call order, which is the same on every rank (same program, same schedule)."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._comms: dict[tuple[int, int], object] = {}

    @classmethod
    def from_env(cls, device_type: str | None = None) -> TPGroup:
        """Join the group that torchrun (or `nfsearch.launch`) started: RANK, WORLD_SIZE,
        LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment."""
        import torch.distributed as dist

        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and not dist.is_initialized():
            raise NfrtError(f"tensor parallel: {', '.join(missing)} not set; launch across GPUs with "
                            "`nfsearch bench --tp N` (or torchrun --nproc-per-node N)")
        apply_no_multicast()
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if device_type == "cuda":
            if local >= torch.cuda.device_count():
                raise NfrtError(f"tensor parallel: local rank {local} but only {torch.cuda.device_count()} "
                                "GPUs visible")
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def default(self):
        import torch.distributed as dist

        return dist.group.WORLD

    def comm(self, num_sms: int | None = None, lane: int = 0):
        """The process group of network lane `lane` whose kernels run on `num_sms` SMs."""
        key = (num_sms or 0, lane)
        if key not in self._comms:
            import torch.distributed as dist

            opts = None
            if self.backend == "nccl" and num_sms:
                opts = dist.ProcessGroupNCCL.Options()
                cfg = getattr(opts, "config", None)
                if cfg is not None and hasattr(cfg, "max_ctas"):
                    cfg.max_ctas = max(1, min(num_sms, MAX_NCCL_CTAS))
            self._comms[key] = dist.new_group(list(range(self.size)), backend=self.backend, pg_options=opts)
        return self._comms[key]

    def all_reduce(self, x: torch.Tensor, group=None) -> None:
        """Sum `x` (a contiguous buffer view) over the ranks, in place, on the current stream."""
        import torch.distributed as dist

        dist.all_reduce(x, group=group if group is not None else self.default)

    def all_gather(self, out: torch.Tensor, x: torch.Tensor, group=None) -> None:
        """out [size * n, ...] = every rank's x [n, ...] in rank order."""
        import torch.distributed as dist

        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13
        gather(out, x, group=group if group is not None else self.default)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self._comms.clear()


def single_gpu_reference(schedule: Schedule) -> Schedule:
    """The sequential tp-1 schedule of the same model and batch as `schedule` (any tp, either form
    of the attention output): its standard layer graph without the network ops, dependencies on
    them moved to the op each one reduces. The TP tests compare a tensor-parallel run against this
    on one GPU."""
    std = standard_layer(schedule.layer)
    net = {op.name: op.deps[0].op for op in std if op.kind == "network"}

    def redirect(d: OpDep) -> OpDep:
        while d.op in net:
            d = replace(d, op=net[d.op])
        return d

    layer = tuple(replace(op, deps=tuple(redirect(d) for d in op.deps))
                  for op in std if op.kind != "network")
    return Schedule.sequential(replace(schedule.metadata, tp=1), layer)
