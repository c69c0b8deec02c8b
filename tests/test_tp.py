"""Tensor parallelism on the CPU (gloo): weight shards, the tp-1 reference schedule, and TP = 2 runs
launched with torchrun that must compute what one process computes with the whole weights."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import close, tiny_config, tp2_matches_one_process  # noqa: E402
from nfrt.engine import Engine  # noqa: E402
from nfrt.errors import ConfigError, NfrtError  # noqa: E402
from nfrt.schedule import load_schedule, save_schedule  # noqa: E402
from nfrt.tp import (  # noqa: E402
    random_shard_weights,
    shard_config,
    shard_weights,
    single_gpu_reference,
    vocab_shard,
)
from nfrt.weights import random_weights  # noqa: E402


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_random_shards_are_shards_of_random_weights(name):
    config = tiny_config(name)
    seed = random.randrange(1000)
    full = random_weights(config, seed=seed)
    for rank in range(2):
        a = random_shard_weights(config, rank, 2, seed=seed)
        b = shard_weights(full, config, rank, 2)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_sharded_linears_sum_to_the_full_ones():
    """Column-parallel qkv/gate_up give each rank its heads / intermediate rows; row-parallel o_proj
    and down give partial products whose sum over ranks is the full product."""
    config = replace(tiny_config("tiny-llama"), qkv_bias=True)
    w = random_weights(config, seed=random.randrange(1000))
    tp = 2
    shards = [shard_weights(w, config, r, tp) for r in range(tp)]
    sc = shard_config(config, tp)
    c = config
    q, kv = c.q_size, c.kv_size
    full_qkv = w["layers.0.qkv"]
    got_q = torch.cat([s["layers.0.qkv"][: sc.q_size] for s in shards])
    got_k = torch.cat([s["layers.0.qkv"][sc.q_size: sc.q_size + sc.kv_size] for s in shards])
    got_v = torch.cat([s["layers.0.qkv"][sc.q_size + sc.kv_size:] for s in shards])
    assert torch.equal(got_q, full_qkv[:q]) and torch.equal(got_k, full_qkv[q: q + kv])
    assert torch.equal(got_v, full_qkv[q + kv:])
    bias_q = torch.cat([s["layers.0.qkv_bias"][: sc.q_size] for s in shards])
    assert torch.equal(bias_q, w["layers.0.qkv_bias"][:q])
    x = torch.randn(5, c.q_size)
    qs = sc.q_size
    partial = sum(x[:, r * qs:(r + 1) * qs] @ shards[r]["layers.0.o_proj"].t() for r in range(tp))
    close(partial, x @ w["layers.0.o_proj"].t())
    act = torch.randn(5, c.intermediate_size)
    i = sc.intermediate_size
    partial = sum(act[:, r * i:(r + 1) * i] @ shards[r]["layers.0.down"].t() for r in range(tp))
    close(partial, act @ w["layers.0.down"].t())
    gate = torch.cat([s["layers.0.gate_up"][:i] for s in shards])
    assert torch.equal(gate, w["layers.0.gate_up"][: c.intermediate_size])


def test_lm_head_pads_the_vocabulary():
    config = replace(tiny_config("tiny-llama"), vocab_size=251)
    w = random_weights(config, seed=1)
    rows = vocab_shard(config, 2)
    assert rows == 126
    heads = [shard_weights(w, config, r, 2)["lm_head"] for r in range(2)]
    assert all(h.shape == (126, config.hidden_size) for h in heads)
    assert torch.equal(torch.cat(heads)[:251], w["lm_head"])
    assert not torch.cat(heads)[251:].any()


def test_bad_tp_is_named():
    config = tiny_config("tiny-llama")
    with pytest.raises(ConfigError, match="num_heads 4"):
        shard_config(config, 3)
    with pytest.raises(ConfigError, match="positive integer"):
        shard_config(config, 0)


@pytest.fixture(scope="module")
def tp2_schedules(tmp_path_factory):
    pytest.importorskip("ortools")
    from nfsearch.config import SolveConfig
    from nfsearch.plan import plan

    out = {}
    folder = tmp_path_factory.mktemp("tp2")
    for name in ("tiny-llama", "tiny-mixtral"):
        r = plan(SolveConfig(model=name, gpu="h200", tp=2, dense_batch=192, workload="const:64:32",
                             time_limit_s=5))
        assert any(st.kind == "network" for st in r.schedule.streams) or any(
            op.kind == "network" for op in r.schedule.layer)
        out[name] = save_schedule(r.schedule, folder / f"{name}.yaml")
    return out


def test_single_gpu_reference_drops_the_network_ops(tp2_schedules):
    s = load_schedule(tp2_schedules["tiny-mixtral"])
    ref = single_gpu_reference(s)
    assert ref.metadata.tp == 1
    names = {op.name for op in ref.layer}
    assert "attn_allreduce" not in names and "mlp_allreduce" not in names
    post = next(op for op in ref.layer if op.name == "post_norm")
    assert [d.op for d in post.deps] == ["o_proj"]
    first = next(op for op in ref.layer if op.name == "input_norm")
    assert [(d.op, d.prev_layer) for d in first.deps] == [("expert_down", True)]


def test_tp_schedule_outside_torchrun_says_how_to_launch(tp2_schedules, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(NfrtError, match="--tp N"):
        Engine.from_schedule(tp2_schedules["tiny-llama"], device="cpu")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_tp2_equals_one_process(name, tp2_schedules, tmp_path):
    """Two gloo processes, each with its shard, give the logits one process gives with the whole
    weights (fresh weight and batch seeds), for the searched schedule and its sequential twin."""
    tp2_matches_one_process(tp2_schedules[name], tmp_path)


# ---- the all-gather form of the attention output (FORMS.md) ----------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_o_proj_col_shards_reassemble_the_full_o_proj(name):
    """Each rank's o_proj_col is its H/tp rows of the full o_proj (all q columns): stacked in rank
    order they are the full o_proj, and the random shards equal the shards of the random weights."""
    config = tiny_config(name)
    seed, tp = random.randrange(1000), 2
    full = random_weights(config, seed=seed)
    shards = [shard_weights(full, config, r, tp, gather_form=True) for r in range(tp)]
    rows = config.hidden_size // tp
    for n in range(config.num_layers):
        key = f"layers.{n}.o_proj_col"
        assert all(s[key].shape == (rows, config.num_heads * config.head_dim) for s in shards)
        assert torch.equal(torch.cat([s[key] for s in shards]), full[f"layers.{n}.o_proj"])
        x = torch.randn(3, config.q_size)  # the column-parallel product: rank r's slice of x @ o_proj.T
        close(torch.cat([x @ s[key].t() for s in shards], 1), x @ full[f"layers.{n}.o_proj"].t())
    for r in range(tp):
        a = random_shard_weights(config, r, tp, seed=seed, gather_form=True)
        assert a.keys() == shards[r].keys()
        assert all(torch.equal(a[k], shards[r][k]) for k in a)
    assert not any(k.endswith("o_proj_col") for k in random_shard_weights(config, 0, tp, seed=seed))
    with pytest.raises(ConfigError, match="all-gather form needs tp > 1"):
        random_shard_weights(config, 0, 1, gather_form=True)


def test_gather_ops_at_tp1_raise():
    from nfrt.batch import BatchBuffers, BatchShape, make_batch
    from nfrt.config import BatchComposition
    from nfrt.kvcache import KVCache
    from nfrt.model import Model

    config = tiny_config("tiny-llama")
    w = random_weights(config, seed=random.randrange(1000))
    w["layers.0.o_proj_col"] = w["layers.0.o_proj"]  # weights alone do not make tp 1 gather
    model = Model(config, w, max_tokens=8, kv_cache=KVCache.for_model(config, 8, "cpu", torch.float32))
    assert not model.gather_form and not hasattr(model, "gather_attn")  # no buffers allocated
    batch = make_batch(BatchComposition(8, 8, 0, 4, 0), config.vocab_size, seed=1)
    buffers = BatchBuffers(BatchShape.of(batch, model.kv.page_size), model.device)
    buffers.prepare(batch, model.kv.allocator)
    model.bind(buffers)
    for op in ("attn_allgather", "o_proj_col", "o_allgather"):
        with pytest.raises(NfrtError, match=f"op {op} of the all-gather form cannot run: tp is 1"):
            model.run_op(0, op, 0, 8)


def _gather_schedule_file(name: str, gather_tokens: int, folder: Path) -> Path:
    from gather_util import gather_schedule
    from nfrt.config import BatchComposition

    batch = BatchComposition(96, 64, 32, 40, 32)  # nano-batches [0, 48) decode, [48, 96) mixed
    s = gather_schedule(tiny_config(name), batch, (0, 48, 96), gather_tokens)
    return save_schedule(s, folder / f"{name}-g{gather_tokens}.yaml")


GATHER_CASES = [("tiny-llama", 48), ("tiny-llama", 96), ("tiny-mixtral", 48), ("tiny-mixtral", 96)]


@pytest.mark.parametrize("name,gather_tokens", GATHER_CASES, ids=[f"{n}-g{g}" for n, g in GATHER_CASES])
def test_tp2_gather_form_equals_one_process(name, gather_tokens, tmp_path):
    """A TP-2 schedule whose first nano-batch (or both) runs the attention output in the all-gather
    form (attn_allgather -> o_proj_col -> o_allgather) gives the logits one process gives with the
    whole weights; its sequential twin (the reduce form, same model and buffers) too."""
    path = _gather_schedule_file(name, gather_tokens, tmp_path)
    assert tp2_matches_one_process(path, tmp_path).metadata.gather_tokens == gather_tokens
