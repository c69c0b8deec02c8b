"""Shared fixtures: tiny model configs and tiny Hugging Face checkpoint folders."""

from __future__ import annotations

import pytest
from nfrt.config import ModelConfig

_FALLBACK = {
    "tiny-llama": ModelConfig(name="tiny-llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, intermediate_size=128, max_position=512),
    "tiny-mixtral": ModelConfig(name="tiny-mixtral", vocab_size=256, hidden_size=64, num_layers=2,
                                num_heads=4,
                                num_kv_heads=2, head_dim=16, intermediate_size=96, num_experts=4, top_k=2,
                                max_position=512),
}


def close(ours, ref, rel: float = 1e-4) -> None:
    """Same shape, finite, and max abs error within `rel` of the reference's magnitude (torch tensors)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.isfinite().all()
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * scale, f"max error {err} vs scale {scale}"


def tp2_matches_one_process(path, tmp_path):
    """Run the TP-2 schedule at `path` in two gloo processes (tests/tp_worker.py, each with its
    shard) with fresh weight and batch seeds, and check that its nano-batched run and its
    sequential twin give the logits one process gives with the whole weights
    (`nfrt.tp.single_gpu_reference`). Returns the loaded schedule."""
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from nfrt.engine import Engine
    from nfrt.schedule import load_schedule
    from nfrt.tp import single_gpu_reference
    from nfrt.weights import random_weights

    seed, batch_seed = random.randrange(10_000), random.randrange(10_000)
    out = tmp_path / "logits.pt"
    worker = Path(__file__).resolve().parent / "tp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
           "--schedule", str(path), "--out", str(out), "--seed", str(seed), "--batch-seed", str(batch_seed)]
    run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    schedule = load_schedule(path)
    config = schedule.metadata.model_config
    ref_engine = Engine.from_schedule(single_gpu_reference(schedule), device="cpu",
                                      weights=random_weights(config, seed=seed))
    ref = ref_engine.run(ref_engine.synthetic_batch(seed=batch_seed))
    assert got["nano"].shape == ref.shape == (ref.shape[0], config.vocab_size)
    close(got["nano"], ref)
    close(got["sequential"], ref)
    return schedule


def has_cuda_bindings() -> bool:
    """Whether NVIDIA's cuda-bindings (green contexts) import."""
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_config(name: str) -> ModelConfig:
    """The tiny model `name` from nfsearch.models when it defines it, else the fallback shapes."""
    try:
        from nfsearch.models import resolve_model

        return resolve_model(name)
    except Exception:  # registry missing or without tiny models: use the shapes in the brief
        return _FALLBACK[name]


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, ModelConfig]:
    return {name: tiny_config(name) for name in _FALLBACK}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(name, seed=0)` -> a saved HF folder named `name` with random weights (cached)."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from nfrt.weights import random_weights, save_hf_checkpoint

    made: dict[tuple[str, int], object] = {}

    def make(name: str, seed: int = 0):
        if (name, seed) not in made:
            config = tiny_config(name)
            folder = tmp_path_factory.mktemp(f"ckpt{seed}") / name
            save_hf_checkpoint(config, random_weights(config, seed=seed), folder)
            made[(name, seed)] = folder
        return made[(name, seed)]

    return make
