"""nfrt.schedule: the schedule file's schema, YAML I/O and validation rules."""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from nfrt.config import BatchComposition, ModelConfig
from nfrt.errors import ScheduleError
from nfrt.schedule import (
    SCHEMA_VERSION,
    Dependency,
    LayerOp,
    Metadata,
    NanoOp,
    OpDep,
    Partition,
    Prediction,
    ProfileInfo,
    Schedule,
    SolverInfo,
    TimelineEntry,
    dumps,
    load_schedule,
    loads,
    save_schedule,
)

DATA = Path(__file__).parent / "data"
EXAMPLE = DATA / "tiny_llama_2stream.yaml"
EXAMPLE3 = DATA / "tiny_llama_3stream.yaml"  # overlapping partitions: compute-132, compute-88, memory-44

TINY = ModelConfig(name="tiny-llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=128, vocab_size=256)


def example_dict(path: Path = EXAMPLE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def example() -> Schedule:
    return load_schedule(EXAMPLE)


def nano(d: dict, name: str) -> dict:
    return next(n for s in d["streams"] for n in s["nano_ops"] if n["name"] == name)


def refused(mutate: Callable[[dict], object], match: str, path: Path = EXAMPLE) -> str:
    d = example_dict(path)
    mutate(d)
    with pytest.raises(ScheduleError, match=match) as e:
        Schedule.from_dict(d)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- the hand-written example, round trips ------------------------------------------------------

def test_hand_written_example_loads():
    s = example()
    assert s.schema_version == SCHEMA_VERSION
    assert s.metadata.model_config == TINY
    assert s.metadata.batch == BatchComposition(256, 192, 64, 512, 256)
    assert [st.name for st in s.streams] == ["compute", "memory"]
    assert [(nb.start, nb.end) for nb in s.nano_batches] == [(0, 128), (128, 256)]
    assert s.nano_op("mlp.1").ops == ("o_proj", "post_norm", "gate_up", "silu_mul", "down")
    assert s.nano_op("qkv.1").tokens == (128, 256)
    assert s.stream_of("attn_decode.0").partition == "p_memory"
    assert s.layer[0].deps == (OpDep(op="down", scope="token", prev_layer=True),)
    assert s.prediction is not None and len(s.prediction.timeline) == 7
    with pytest.raises(ScheduleError, match="unknown nano-op 'nope'"):
        s.nano_op("nope")


def test_dict_round_trip_is_identical():
    s = example()
    d = s.to_dict()
    again = Schedule.from_dict(d)
    assert again == s
    assert again.to_dict() == d
    assert list(d) == ["schema_version", "metadata", "layer", "partitions", "streams", "nano_batches",
                       "dependencies", "prediction"]


def test_yaml_round_trip_is_byte_identical(tmp_path):
    s = example()
    text = dumps(s)
    assert dumps(loads(text)) == text
    p = save_schedule(s, tmp_path / "a.yaml")
    assert p.read_bytes() == text.encode()
    save_schedule(load_schedule(p), tmp_path / "b.yaml")
    assert (tmp_path / "b.yaml").read_bytes() == p.read_bytes()


def test_structure_family_flag_is_omitted_when_false_and_round_trips():
    s = example()
    assert "structure_family" not in s.to_dict()["metadata"]["solver"]  # old files keep their bytes
    solver = dataclasses.replace(s.metadata.solver, structure_family=True)
    meta = dataclasses.replace(s.metadata, solver=solver)
    fam = dataclasses.replace(s, metadata=meta)
    d = fam.to_dict()
    assert d["metadata"]["solver"]["structure_family"] is True
    assert loads(dumps(fam)) == fam and dumps(loads(dumps(fam))) == dumps(fam)
    d["metadata"]["solver"]["structure_family"] = "yes"
    with pytest.raises(ScheduleError, match="metadata.solver.structure_family"):
        Schedule.from_dict(d)


def test_floats_rounded_to_3_decimals_ratios_to_6_digits_and_stable():
    rng = random.Random()
    s = example()
    vals = [rng.uniform(0, 1e4) for _ in range(8)]
    timeline = tuple(TimelineEntry(nano_op=e.nano_op, stream=e.stream, start_us=v,
                                   end_us=v + rng.uniform(0, 50))
                     for e, v in zip(s.prediction.timeline, vals, strict=False))
    pred = Prediction(period_us=vals[0], layer_span_us=vals[1], iteration_us=vals[2],
                      tokens_per_s_per_gpu=vals[3] * 1e3, fraction_of_bound=rng.uniform(1e-7, 1e-3),
                      optimal_tokens_per_s_per_gpu=vals[4] * 1e6, speedup_vs_sequential=1 + rng.random(),
                      timeline=timeline)
    gap = rng.uniform(1e-9, 1e-4)
    solver = dataclasses.replace(s.metadata.solver, objective_us=vals[5], gap=gap)
    s2 = dataclasses.replace(s, prediction=pred, metadata=dataclasses.replace(s.metadata, solver=solver))
    text = dumps(s2)
    back = loads(text)
    assert back.prediction.period_us == round(pred.period_us, 3)
    assert back.metadata.solver.objective_us == round(vals[5], 3)
    # ratios keep 6 significant digits: a tiny model's fraction of the bound does not round to 0
    for got, want in ((back.prediction.fraction_of_bound, pred.fraction_of_bound),
                      (back.prediction.speedup_vs_sequential, pred.speedup_vs_sequential),
                      (back.metadata.solver.gap, gap)):
        assert got == float(f"{want:.6g}") and got != 0
        assert abs(got - want) <= 5e-6 * want
    for a, b in zip(back.prediction.timeline, timeline, strict=True):
        assert a.start_us == round(b.start_us, 3) and a.end_us == round(b.end_us, 3)
    assert dumps(back) == text


def test_hand_written_defaults_fill_in():
    d = example_dict()
    del d["prediction"]
    d["streams"][1]["nano_ops"] = [{"name": "attn_decode.all", "ops": ["attn_decode"], "tokens": [0, 256],
                                    "num_sms": 32}]
    d["dependencies"] = [{"before": "qkv.1", "after": "attn_decode.all"},
                         {"before": "attn_decode.all", "after": "mlp.0"}]
    s = Schedule.from_dict(d)
    assert s.prediction is None
    assert s.dependencies[0] == Dependency(before="qkv.1", after="attn_decode.all", prev_layer=False)
    assert s.layer[1] == LayerOp(name="qkv_proj", kind="compute", token_class="all",
                                 deps=(OpDep(op="input_norm", scope="token", prev_layer=False),))


# ---- structural errors ---------------------------------------------------------------------------

def test_unknown_missing_and_wrong_type_keys_are_named():
    refused(lambda d: nano(d, "qkv.1").update(colour="red"),
            r"^streams\[0\]\.nano_ops\[1\]: unknown key\(s\) colour; known: name, ops, tokens, num_sms$")
    refused(lambda d: d["metadata"].pop("gpu"), r"^metadata: missing key\(s\) gpu$")
    refused(lambda d: d["partitions"][1].update(num_sms="32"),
            r"^partitions\[1\]\.num_sms: must be an integer, got str '32'$")
    refused(lambda d: d["streams"][1].update(kind="gpu"),
            r"^streams\[1\]\.kind: must be one of compute, memory")
    refused(lambda d: nano(d, "mlp.0").update(tokens=[0]),
            r"^streams\[0\]\.nano_ops\[3\]\.tokens: must be a pair")
    refused(lambda d: d["metadata"]["batch"].pop("decode_context"),
            r"^metadata\.batch: batch: missing field\(s\) decode_context$")
    refused(lambda d: d["prediction"].update(period_us=float("nan")),
            r"^prediction\.period_us: must be a finite")
    refused(lambda d: d.update(layer="qkv"), r"^layer: must be a list")
    with pytest.raises(ScheduleError, match=r"^schedule: must be a mapping"):
        Schedule.from_dict([1, 2])


def test_direct_construction_checks_types():
    with pytest.raises(ScheduleError, match=r"NanoOp\('x'\)\.ops: must not be empty"):
        NanoOp(name="x", ops=(), tokens=(0, 8), num_sms=8)
    with pytest.raises(ScheduleError, match=r"Partition\('p'\)\.num_sms: must be a positive integer, got 0"):
        Partition(name="p", num_sms=0)
    assert NanoOp(name="x", ops=["a"], tokens=[0, 8], num_sms=8).tokens == (0, 8)  # lists normalized


def test_newer_schema_version_is_refused():
    msg = refused(lambda d: d.update(schema_version=SCHEMA_VERSION + 1, new_section={}),
                  "newer than this nfrt supports")
    assert f"schema_version {SCHEMA_VERSION + 1}" in msg and f"({SCHEMA_VERSION})" in msg
    refused(lambda d: d.update(schema_version=0), r"^schema_version: must be >= 1")


def test_safe_load_refuses_python_tags(tmp_path):
    marker = tmp_path / "pwned"
    text = EXAMPLE.read_text().replace("workload: splitwise",
                                       f"workload: !!python/object/apply:os.system ['touch {marker}']")
    p = tmp_path / "evil.yaml"
    p.write_text(text)
    with pytest.raises(ScheduleError, match="not a valid YAML schedule"):
        load_schedule(p)
    assert not marker.exists()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ScheduleError, match="cannot read schedule"):
        load_schedule(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text(EXAMPLE.read_text().replace("num_sms: 132", "num_sms: 100"))
    with pytest.raises(ScheduleError,
                       match=rf"^{p}: partitions\[1\]: SMs \[96, 128\) exceed the GPU's 100 SMs$"):
        load_schedule(p)


def test_atomic_save_leaves_old_file_intact(tmp_path, monkeypatch):
    s = example()
    path = tmp_path / "s.yaml"
    path.write_text("old contents\n")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ScheduleError, match="cannot write schedule .*No space left"):
        save_schedule(s, path)
    assert path.read_text() == "old contents\n"
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]  # no temp file left behind
    monkeypatch.undo()
    save_schedule(s, path)
    assert load_schedule(path) == s
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]


