"""`nfsearch solve --gather-form`: the search may run a prefix of the nano-batches in the all-gather
form of the attention output (docs/tensor-parallel.md, "The all-gather form"; [S1.form])."""

from __future__ import annotations

import pytest

pytest.importorskip("ortools")  # the GPU image has no OR-Tools; the solver runs on the CPU
from nfrt.schedule import dumps, loads

from nfsearch.config import SolveConfig
from nfsearch.errors import NfsearchError
from nfsearch.models import resolve_model
from nfsearch.opgraph import GATHER_OPS
from nfsearch.plan import default_output, plan
from nfsearch.profile import Profile, load_profile, save_profile, shipped_profile_path

TINY = dict(model="tiny-llama", gpu="h200", tp=2, dense_batch=192, workload="const:64:32", time_limit_s=5)


def _dearer(monkeypatch, ops: tuple[str, ...], factor: float) -> None:
    """Every profile charges `ops` `factor` times their latency (steers the search's choice)."""
    real = Profile.latency_us

    def latency_us(self, op, *args, **kwargs):
        v = real(self, op, *args, **kwargs)
        return v * factor if op in ops else v

    monkeypatch.setattr(Profile, "latency_us", latency_us)


def test_gather_form_needs_tensor_parallelism():
    with pytest.raises(NfsearchError, match="--gather-form needs tensor parallelism"):
        SolveConfig(model="llama3-8b", tp=1, gather_form=True)


def test_a_profile_without_the_gather_ops_is_refused_with_the_fix(tmp_path):
    # the shipped llama3-70b TP 4 profile as it was before --add-ops gave it the gather ops
    full = load_profile(shipped_profile_path("h200", "llama3-70b", 4))
    lat, sus = full.latency, full.sustained
    old = Profile(full.meta, lat[~lat["op"].isin(GATHER_OPS)], full.interference,
                  sus[~sus["op"].isin(GATHER_OPS)])
    path = save_profile(old, tmp_path / "llama3-70b-tp4.json")
    with pytest.raises(NfsearchError, match=r"no attn_allgather, o_proj_col, o_allgather.*--add-ops"):
        plan(SolveConfig(model="llama3-70b", profile=str(path), tp=4, gather_form=True))


def test_gather_form_schedule_when_the_reduce_form_is_dear(monkeypatch):
    _dearer(monkeypatch, ("o_proj", "attn_allreduce"), 20.0)
    r = plan(SolveConfig(**TINY, gather_form=True))
    s = r.schedule
    meta = s.metadata
    assert r.solution.gather_granules > 0
    assert meta.gather_tokens == r.solution.gather_granules * 64
    assert meta.gather_tokens in {nb.start for nb in s.nano_batches} | {meta.dense_batch}
    cls = {op.name: op.token_class for op in s.layer}
    assert all(cls[op] == "gather" for op in GATHER_OPS)
    assert cls["o_proj"] == cls["attn_allreduce"] == "reduce"
    ran = {op for st in s.streams for n in st.nano_ops for op in n.ops}
    assert set(GATHER_OPS) <= ran
    for st in s.streams:  # every gather-form nano-op runs on tokens below the boundary only
        for n in st.nano_ops:
            if set(n.ops) & set(GATHER_OPS):
                assert n.tokens[1] <= meta.gather_tokens
            if "o_proj" in n.ops or "attn_allreduce" in n.ops:
                assert n.tokens[0] >= meta.gather_tokens
    text = dumps(s)  # the YAML round trip keeps the boundary
    assert f"gather_tokens: {meta.gather_tokens}" in text
    assert loads(text).metadata.gather_tokens == meta.gather_tokens and dumps(loads(text)) == text
    seq = s.as_sequential()  # the baseline is the standard all-reduce layer
    assert seq.metadata.gather_tokens == 0
    assert not {op.name for op in seq.layer} & set(GATHER_OPS)
    out = default_output(SolveConfig(**TINY, gather_form=True), resolve_model("tiny-llama"), r.gpu)
    assert out.name == "tiny-llama-h200-tp2-const-64-32-gather.yaml"


def test_gather_form_left_out_when_it_is_dear(monkeypatch):
    _dearer(monkeypatch, GATHER_OPS, 20.0)
    r = plan(SolveConfig(**TINY, gather_form=True))
    assert r.solution.gather_granules == 0 and r.schedule.metadata.gather_tokens == 0
    assert not {op.name for op in r.schedule.layer} & set(GATHER_OPS)  # the standard layer
    assert "gather_tokens" not in dumps(r.schedule)
    # the search also ran on the standard layer alone and kept it: the schedule without the flag
    plain = plan(SolveConfig(**TINY)).schedule
    assert r.schedule.streams == plain.streams and r.schedule.nano_batches == plain.nano_batches
    assert r.schedule.prediction.period_us == plain.prediction.period_us


def test_searched_gather_schedule_runs_tp2_like_one_process(monkeypatch, tmp_path):
    """The searched gather-form schedule, run by two gloo processes (each with its shard), gives the
    logits one process gives with the whole weights (fresh weight and batch seeds)."""
    pytest.importorskip("torch")
    from conftest import tp2_matches_one_process
    from nfrt.schedule import save_schedule

    _dearer(monkeypatch, ("o_proj", "attn_allreduce"), 20.0)
    s = plan(SolveConfig(**TINY, gather_form=True)).schedule
    assert 0 < s.metadata.gather_tokens
    tp2_matches_one_process(save_schedule(s, tmp_path / "searched-gather.yaml"), tmp_path)
