"""Workload parsing and the steady-state batch composition."""

from __future__ import annotations

import random

import pytest

from nfsearch.errors import NfsearchError
from nfsearch.gpus import resolve_gpu
from nfsearch.models import resolve_model, weight_bytes_per_gpu
from nfsearch.workload import Workload, compose_batch, kv_bytes_per_token, parse_workload


def test_parse_builtins_and_const() -> None:
    assert parse_workload("splitwise") == Workload("splitwise", 1155, 211)
    assert parse_workload("lmsys") == Workload("lmsys", 92, 207)
    assert parse_workload("sharegpt") == Workload("sharegpt", 299, 324)
    w = parse_workload("const:512:128")
    assert (w.input_len, w.output_len) == (512, 128)
    assert parse_workload(w) is w


@pytest.mark.parametrize("bad", ["", "sharegpt2", "const:5", "const:a:b", "const:0:5", "const:5:-1", "5:5"])
def test_bad_workloads_list_forms(bad: str) -> None:
    with pytest.raises(NfsearchError) as e:
        parse_workload(bad)
    assert "const:" in str(e.value) or "must be an integer" in str(e.value)


def test_composition_sums_random() -> None:
    rng = random.Random()
    model, gpu = resolve_model("llama2-70b"), resolve_gpu("a100-80gb")
    for _ in range(200):
        n_in, n_out = rng.randint(1, 2000), rng.randint(1, 600)
        dense = rng.randint(1, 4096)
        comp = compose_batch(model, Workload("w", n_in, n_out), gpu, tp=8, dense_batch=dense)
        b = comp.batch
        ctx = (n_in, n_out, dense)
        assert b.decode_tokens + b.prefill_tokens == b.dense_batch, ctx
        assert comp.concurrency == b.decode_tokens
        assert b.prefill_context == round((4 * n_in - 1) / 3)  # length-biased, uniform lengths
        if b.decode_tokens:
            assert abs(b.decode_context - (n_in + n_out / 2)) <= 0.5, ctx
        assert b.decode_tokens * b.decode_context <= comp.kv_capacity_tokens, ctx
        wanted = round(dense * n_out / (n_in + n_out))
        if comp.kv_limited:  # the dense batch did not fit: cap at the KV capacity, keep the ratio
            assert wanted * b.decode_context > comp.kv_capacity_tokens, ctx
            assert b.dense_batch < dense and b.decode_tokens < wanted, ctx
        else:
            assert b.dense_batch == dense, ctx
            assert abs(b.decode_tokens - dense * n_out / (n_in + n_out)) <= 0.5, ctx


def test_granularity_rounding() -> None:
    rng = random.Random()
    model, gpu = resolve_model("llama3-70b"), resolve_gpu("h200")
    for _ in range(20):
        g = rng.choice([8, 16, 32, 64])
        dense = g * rng.randint(4, 64)
        wl = Workload("w", rng.randint(10, 1500), rng.randint(10, 500))
        b = compose_batch(model, wl, gpu, tp=8, dense_batch=dense, round_to=g).batch
        assert b.decode_tokens % g == 0 and b.prefill_tokens % g == 0
        assert abs(b.decode_tokens - dense * wl.output_len / (wl.input_len + wl.output_len)) <= g / 2
    with pytest.raises(NfsearchError, match="round_to"):
        compose_batch(model, wl, gpu, tp=8, dense_batch=100, round_to=16)