# ---- validation rules: each bad variant of the example names its error ---------------------------

def _set(path_fn: Callable[[dict], dict], **kv) -> Callable[[dict], None]:
    return lambda d: path_fn(d).update(kv)


def _add_dep(before: str, after: str, prev_layer: bool = False) -> Callable[[dict], None]:
    return lambda d: d["dependencies"].append({"before": before, "after": after, "prev_layer": prev_layer})


def _drop_dep(before: str, after: str) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        d["dependencies"] = [x for x in d["dependencies"] if (x["before"], x["after"]) != (before, after)]
    return f


def _both(*fs: Callable[[dict], None]) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        for g in fs:
            g(d)
    return f


RULES = [
    # metadata consistency
    ("dense_batch", _set(lambda d: d["metadata"], dense_batch=512),
     r"^metadata\.dense_batch: 512 != metadata\.batch\.dense_batch 256$"),
    ("model name", _set(lambda d: d["metadata"], model="llama3-8b"),
     r"^metadata\.model: 'llama3-8b' != metadata\.model_config\.name 'tiny-llama'$"),
    # partitions
    ("duplicate partition", _set(lambda d: d["partitions"][1], name="p_compute"),
     r"^partitions\[1\]\.name: duplicate partition p_compute$"),
    ("partition size", _set(lambda d: d["partitions"][0], num_sms=0),
     r"^partitions\[0\]\.num_sms: must be a positive integer, got 0$"),
    ("negative partition", _set(lambda d: d["partitions"][1], num_sms=-8),
     r"^partitions\[1\]\.num_sms: must be a positive integer, got -8$"),
    ("partitions exceed", _set(lambda d: d["partitions"][1], num_sms=48),
     r"^partitions\[1\]: SMs \[96, 144\) exceed the GPU's 132 SMs$"),
    ("partition placed past the GPU", _set(lambda d: d["partitions"][0], first_sm=40),
     r"^partitions\[0\]: SMs \[40, 136\) exceed the GPU's 132 SMs$"),
    ("negative first_sm", _set(lambda d: d["partitions"][1], first_sm=-8),
     r"^partitions\[1\]\.first_sm: must be >= 0, got -8$"),
    ("first_sm not an int", _set(lambda d: d["partitions"][1], first_sm=96.0),
     r"^partitions\[1\]\.first_sm: must be an integer, got float 96\.0$"),
    ("overlapping partitions", _set(lambda d: d["partitions"][1], first_sm=64),
     r"^dependencies: streams compute and memory share SMs \[64, 96\) \(partitions p_compute \[0, 96\), "
     r"p_memory \[64, 96\)\) but nano-ops qkv\.1 and attn_decode\.0 may run at the same time: "
     r"add a dependency$"),
    ("shared partition", _both(_set(lambda d: d["streams"][1], partition="p_compute"),
                               _set(lambda d: nano(d, "attn_decode.0"), num_sms=96),
                               _set(lambda d: nano(d, "attn_decode.1"), num_sms=96)),
     r"^dependencies: streams compute and memory share SMs \[0, 96\) \(partitions p_compute \[0, 96\), "
     r"p_compute \[0, 96\)\) but nano-ops qkv\.1 and attn_decode\.0 may run at the same time"),
    ("unknown partition", _set(lambda d: d["streams"][1], partition="p9"),
     r"^streams\[1\]\.partition: unknown partition p9; known: p_compute, p_memory$"),
    # streams and nano-ops
    ("duplicate stream", _set(lambda d: d["streams"][1], name="compute"),
     r"^streams\[1\]\.name: duplicate stream compute$"),
    ("duplicate nano-op", _set(lambda d: nano(d, "attn_decode.1"), name="qkv.0"),
     r"^streams\[1\]\.nano_ops\[1\]\.name: duplicate nano-op qkv\.0 \(also in stream compute\)$"),
    ("nano-op SMs", _set(lambda d: nano(d, "mlp.0"), num_sms=64),
     r"^streams\[0\]\.nano_ops\[3\]\.num_sms: 64 != 96, the SMs of partition p_compute"),
    ("tokens past batch", _set(lambda d: nano(d, "attn_decode.1"), tokens=[128, 300]),
     r"^streams\[1\]\.nano_ops\[1\]\.tokens: end 300 > dense_batch 256$"),
    ("empty token range", _set(lambda d: nano(d, "attn_decode.1"), tokens=[128, 128]),
     r"^streams\[1\]\.nano_ops\[1\]\.tokens: start 128 >= end 128"),
    ("unknown op", _set(lambda d: nano(d, "mlp.1"), ops=["o_proj", "post_norm", "gate_up", "swiglu", "down"]),
     r"^streams\[0\]\.nano_ops\[4\]\.ops\[3\]: unknown op swiglu; known: input_norm, qkv_proj"),
    ("op order", _set(lambda d: nano(d, "mlp.0"), ops=["o_proj", "gate_up", "post_norm", "silu_mul", "down"]),
     r"^streams\[0\]\.nano_ops\[3\]\.ops: gate_up is listed before post_norm, which it depends on"),
    ("op twice", _set(lambda d: nano(d, "attn_decode.0"), ops=["attn_decode", "attn_decode"]),
     r"^streams\[1\]\.nano_ops\[0\]\.ops\[1\]: op attn_decode listed twice$"),
    ("empty stream", _set(lambda d: d["streams"][1], nano_ops=[]),
     r"^streams\[1\]\.nano_ops: must list at least one nano-op$"),
    # layer graph
    ("layer not topological", lambda d: d["layer"].insert(0, d["layer"].pop(1)),
     r"^layer\[0\]\.deps\[0\]\.op: qkv_proj depends on input_norm of the same layer, which is not listed"),
    ("unknown layer dep", _set(lambda d: d["layer"][2]["deps"][0], op="qkv"),
     r"^layer\[2\]\.deps\[0\]\.op: unknown op qkv; known: input_norm"),
    ("duplicate layer op", _set(lambda d: d["layer"][2], name="qkv_proj"),
     r"^layer\[2\]\.name: duplicate op qkv_proj$"),
    # nano-batches
    ("nano-batch gap", _set(lambda d: d["nano_batches"][1], start=160),
     r"^nano_batches\[1\]\.start: 160 != previous end 128 \(nano-batches must tile \[0, 256\) in order\)$"),
    ("nano-batch overlap", _set(lambda d: d["nano_batches"][0], end=192),
     r"^nano_batches\[1\]\.start: 128 != previous end 192"),
    ("nano-batch first start", _set(lambda d: d["nano_batches"][0], start=64),
     r"^nano_batches\[0\]\.start: 64 != 0"),
    ("nano-batch short", _set(lambda d: d["nano_batches"][1], end=200),
     r"^nano_batches\[1\]\.end: 200 != dense_batch 256"),
    ("nano-batch order", lambda d: d["nano_batches"].reverse(), r"^nano_batches\[0\]\.start: 128 != 0"),
    ("duplicate nano-batch", _set(lambda d: d["nano_batches"][1], name="nb0"),
     r"^nano_batches\[1\]\.name: duplicate nano-batch nb0$"),
    # token ranges and coverage
    ("misaligned", _set(lambda d: nano(d, "attn_prefill.0"), tokens=[64, 256]),
     r"^streams\[0\]\.nano_ops\[2\]\.tokens: start 64 is not a nano-batch boundary \(0, 128, 256\)$"),
    ("covered twice", _set(lambda d: nano(d, "attn_decode.1"), tokens=[0, 256]),
     r"^op attn_decode: tokens \[0,128\) covered twice \(by attn_decode\.0, attn_decode\.1\)$"),
    ("not covered", _both(lambda d: d["streams"][1]["nano_ops"].pop(), _drop_dep("qkv.1", "attn_decode.1"),
                          _drop_dep("attn_decode.1", "mlp.1"), lambda d: d.pop("prediction")),
     r"^op attn_decode: tokens \[128,256\) not covered$"),
    # dependencies
    ("unknown dep", _add_dep("qkv.0", "attn.9"), r"^dependencies\[4\]\.after: unknown nano-op attn\.9$"),
    ("self cycle", _add_dep("mlp.0", "mlp.0"),
     r"^dependencies: cycle \(deadlock\) through nano-ops mlp\.0 -> mlp\.0$"),
    ("cross-stream cycle", _add_dep("mlp.0", "attn_decode.0"),
     r"^dependencies: cycle \(deadlock\) through nano-ops .*attn_decode\.0 -> mlp\.0"),
    ("cycle through FIFO order", _add_dep("mlp.1", "qkv.1"), r"^dependencies: cycle \(deadlock\)"),
    ("missing dep", _drop_dep("attn_decode.1", "mlp.1"),
     r"^dependencies: nano-op mlp\.1 may start before attn_decode\.1 finishes: add a dependency "
     r"\(o_proj on tokens \[128,192\) needs attn_decode\)$"),
    ("missing kv dep", _drop_dep("qkv.0", "attn_decode.0"),
     r"nano-op attn_decode\.0 may start before qkv\.0 finishes: add a dependency"),
    # prediction
    ("timeline stream", _set(lambda d: d["prediction"]["timeline"][0], stream="memory"),
     r"^prediction\.timeline\[0\]\.stream: nano-op qkv\.0 is on stream compute, not memory$"),
    ("timeline unknown", _set(lambda d: d["prediction"]["timeline"][0], nano_op="qkv.7"),
     r"^prediction\.timeline\[0\]\.nano_op: unknown nano-op qkv\.7$"),
    ("timeline missing", lambda d: d["prediction"]["timeline"].pop(),
     r"^prediction\.timeline: missing nano-op\(s\) mlp\.1 \(list all or none\)$"),
    ("timeline backwards", _set(lambda d: d["prediction"]["timeline"][1], end_us=1.0),
     r"^prediction\.timeline\[1\]\.end_us: 1\.0 < start_us 8\.0$"),
]


