"""Roofline of one layer and the paper's optimal throughput.

NanoFlow's bound: at serving batch sizes an iteration is compute-bound, so a GPU cannot exceed
peak FLOP/s / (2 x active parameters) tokens per second, whatever the TP degree (each GPU holds
1/tp of the parameters and processes every token). The per-layer times below check that premise:
the sum of each resource's work over the layer graph at its peak rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nfrt.config import ModelConfig

from nfsearch.gpus import GpuSpec
from nfsearch.models import param_counts
from nfsearch.opgraph import build_layer_graph
from nfsearch.workload import (
    DEFAULT_DENSE_BATCH,
    DEFAULT_WORKLOAD,
    Composition,
    Workload,
    compose_batch,
    parse_workload,
)

Binding = Literal["compute", "memory", "network"]


@dataclass(frozen=True)
class Bound:
    model: ModelConfig
    gpu: GpuSpec
    tp: int
    workload: Workload
    dense_batch: int  # as requested; composition.batch.dense_batch may be smaller when KV-limited
    composition: Composition
    compute_us: float  # per layer, per GPU, at peak rates
    memory_us: float
    network_us: float
    binding: Binding
    optimal_tokens_per_s_per_gpu: float

    @property
    def layer_lower_bound_us(self) -> float:
        """No schedule runs a layer faster than its busiest resource."""
        return max(self.compute_us, self.memory_us, self.network_us)

    def to_dict(self) -> dict[str, Any]:
        pc = param_counts(self.model)
        return {
            "model": self.model.name,
            "gpu": self.gpu.name,
            "peak_tflops": self.gpu.peak_tflops,
            "hbm_gbps": self.gpu.hbm_gbps,
            "nvlink_gbps": self.gpu.nvlink_gbps,
            "tp": self.tp,
            "workload": self.workload.to_dict(),
            "dense_batch": self.dense_batch,
            "composition": self.composition.to_dict(),
            "total_params": pc.total,
            "active_params": pc.active,
            "compute_us": self.compute_us,
            "memory_us": self.memory_us,
            "network_us": self.network_us,
            "layer_lower_bound_us": self.layer_lower_bound_us,
            "binding": self.binding,
            "optimal_tokens_per_s_per_gpu": self.optimal_tokens_per_s_per_gpu,
        }


def compute_bound(model: ModelConfig, gpu: GpuSpec, tp: int = 1,
                  workload: Workload | str = DEFAULT_WORKLOAD,
                  dense_batch: int = DEFAULT_DENSE_BATCH) -> Bound:
    wl = parse_workload(workload)
    comp = compose_batch(model, wl, gpu, tp=tp, dense_batch=dense_batch)
    graph = build_layer_graph(model, comp.batch, tp)
    flops = sum(a["flops"] for _, a in graph.nodes(data=True))
    hbm = sum(a["hbm_bytes"] for _, a in graph.nodes(data=True))
    net = sum(a["net_bytes"] for _, a in graph.nodes(data=True))
    times: dict[Binding, float] = {
        "compute": flops / gpu.peak_flops * 1e6,
        "memory": hbm / gpu.hbm_bytes_per_s * 1e6,
        "network": net / gpu.nvlink_bytes_per_s * 1e6,
    }
    binding = max(times, key=lambda k: times[k])
    optimal = gpu.peak_flops / (2.0 * param_counts(model).active)
    return Bound(model=model, gpu=gpu, tp=tp, workload=wl, dense_batch=dense_batch, composition=comp,
                 compute_us=times["compute"], memory_us=times["memory"], network_us=times["network"],
                 binding=binding, optimal_tokens_per_s_per_gpu=optimal)