def test_kv_capacity_formula() -> None:
    model, gpu = resolve_model("llama3-8b"), resolve_gpu("h100-sxm")
    comp = compose_batch(model, parse_workload("lmsys"), gpu, tp=2)
    per_token = 2 * 32 * (8 // 2) * 128 * 2
    assert comp.kv_bytes_per_token == per_token == kv_bytes_per_token(model, 2)
    assert comp.weight_bytes_per_gpu == weight_bytes_per_gpu(model, 2)
    usable = 81559 * 2**20 * 0.9
    assert comp.kv_capacity_tokens == int((usable - comp.weight_bytes_per_gpu) // per_token)


def test_kv_limited_path() -> None:
    model, gpu = resolve_model("llama3-8b"), resolve_gpu("a100-80gb")
    wl = parse_workload("sharegpt")
    comp = compose_batch(model, wl, gpu, tp=1, dense_batch=2048)
    b = comp.batch
    assert comp.kv_limited and "KV-limited" in comp.note
    assert b.decode_tokens * b.decode_context <= comp.kv_capacity_tokens
    assert (b.decode_tokens + 1) * b.decode_context > comp.kv_capacity_tokens  # as many as fit
    assert b.dense_batch < 2048 and b.decode_tokens + b.prefill_tokens == b.dense_batch
    ratio = wl.output_len / (wl.input_len + wl.output_len)
    assert abs(b.decode_tokens / b.dense_batch - ratio) < 1 / b.dense_batch


def test_kv_limited_random_small_gpu() -> None:
    """Shrink the GPU's memory until the KV cache binds; the batch must always fit it."""
    rng = random.Random()
    model = resolve_model("tiny-llama")
    per_token = kv_bytes_per_token(model)
    for _ in range(20):
        wl = Workload("w", rng.randint(1, 300), rng.randint(1, 300))
        ctx = round(wl.input_len + wl.output_len / 2 + 1e-9)
        cap_tokens = rng.randint(ctx, 200 * ctx)
        mem = (weight_bytes_per_gpu(model) + cap_tokens * per_token + 1) / 0.9 / 2**30
        gpu = resolve_gpu("h200")
        gpu = type(gpu)(**{**gpu.to_dict(), "memory_gib": mem})
        comp = compose_batch(model, wl, gpu, dense_batch=4096)
        b = comp.batch
        assert b.decode_tokens * b.decode_context <= comp.kv_capacity_tokens, (wl, cap_tokens)
        assert b.decode_tokens >= 1 and b.decode_tokens + b.prefill_tokens == b.dense_batch
        assert comp.kv_limited == (round(4096 * wl.output_len / (wl.input_len + wl.output_len))
                                   * b.decode_context > comp.kv_capacity_tokens)


def test_weights_too_large_and_bad_inputs() -> None:
    model, gpu = resolve_model("llama2-70b"), resolve_gpu("a100-80gb")
    with pytest.raises(NfsearchError, match="raise --tp"):
        compose_batch(model, parse_workload("splitwise"), gpu, tp=1)
    for dense in (-1, 0):
        with pytest.raises(NfsearchError, match="dense_batch"):
            compose_batch(model, parse_workload("splitwise"), gpu, tp=8, dense_batch=dense)
    with pytest.raises(NfsearchError, match="activation_reserve_frac"):
        compose_batch(model, parse_workload("splitwise"), gpu, tp=8, activation_reserve_frac=1.0)
    with pytest.raises(NfsearchError, match="does not divide"):
        compose_batch(model, parse_workload("splitwise"), gpu, tp=3)


def test_smallest_tp_is_the_least_degree_that_fits():
    from nfsearch.errors import NfsearchError
    from nfsearch.gpus import resolve_gpu
    from nfsearch.models import resolve_model
    from nfsearch.workload import compose_batch, parse_workload, smallest_tp

    w, h200 = parse_workload("splitwise"), resolve_gpu("h200")
    assert smallest_tp(resolve_model("llama3-8b"), w, h200) == 1
    tp = smallest_tp(resolve_model("llama2-70b"), w, h200, round_to=64)
    assert tp == 2  # 138 GB of bf16 weights do not fit one 141 GB GPU with a KV cache
    with pytest.raises(NfsearchError):
        compose_batch(resolve_model("llama2-70b"), w, h200, tp=1, round_to=64)
    with pytest.raises(NfsearchError, match="does not fit"):
        smallest_tp(resolve_model("llama2-70b"), w, h200, candidates=(1,))


def test_prefill_context_is_the_length_biased_prompt_length() -> None:
    """Uniform lengths on [1, 2I - 1]: L_eff = E[L^2] / E[L] = (4I - 1) / 3 (1540 for splitwise);
    const: exactly I."""
    model, gpu = resolve_model("llama3-8b"), resolve_gpu("h200")
    assert compose_batch(model, parse_workload("splitwise"), gpu, round_to=64).batch.prefill_context == 1540
    rng = random.Random()
    for _ in range(20):
        n_in, n_out = rng.randint(1, 3000), rng.randint(1, 500)
        const = parse_workload(f"const:{n_in}:{n_out}")
        assert const.lengths == "const" and const.to_dict()["lengths"] == "const"
        assert compose_batch(model, const, gpu).batch.prefill_context == n_in
        lengths = range(1, 2 * n_in)  # exact E[L^2] / E[L] of the uniform assumption
        l_eff = sum(x * x for x in lengths) / sum(lengths)
        assert abs(Workload("w", n_in, n_out).prefill_prompt_len - l_eff) <= 0.5
    assert {w.lengths for w in (parse_workload(n) for n in ("splitwise", "lmsys", "sharegpt"))} == {"uniform"}
    with pytest.raises(NfsearchError, match="lengths must be one of uniform, const"):
        Workload("w", 10, 10, "zipf")