@pytest.mark.parametrize(("mutate", "match"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_validation_rule(mutate, match):
    refused(mutate, match)


def test_cycle_names_the_nano_ops_on_it():
    msg = refused(_add_dep("mlp.1", "attn_decode.0"), "cycle")
    on_cycle = set(msg.split("nano-ops ", 1)[1].split(" -> "))
    assert on_cycle == {"attn_decode.0", "mlp.0", "mlp.1"}


def _prev_layer_variant(d: dict) -> None:
    """Decode attention waits on the previous layer's `down` instead of this layer's kv_append: the
    memory stream then needs a prev_layer dependency from the compute stream."""
    d["layer"][4]["deps"] = [{"op": "down", "prev_layer": True}]
    d["dependencies"] = [x for x in d["dependencies"] if not x["before"].startswith("qkv")]


def test_prev_layer_dependency_must_be_implied():
    refused(_prev_layer_variant,
            r"^dependencies: nano-op attn_decode\.0 may start before the previous layer's mlp\.0 finishes: "
            r"add a dependency with prev_layer: true")
    d = example_dict()
    _prev_layer_variant(d)
    d["dependencies"].append({"before": "mlp.1", "after": "attn_decode.0", "prev_layer": True})
    s = Schedule.from_dict(d)  # mlp.0 -> mlp.1 (stream) -> next layer's attn_decode.0, .1 (FIFO)
    assert s.dependencies[-1].prev_layer
    # the same edge within one layer would be a deadlock
    d["dependencies"][-1]["prev_layer"] = False
    with pytest.raises(ScheduleError, match="cycle"):
        Schedule.from_dict(d)


def _prefix_variant(decode_tokens: int) -> dict:
    """Prefill attention in two pieces on the memory stream: [0,128) first, [128,256) last."""
    d = example_dict()
    d["metadata"]["batch"].update(decode_tokens=decode_tokens, prefill_tokens=256 - decode_tokens)
    comp = d["streams"][0]["nano_ops"]
    d["streams"][0]["nano_ops"] = [n for n in comp if n["name"] != "attn_prefill.0"]
    mem = d["streams"][1]["nano_ops"]
    d["streams"][1]["nano_ops"] = (
        [{"name": "attn_prefill.a", "ops": ["attn_prefill"], "tokens": [0, 128], "num_sms": 32}] + mem
        + [{"name": "attn_prefill.b", "ops": ["attn_prefill"], "tokens": [128, 256], "num_sms": 32}])
    d["dependencies"].append({"before": "attn_prefill.b", "after": "mlp.1"})
    del d["prediction"]
    return d


def test_prefix_dependency_needs_only_same_class_tokens():
    # 192 decode tokens: the piece on [0,128) has no prefill tokens, so it needs no kv_append piece
    s = Schedule.from_dict(_prefix_variant(192))
    assert s.stream_of("attn_prefill.a").name == "memory"
    # 100 decode tokens: it holds prefill tokens [100,128), whose prefix needs qkv.0's kv_append
    with pytest.raises(ScheduleError, match=r"nano-op attn_prefill\.a may start before qkv\.0 finishes: "
                                            r"add a dependency \(attn_prefill on tokens \[100,128\)"):
        Schedule.from_dict(_prefix_variant(100))


# ---- placement: overlapping partitions must be ordered ------------------------------------------

def test_overlapping_partitions_example_validates_and_round_trips():
    s = load_schedule(EXAMPLE3)
    assert [(p.name, p.sm_range) for p in s.partitions] == [
        ("p_all", (0, 132)), ("p_compute_88", (0, 88)), ("p_memory_44", (88, 132))]
    assert [(st.name, st.partition) for st in s.streams] == [
        ("compute-132", "p_all"), ("compute-88", "p_compute_88"), ("memory-44", "p_memory_44")]
    text = dumps(s)
    assert "{name: p_memory_44, num_sms: 44, first_sm: 88}" in text
    assert dumps(loads(text)) == text and loads(text) == s
    _respects_graph(s, s.topo_order())
    s.check_compatible("tiny-llama", 132)
    with pytest.raises(ScheduleError, match="schedule partitions use 132 SMs, the GPU has 128"):
        s.check_compatible("tiny-llama", 128)


def test_removing_an_ordering_dependency_is_refused_with_the_pair():
    # mlp.0 -> mlp.1 orders compute-88 before compute-132; the data needs it not (listed apart)
    refused(_drop_dep("mlp.0", "mlp.1"),
            r"^dependencies: streams compute-132 and compute-88 share SMs \[0, 88\) \(partitions p_all "
            r"\[0, 132\), p_compute_88 \[0, 88\)\) but nano-ops mlp\.1 and mlp\.0 may run at the same "
            r"time: add a dependency$", EXAMPLE3)
    # the data alone (K/V of each nano-batch) leaves qkv.1 on all SMs beside attn_decode.0 on [88, 132)
    refused(_both(_drop_dep("qkv.1", "attn_decode.0"), _add_dep("qkv.0", "attn_decode.0"),
                  _add_dep("qkv.1", "attn_decode.1")),
            r"^dependencies: streams compute-132 and memory-44 share SMs \[88, 132\) .* nano-ops qkv\.1 and "
            r"attn_decode\.0 may run at the same time", EXAMPLE3)


def _all_mlp_on_88(d: dict) -> None:
    """Both MLPs on compute-88; compute-132 runs only QKV, so nothing orders the next layer's qkv.0
    after this layer's mlp.1 but a prev_layer dependency."""
    mlp1 = d["streams"][0]["nano_ops"].pop()
    d["streams"][1]["nano_ops"].append(dict(mlp1, num_sms=88))
    d["dependencies"] = [x for x in d["dependencies"] if (x["before"], x["after"]) != ("mlp.0", "mlp.1")]
    d["dependencies"].append({"before": "mlp.1", "after": "qkv.1", "prev_layer": True})
    del d["prediction"]


def test_overlap_across_layers_needs_a_prev_layer_dependency():
    refused(_all_mlp_on_88,
            r"^dependencies: streams compute-88 and compute-132 share SMs \[0, 88\) .* nano-ops mlp\.1 and "
            r"the next layer's qkv\.0 may run at the same time: add a dependency with prev_layer: true$",
            EXAMPLE3)
    d = example_dict(EXAMPLE3)
    _all_mlp_on_88(d)
    d["dependencies"].append({"before": "mlp.1", "after": "qkv.0", "prev_layer": True})
    assert Schedule.from_dict(d).stream_of("mlp.1").name == "compute-88"


def test_placement_decides_which_streams_must_be_ordered():
    # compute-88 and memory-44 run side by side on disjoint SMs; moved onto [0, 44), memory-44 would
    # share SMs with compute-88 while both run
    refused(_set(lambda d: d["partitions"][2], first_sm=0),
            r"streams compute-88 and memory-44 share SMs \[0, 44\) \(partitions p_compute_88 \[0, 88\), "
            r"p_memory_44 \[0, 44\)\) but nano-ops attn_prefill\.1 and attn_decode\.0 may run", EXAMPLE3)
    # on [80, 124) it shares [80, 88) with compute-88 just the same: any intersection counts
    refused(_set(lambda d: d["partitions"][2], first_sm=80), r"share SMs \[80, 88\) ", EXAMPLE3)


def test_first_sm_defaults_to_0():
    assert Partition(name="p", num_sms=8) == Partition(name="p", num_sms=8, first_sm=0)
    assert Partition(name="p", num_sms=8, first_sm=16).sm_range == (16, 24)
    d = example_dict()
    assert "first_sm" not in d["partitions"][0]
    s = Schedule.from_dict(d)
    assert [p.sm_range for p in s.partitions] == [(0, 96), (96, 128)]
    assert "{name: p_compute, num_sms: 96, first_sm: 0}" in dumps(s)  # written out in full
    with pytest.raises(ScheduleError, match=r"Partition\('p'\)\.first_sm: must be >= 0, got -1"):
        Partition(name="p", num_sms=8, first_sm=-1)


def _random_graph_schedule(rng: random.Random, num_streams: int, num_nano: int, num_deps: int):
    """Streams and dependencies only (what _Graph reads), acyclic within a layer: every edge goes
    forward in one random global order; prev_layer edges go anywhere."""
    from types import SimpleNamespace as NS
    names = [f"n{i}" for i in range(num_nano)]
    streams = [NS(nano_ops=[]) for _ in range(num_streams)]
    for name in names:  # stream order follows the global order
        rng.choice(streams).nano_ops.append(NS(name=name))
    streams = [st for st in streams if st.nano_ops]
    deps = []
    for _ in range(num_deps):
        a, b = sorted(rng.sample(range(num_nano), 2))
        prev = rng.random() < 0.3
        if prev and rng.random() < 0.5:
            a, b = b, a
        deps.append(NS(before=names[a], after=names[b], prev_layer=prev))
    return NS(streams=streams, dependencies=deps)


def test_reachability_closure_matches_search():
    from nfrt.schedule_validate import _Graph
    rng = random.Random()
    for _ in range(10):
        g = _Graph(_random_graph_schedule(rng, rng.randint(1, 10), rng.randint(2, 60), rng.randint(0, 80)))
        g.check_acyclic()
        for a in range(2 * g.n):
            seen, stack = set(), [a]
            while stack:
                for w in g.succ[stack.pop()]:
                    if w not in seen:
                        seen.add(w)
                        stack.append(w)
            assert {b for b in range(2 * g.n) if g.reaches(a, b)} == seen


# ---- derived schedules and accessors ------------------------------------------------------------

def test_as_sequential_is_the_baseline():
    s = example()
    q = s.as_sequential()
    assert [(p.name, p.sm_range) for p in q.partitions] == [("all", (0, 132))]
    assert [st.name for st in q.streams] == ["main"] and q.streams[0].kind == "mixed"
    assert [(nb.start, nb.end) for nb in q.nano_batches] == [(0, 256)]
    assert [n.name for n in q.streams[0].nano_ops] == [f"{op.name}.0" for op in s.layer]
    assert all(n.tokens == (0, 256) and n.num_sms == 132 for n in q.streams[0].nano_ops)
    assert q.dependencies == () and q.prediction is None
    assert q.metadata.solver.policy == "sequential"
    assert q.metadata.model_config == s.metadata.model_config and q.layer == s.layer
    assert loads(dumps(q)) == q
    q114 = s.as_sequential(num_sms=114)
    assert q114.partitions[0].num_sms == 114 and q114.metadata.num_sms == 114
    q114.check_compatible("tiny-llama", 114)
    with pytest.raises(ScheduleError, match="num_sms: must be a positive integer"):
        s.as_sequential(num_sms=0)


def test_sequential_from_scratch_with_metadata():
    batch = BatchComposition(dense_batch=64, decode_tokens=64, prefill_tokens=0, decode_context=100,
                             prefill_context=0)
    meta = Metadata(model="tiny-llama", model_config=TINY, gpu="h100", num_sms=132, tp=1, workload="64/64",
                    dense_batch=64, batch=batch, num_layers=2,
                    profile=ProfileInfo(hash="none", source="analytic"),
                    solver=SolverInfo(name="hand", policy="hand", status="n/a"), nfsearch_version="0.1.0")
    layer = (LayerOp("a", "compute"), LayerOp("b", "memory", "decode", (OpDep("a"),)),
             LayerOp("c", "other", deps=(OpDep("b"), OpDep("c", prev_layer=True))))
    s = Schedule.sequential(meta, layer)
    assert [n for _, n in s.topo_order()] == ["a.0", "b.0", "c.0"]


def test_check_compatible():
    s = example()
    s.check_compatible("tiny-llama", 132)
    with pytest.raises(ScheduleError, match="^schedule is for tiny-llama, engine runs llama3-8b$"):
        s.check_compatible("llama3-8b", 132)
    with pytest.raises(ScheduleError, match="schedule partitions use 128 SMs, the GPU has 114"):
        s.check_compatible("tiny-llama", 114)
    with pytest.raises(ScheduleError, match="schedule is for a GPU with 132 SMs, this GPU has 128"):
        s.check_compatible("tiny-llama", 128)
    with pytest.raises(ScheduleError, match=r"schema_version 1 is newer than the runtime supports \(0\)"):
        s.check_compatible("tiny-llama", 132, schema_version_supported=0)


def _respects_graph(s: Schedule, order: tuple[tuple[str, str], ...]) -> None:
    pos = {n: i for i, (_, n) in enumerate(order)}
    assert sorted(pos) == sorted(n.name for st in s.streams for n in st.nano_ops)
    for st, n in order:
        assert s.stream_of(n).name == st
    for st in s.streams:
        idx = [pos[n.name] for n in st.nano_ops]
        assert idx == sorted(idx)
    for d in s.dependencies:
        if not d.prev_layer:
            assert pos[d.before] < pos[d.after]


def test_topo_order_follows_prediction_and_respects_graph():
    s = example()
    order = s.topo_order()
    _respects_graph(s, order)
    assert [n for _, n in order] == ["qkv.0", "attn_decode.0", "qkv.1", "attn_prefill.0", "attn_decode.1",
                                     "mlp.0", "mlp.1"]
    assert order == s.topo_order()  # deterministic


def test_topo_order_with_random_predicted_starts():
    rng = random.Random()
    d = example_dict()
    for _ in range(20):
        for e in d["prediction"]["timeline"]:
            e["start_us"] = rng.uniform(0, 100)
            e["end_us"] = e["start_us"] + rng.uniform(0, 10)
        s = Schedule.from_dict(copy.deepcopy(d))
        order = s.topo_order()
        _respects_graph(s, order)
        # greedy: each pick is the ready nano-op with the earliest predicted start (then stream position)
        start = {e.nano_op: e.start_us for e in s.prediction.timeline}
        preds = {n.name: set() for st in s.streams for n in st.nano_ops}
        for st in s.streams:
            for a, b in zip(st.nano_ops, st.nano_ops[1:], strict=False):
                preds[b.name].add(a.name)
        for dep in s.dependencies:
            preds[dep.after].add(dep.before)
        done: set[str] = set()
        for _, n in order:
            ready = [m for m in preds if m not in done and preds[m] <= done]
            assert start[n] == min(start[m] for m in ready)
            done.add(n)


def test_schedule_module_imports_no_torch():
    import subprocess
    code = ("import nfrt.schedule, sys; "
            "sys.exit(1 if 'torch' in sys.modules or 'networkx' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_docs_examples_are_the_test_schedules():
    doc = (Path(__file__).parents[1] / "docs" / "schedule-format.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```yaml\n")[1:]]
    assert len(blocks) == 2
    assert loads(blocks[0], source="docs/schedule-format.md") == example()
    # the 3-stream example shows the file from `partitions:` on; the rest is the first example's
    text3 = EXAMPLE3.read_text()
    assert blocks[1] == text3[text3.index("partitions:\n"):]
    s3, s2 = load_schedule(EXAMPLE3), example()
    assert (s3.metadata, s3.layer) == (s2.metadata, s2.layer)
