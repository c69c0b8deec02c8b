"""Run a GPU command across the N GPUs of one host: `nfsearch profile|bench --tp N` re-executes
itself under `torch.distributed.run` (torchrun), one process per GPU, with NVLink multicast off.

Imports no torch at module import time (the CLI builds its parser without it).
"""

from __future__ import annotations

import os
import subprocess
import sys

from nfrt.config import NO_MULTICAST_ENV

from nfsearch.errors import NfsearchError


def in_world() -> bool:
    """True inside a process that torchrun started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_leader() -> bool:
    """Rank 0 (or no distributed launch): the process that prints and writes files."""
    return rank() == 0


def torchrun_argv(tp: int, argv: list[str]) -> list[str]:
    """The command that runs `python -m nfsearch <argv>` as `tp` processes on this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
            "-m", "nfsearch", *argv]


def relaunch(tp: int, argv: list[str] | None = None) -> int | None:
    """Under tp > 1 and outside torchrun: run this command as tp processes and return their exit
    code (the caller exits with it). Inside torchrun or at tp 1: None (carry on in this process)."""
    if tp <= 1:
        return None
    if in_world():
        size = int(os.environ["WORLD_SIZE"])
        if size != tp:
            raise NfsearchError(f"--tp {tp}, but torchrun started {size} processes")
        os.environ.update(NO_MULTICAST_ENV)
        return None
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < tp:
        raise NfsearchError(f"--tp {tp} needs {tp} CUDA GPUs on this host; {have} visible")
    env = dict(os.environ, **NO_MULTICAST_ENV)
    env.setdefault("OMP_NUM_THREADS", "4")
    argv = sys.argv[1:] if argv is None else argv
    return subprocess.call(torchrun_argv(tp, argv), env=env)
