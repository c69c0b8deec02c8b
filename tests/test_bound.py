"""The roofline bound and the paper's optimal throughput."""

from __future__ import annotations

import json
import random

import pytest

from nfsearch.bound import compute_bound
from nfsearch.gpus import resolve_gpu
from nfsearch.models import param_counts, resolve_model
from nfsearch.opgraph import build_layer_graph


def test_llama2_70b_a100_paper_number() -> None:
    """NanoFlow: 8 x A100 at a 260 TFLOP/s achievable peak -> ~1857 tokens/s per GPU for LLaMA-2-70B."""
    gpu = resolve_gpu("a100-80gb").with_overrides(peak_tflops=260.0)
    b = compute_bound(resolve_model("llama2-70b"), gpu, tp=8)
    assert abs(b.optimal_tokens_per_s_per_gpu - 1857) / 1857 < 0.02, b.optimal_tokens_per_s_per_gpu


@pytest.mark.parametrize("workload", ["splitwise", "lmsys", "sharegpt"])
@pytest.mark.parametrize("model,tp", [("llama2-70b", 8), ("llama3-70b", 8), ("qwen2-72b", 8),
                                      ("mixtral-8x7b", 8), ("llama3-8b", 1)])
def test_compute_bound_at_dense_batch(model: str, tp: int, workload: str) -> None:
    b = compute_bound(resolve_model(model), resolve_gpu("a100-80gb"), tp, workload, 2048)
    assert b.binding == "compute", (b.compute_us, b.memory_us, b.network_us)
    assert b.layer_lower_bound_us == b.compute_us


def test_sums_and_independence_of_tp() -> None:
    rng = random.Random()
    m = resolve_model("llama3-8b")
    gpu = resolve_gpu(rng.choice(["h100-sxm", "h200", "a100-80gb"]))
    tp = rng.choice([1, 2, 4, 8])
    dense = rng.randint(64, 4096)
    b = compute_bound(m, gpu, tp, "const:700:300", dense)
    g = build_layer_graph(m, b.composition.batch, tp)
    flops = sum(a["flops"] for _, a in g.nodes(data=True))
    hbm = sum(a["hbm_bytes"] for _, a in g.nodes(data=True))
    net = sum(a["net_bytes"] for _, a in g.nodes(data=True))
    assert b.compute_us == pytest.approx(flops / (gpu.peak_tflops * 1e12) * 1e6)
    assert b.memory_us == pytest.approx(hbm / (gpu.hbm_gbps * 1e9) * 1e6)
    assert b.network_us == pytest.approx(net / (gpu.nvlink_gbps * 1e9) * 1e6)
    assert (b.network_us == 0) == (tp == 1)
    assert b.optimal_tokens_per_s_per_gpu == pytest.approx(
        gpu.peak_tflops * 1e12 / (2 * param_counts(m).active))
    other = compute_bound(m, gpu, 1 if tp > 1 else 2, "const:700:300", dense)
    assert other.optimal_tokens_per_s_per_gpu == b.optimal_tokens_per_s_per_gpu


def test_memory_bound_when_decode_heavy() -> None:
    """Premise check in the other direction: pure long-context decode at a small batch is memory-bound."""
    b = compute_bound(resolve_model("llama3-8b"), resolve_gpu("h200"), 1, "const:8000:4000", 64)
    assert b.binding == "memory"


def test_to_dict_is_json() -> None:
    b = compute_bound(resolve_model("mixtral"), resolve_gpu("h100-sxm"), 8, "lmsys", 1024)
    d = json.loads(json.dumps(b.to_dict()))
    assert d["model"] == "mixtral-8x7b" and d["tp"] == 8 and d["workload"]["name"] == "lmsys"
    assert d["binding"] in ("compute", "memory", "network")
    assert d["composition"]["batch"]["dense_batch"] == 1024
    assert d["active_params"] < d["total_params"]
