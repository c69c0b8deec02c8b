"""The heater the sustained table is held against: the model's own layer on a workload's batch, or
two 8192^3 GEMMs; how a profile records it and how --add-ops holds new ops against the same one."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from nfrt.schedule import load_schedule

from nfsearch.errors import NfsearchError
from nfsearch.gpus import resolve_gpu
from nfsearch.models import resolve_model
from nfsearch.opgraph import GATHER_OPS, layer_ops
from nfsearch.profile import Profile, load_profile
from nfsearch.profiler.addops import add_ops, add_ops_grid, profile_heat
from nfsearch.profiler.grid import full_grid, heat_label, heat_points, op_points, quick_grid, with_heat
from nfsearch.profiler.run import run_profile
from nfsearch.profiler.sustained import NOTE_PREFIX, add_sustained, note_heat, sustained_table
from tests.test_profiler import FakeTimer, _without

H200 = resolve_gpu("h200")


@pytest.mark.parametrize("name", ["llama3-8b-h200-tp1-splitwise", "llama3-8b-h200-tp1-const-1024-512",
                                  "mixtral-8x7b-h200-tp1-splitwise", "llama3-70b-h200-tp4-splitwise"])
def test_the_layer_heater_runs_the_batch_solve_composed(name: str) -> None:
    """The heater's batch for a workload is the one `nfsearch solve` composed for the shipped
    schedule of that workload (read from the schedule file, not recomputed the same way)."""
    sched = load_schedule(f"schedules/{name}.yaml")
    m = sched.metadata
    model = resolve_model(m.model)
    b = m.batch
    g = with_heat(full_grid(), model, m.tp, m.workload, H200)
    assert g.heat == m.workload
    assert g.heat_batch == (b.decode_tokens, b.decode_context, b.prefill_tokens, b.prefill_context)
    assert str(b.decode_tokens) in heat_label(g) and m.workload in heat_label(g)


def test_heat_points_are_the_standard_layer_without_collectives() -> None:
    g = replace(full_grid(), heat="splitwise", heat_batch=(320, 1261, 1728, 1540))
    for name, tp in (("llama3-8b", 1), ("mixtral-8x7b", 2), ("llama3-70b", 4)):
        model = resolve_model(name)
        pts = heat_points(model, tp, g)
        ops = layer_ops(model, tp)
        assert [p[0] for p in pts] == [o.name for o in ops if o.kind != "network"]
        got = {op: (t, c) for op, t, c in pts}
        assert got.pop("attn_decode") == (320, 1261) and got.pop("attn_prefill") == (1728, 1540)
        assert set(got.values()) == {(2048, 0)}  # every other op on all the batch's tokens
        assert not {"attn_allgather", "o_proj_col", "o_allgather"} & set(got)  # the standard form
    # a batch without decode tokens: no decode attention launch
    none = replace(g, heat_batch=(0, 0, 2048, 1540))
    assert "attn_decode" not in [p[0] for p in heat_points(resolve_model("llama3-8b"), 1, none)]
    assert heat_points(resolve_model("llama3-8b"), 1, full_grid()) == []  # the GEMM heater


def test_heat_choices_and_bad_input() -> None:
    model = resolve_model("llama3-8b")
    g = with_heat(full_grid(), model, 1, "splitwise", H200)
    assert with_heat(g, model, 1, "gemm", H200) == full_grid()
    assert heat_label(full_grid()) == heat_label(None) == "two bf16 8192^3 GEMMs on all SMs"
    with pytest.raises(NfsearchError, match="unknown workload 'nope'; valid forms: .*splitwise"):
        with_heat(full_grid(), model, 1, "nope", H200)
    with pytest.raises(NfsearchError, match="needs a built-in GPU.*--heat gemm"):
        with_heat(full_grid(), model, 1, "splitwise", None)
    base = full_grid()
    with pytest.raises(NfsearchError, match="heat_batch .* given without a heat workload"):
        replace(base, heat_batch=(1, 2, 3, 4))
    with pytest.raises(NfsearchError, match="needs heat_batch"):
        replace(base, heat="splitwise", heat_batch=(1, 2, 3))
    with pytest.raises(NfsearchError, match="positive context"):
        replace(base, heat="splitwise", heat_batch=(64, 0, 64, 128))
    with pytest.raises(NfsearchError, match="exceeds the grid's largest batch"):
        replace(base, heat="splitwise", heat_batch=(4096, 128, 64, 128))


def test_the_note_names_the_heater_and_reads_back() -> None:
    rows = {"132": [["gate_up", 1024, 0, 300.0, 350.0]], "64": [["gate_up", 1024, 0, 500.0, 495.0]]}
    g = with_heat(full_grid(), resolve_model("llama3-8b"), 1, "const:1024:512", H200)
    _, note = sustained_table(rows, heat=heat_label(g))
    assert note.startswith(NOTE_PREFIX) and note_heat(f"other | {note} | more") == heat_label(g)
    # a table noted before the heater was: the GEMM heater, the only one there was
    _, old = sustained_table(rows)
    assert note_heat(old) == note_heat("") == heat_label(None)


def _profile(tmp_path, heat: str, seed: int) -> tuple[Profile, object]:
    """A fake-timed tiny-llama TP 2 profile held against `heat`, without the gather ops."""
    model = resolve_model("tiny-llama")
    grid = with_heat(quick_grid(132, 8, 8, 120), model, 2, heat, H200)
    prof = run_profile(model, 2, grid, FakeTimer(seed), tmp_path / f"{heat}.json", gpu_slug="h200",
                       sm_granularity=8, nvlink_gbps=900.0)
    return _without(prof, GATHER_OPS), model


@pytest.mark.parametrize("heat", ["gemm", "splitwise", "const:1024:512"])
def test_add_ops_holds_new_ops_against_the_profiles_own_heater(tmp_path, heat: str) -> None:
    seed = random.randrange(1 << 30)
    prof, model = _profile(tmp_path, heat, seed)
    assert heat_label(with_heat(quick_grid(), model, 2, heat, H200)) in prof.meta.notes
    base = quick_grid(132, 8, 8, 120)
    if heat == "const:1024:512":  # neither gemm nor the default: it must be named
        with pytest.raises(NfsearchError, match="held against the model's layer .*pass --heat"):
            profile_heat(prof, model, 2, base, H200, None, "splitwise")
        with pytest.raises(NfsearchError, match="no heater here matches"):
            profile_heat(prof, model, 2, base, H200, "splitwise", "splitwise")
    g = profile_heat(prof, model, 2, base, H200, heat if heat != "gemm" else None, "splitwise")
    assert heat_label(g) == note_heat(prof.meta.notes)
    grid = add_ops_grid(prof, model, 2, g)
    new = add_ops(prof, model, 2, grid, FakeTimer(seed), tmp_path / "new.json")
    assert "o_proj_col" in set(new.sustained["op"]) and load_profile(tmp_path / "new.json") == new
    other = "gemm" if heat != "gemm" else "splitwise"
    wrong = add_ops_grid(prof, model, 2, with_heat(base, model, 2, other, H200))
    with pytest.raises(NfsearchError, match="held against .* this grid's heater is"):
        add_ops(prof, model, 2, wrong, FakeTimer(seed), tmp_path / "x.json")
    # a profile without a sustained table: any heater, the grid as given
    bare = Profile(prof.meta, prof.latency, prof.interference)
    assert profile_heat(bare, model, 2, base, H200, None, "splitwise") is base


def test_add_sustained_notes_the_grids_heater(tmp_path) -> None:
    model = resolve_model("tiny-llama")
    prof = run_profile(model, 1, quick_grid(), FakeTimer(1), tmp_path / "p.json", gpu_slug="h200",
                       sm_granularity=8, nvlink_gbps=0.0)
    assert note_heat(prof.meta.notes) == heat_label(None)
    g = with_heat(quick_grid(), model, 1, "splitwise", H200)
    new = add_sustained(prof, model, 1, g, FakeTimer(1), tmp_path / "q.json", 132)
    assert note_heat(new.meta.notes) == heat_label(g) and new.meta.notes.count(NOTE_PREFIX) == 1


@pytest.mark.parametrize("quick", [False, True])
def test_grids_fit_the_models_positions(quick: bool) -> None:
    """No profile point reads past the model's rope table: for tiny-llama (512 positions) every
    context of the fitted grid, its co-run and sustained prompts and its layer heater's batch stay
    within 512; for the built-in models (4096 and up) fitting changes nothing."""
    from nfsearch.profiler.grid import fit_to_model, sustained_points

    base = (quick_grid if quick else full_grid)(132, 8, 8, 120)
    tiny = resolve_model("tiny-llama")
    assert tiny.max_position == 512 and max(base.decode_contexts) > 512  # the case being fixed
    g = with_heat(fit_to_model(base, tiny), tiny, 1, "splitwise", H200)
    points = op_points(tiny, 1, g) + sustained_points(tiny, 1, g) + heat_points(tiny, 1, g)
    contexts = [c for _, _, c in points]
    contexts += [g.interference_decode[1], g.interference_tokens]  # co-run decode context, prompt length
    assert max(contexts) <= 512 and 512 in contexts
    assert g.decode_contexts == (*(c for c in base.decode_contexts if c < 512), 512)
    assert set(contexts) <= {0, *g.decode_contexts, *g.prefill_contexts}  # points on the grid
    assert g.heat_batch[1] == g.heat_batch[3] == 512  # splitwise's 1261 / 1540 capped
    assert g.sustained_tokens and g.tokens == base.tokens  # token counts other than prompts unchanged
    for name in ("llama3-8b", "mixtral-8x7b", "llama3-70b", "llama2-70b"):
        assert fit_to_model(base, resolve_model(name)) == base
    # a model shorter than every grid context keeps one context: its own length
    short = replace(tiny, max_position=16)
    assert fit_to_model(base, short).decode_contexts == fit_to_model(base, short).prefill_contexts == (16,)
