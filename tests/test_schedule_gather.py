"""The all-gather form in the schedule file (FORMS.md): gather_tokens and the classes gather / reduce,
their validation, and the sequential baseline (the standard reduce-form layer). Torch-free."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_config
from gather_util import gather_schedule, tp_layer
from nfrt.config import BatchComposition
from nfrt.errors import ScheduleError
from nfrt.schedule import (
    GATHER_OPS,
    LayerOp,
    NanoOp,
    Schedule,
    dumps,
    load_schedule,
    loads,
    save_schedule,
    standard_layer,
)
from nfrt.schedule_validate import class_range

ROOT = Path(__file__).resolve().parent.parent
BATCH = BatchComposition(96, 64, 32, 40, 32)
BOUNDS = (0, 48, 96)


def _gather(name: str = "tiny-llama", g: int = 48, tp: int = 2) -> Schedule:
    return gather_schedule(tiny_config(name), BATCH, BOUNDS, g, tp=tp)


@pytest.mark.parametrize("g", [48, 96])
def test_round_trip_with_gather_tokens(g, tmp_path):
    s = _gather("tiny-mixtral", g)
    text = dumps(s)
    assert f"\n  gather_tokens: {g}\n" in text
    assert loads(text) == s
    p = save_schedule(s, tmp_path / "g.yaml")
    assert load_schedule(p) == s and dumps(load_schedule(p)) == text


def test_gather_tokens_omitted_when_zero_and_shipped_files_byte_identical():
    s = _gather(g=0)
    assert s.metadata.gather_tokens == 0 and "gather_tokens" not in dumps(s)
    assert "gather_tokens" not in s.metadata.to_dict()
    shipped = sorted((ROOT / "schedules").glob("*.yaml"))
    assert shipped
    for p in shipped:
        q = load_schedule(p)
        assert q.metadata.gather_tokens == 0
        assert dumps(q) == p.read_text(encoding="utf-8"), p.name


def test_class_range_of_gather_and_reduce():
    d, dense, g = 64, 96, random.randrange(0, 97)
    assert class_range("gather", d, dense, g) == (0, g)
    assert class_range("reduce", d, dense, g) == (g, dense)
    assert class_range("all", d, dense, g) == (0, dense)
    assert class_range("decode", d, dense, g) == (0, d)
    assert class_range("prefill", d, dense, g) == (d, dense)
    assert class_range("reduce", d, dense) == (0, dense)  # default: no gather form


def test_reduce_ops_need_no_piece_when_all_tokens_gather():
    s = _gather(g=96)
    ops = {op for st in s.streams for n in st.nano_ops for op in n.ops}
    assert "o_proj" not in ops and "attn_allreduce" not in ops
    assert {"attn_allgather", "o_proj_col", "o_allgather"} <= ops


def _refused(make, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        make()


def _with_meta(s: Schedule, **kv) -> Schedule:
    return replace(s, metadata=replace(s.metadata, **kv))


def _with_op(s: Schedule, name: str, **kv) -> Schedule:
    return replace(s, layer=tuple(replace(op, **kv) if op.name == name else op for op in s.layer))


def test_gather_tokens_must_be_a_boundary():
    s = _gather(g=48)
    _refused(lambda: _with_meta(s, gather_tokens=40),
             r"^metadata.gather_tokens: 40 is not a nano-batch boundary \(0, 48, 96\)$")
    with pytest.raises(ScheduleError, match="metadata.gather_tokens: 97 > dense_batch 96"):
        _with_meta(s, gather_tokens=97)
    with pytest.raises(ScheduleError, match="gather_tokens: must be >= 0"):
        _with_meta(s, gather_tokens=-1)
    d = s.to_dict()
    d["metadata"]["gather_tokens"] = "48"
    with pytest.raises(ScheduleError, match="metadata.gather_tokens: must be an integer"):
        Schedule.from_dict(d)


def test_gather_op_with_wrong_class_is_named():
    s = _gather(g=48)
    _refused(lambda: _with_op(s, "o_proj_col", token_class="all"),
             r"layer\[7\].token_class: op o_proj_col must have class gather, got all")
    with pytest.raises(ScheduleError, match=r"layer\[9\].token_class: op o_proj must have class reduce when "
                                            r"metadata.gather_tokens is 48, got all"):
        _with_op(s, "o_proj", token_class="all")
    _refused(lambda: _with_op(s, "post_norm", token_class="gather"),
             r"class gather is only for attn_allgather, o_proj_col, o_allgather, not post_norm")


def test_gather_op_needs_tp_above_one():
    _refused(lambda: _gather(g=48, tp=1),
             r"layer\[6\].name: op attn_allgather \(the all-gather form\) needs tp > 1, metadata.tp is 1")


def test_gather_tokens_need_the_gather_ops():
    s = _gather(g=48)
    std = tp_layer(tiny_config("tiny-llama"), False)
    layer = tuple(replace(op, token_class="reduce") if op.name in ("o_proj", "attn_allreduce") else op
                  for op in std)
    streams = tuple(replace(st, nano_ops=tuple(
        NanoOp(n.name, ("o_proj",), n.tokens, n.num_sms) if n.ops == ("o_proj_col",) else
        NanoOp(n.name, ("attn_allreduce",), n.tokens, n.num_sms) if n.ops == ("o_allgather",) else n
        for n in st.nano_ops if n.ops != ("attn_allgather",))) for st in s.streams)
    deps = tuple(d for d in s.dependencies if "ag." not in (d.before[:3], d.after[:3]))
    _refused(lambda: replace(s, layer=layer, streams=streams, dependencies=deps),
             "metadata.gather_tokens: 48 > 0 but the layer lacks attn_allgather, o_proj_col, o_allgather")


def test_gather_coverage_and_dependencies_use_the_split():
    s = _gather(g=48)
    # o_allgather of nano-batch 0 moved to nano-batch 1: tokens [0, 48) of the gather class uncovered
    streams = tuple(replace(st, nano_ops=tuple(replace(n, tokens=(48, 96)) if n.name == "og.0" else n
                                               for n in st.nano_ops)) for st in s.streams)
    with pytest.raises(ScheduleError, match=r"op o_allgather: tokens \[0,48\) not covered"):
        replace(s, streams=streams)
    deps = tuple(d for d in s.dependencies if (d.before, d.after) != ("og.0", "mlp.0"))
    _refused(lambda: replace(s, dependencies=deps),
             r"mlp.0 may start before og.0 finishes.*post_norm on tokens \[0,48\) needs o_allgather")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_as_sequential_is_the_standard_layer(name):
    s = _gather(name, 48)
    q = s.as_sequential()
    assert q.metadata.gather_tokens == 0 and "gather_tokens" not in dumps(q)
    assert q.layer == tp_layer(tiny_config(name), False)
    ops = [n.ops[0] for n in q.streams[0].nano_ops]
    assert not set(ops) & set(GATHER_OPS) and "o_proj" in ops and "attn_allreduce" in ops
    assert all(op.token_class in ("all", "decode", "prefill") for op in q.layer)
    assert standard_layer(q.layer) == q.layer  # the identity on a standard layer
    assert loads(dumps(q)) == q
    assert s.as_sequential(num_sms=114).metadata.num_sms == 114


def test_single_gpu_reference_of_a_gather_schedule():
    pytest.importorskip("torch")
    from nfrt.tp import single_gpu_reference

    ref = single_gpu_reference(_gather("tiny-mixtral", 96))
    assert ref.metadata.tp == 1 and ref.metadata.gather_tokens == 0
    names = [op.name for op in ref.layer]
    assert not {"attn_allgather", "o_proj_col", "o_allgather", "attn_allreduce", "mlp_allreduce"} & set(names)
    post = next(op for op in ref.layer if op.name == "post_norm")
    assert [d.op for d in post.deps] == ["o_proj"] and post.token_class == "all"
    o = next(op for op in ref.layer if op.name == "o_proj")
    assert o.token_class == "all"


def test_new_classes_accepted_on_layer_ops_and_others_refused():
    assert LayerOp("o_proj", "compute", "reduce").token_class == "reduce"
    assert LayerOp("o_proj_col", "compute", "gather").token_class == "gather"
    _refused(lambda: LayerOp("o_proj", "compute", "scatter"),
             "token_class: must be one of all, decode, prefill, gather, reduce")
