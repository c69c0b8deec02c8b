"""Workloads (mean prompt and output lengths) and the steady-state batch they imply.

See docs/workload.md for the derivation of `compose_batch`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from nfrt.config import BatchComposition, ModelConfig

from nfsearch.errors import NfsearchError
from nfsearch.gpus import GpuSpec
from nfsearch.models import check_tp, weight_bytes_per_gpu

DEFAULT_WORKLOAD = "splitwise"
DEFAULT_DENSE_BATCH = 2048  # tokens per iteration; NanoFlow's dense batch for 70B models on 8 GPUs
DEFAULT_ACTIVATION_RESERVE_FRAC = 0.10  # device memory kept for activations, workspace, CUDA graphs
BYTES_PER_PARAM = 2  # bf16 weights and KV cache


LENGTHS = ("uniform", "const")


@dataclass(frozen=True)
class Workload:
    """Mean prompt and output lengths, and how prompt lengths spread around their mean.

    `lengths`: "uniform": prompt lengths uniform integers on [1, 2I - 1] (mean I; the assumption for
    the public traces, as `nfsearch.bench_e2e.synthetic_lengths` draws them); "const": every prompt
    is exactly I tokens. It sets the length-biased prompt length (`prefill_prompt_len`)."""

    name: str
    input_len: int  # mean prompt tokens per request
    output_len: int  # mean generated tokens per request
    lengths: Literal["uniform", "const"] = "uniform"

    def __post_init__(self) -> None:
        for f in ("input_len", "output_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise NfsearchError(f"workload {self.name!r}: {f} must be an integer >= 1, got {v!r}")
        if self.lengths not in LENGTHS:
            raise NfsearchError(f"workload {self.name!r}: lengths must be one of {', '.join(LENGTHS)}, "
                                f"got {self.lengths!r}")

    @property
    def prefill_prompt_len(self) -> int:
        """Length-biased prompt length L_eff = E[L^2] / E[L]: a prefill token belongs to a prompt
        with probability proportional to its length (docs/workload.md). Uniform on [1, 2I - 1]:
        round((4I - 1) / 3); const: I."""
        if self.lengths == "const":
            return self.input_len
        return 4 * self.input_len // 3  # = round((4I - 1) / 3): floor((x + 1) / 3) rounds x / 3

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input_len": self.input_len, "output_len": self.output_len,
                "lengths": self.lengths}


# Mean input/output lengths of the public traces, as NanoFlow (Table 3) uses them.
_TRACES = {
    "splitwise": Workload("splitwise", 1155, 211),
    "lmsys": Workload("lmsys", 92, 207),
    "sharegpt": Workload("sharegpt", 299, 324),
}
_CONST = re.compile(r"const:(\d+):(\d+)")


def builtin_workloads() -> tuple[Workload, ...]:
    return tuple(_TRACES.values())


def parse_workload(s: str | Workload) -> Workload:
    """"splitwise", "lmsys", "sharegpt" or "const:IN:OUT"; a Workload passes through."""
    if isinstance(s, Workload):
        return s
    if s in _TRACES:
        return _TRACES[s]
    m = _CONST.fullmatch(s.strip())
    if m:
        return Workload(f"const:{int(m[1])}:{int(m[2])}", int(m[1]), int(m[2]), "const")
    raise NfsearchError(f"unknown workload {s!r}; valid forms: {', '.join(_TRACES)}, const:IN:OUT "
                        "(mean input and output tokens, integers >= 1)")


@dataclass(frozen=True)
class Composition:
    """The steady-state batch of a workload on one GPU, and the memory budget behind it."""

    batch: BatchComposition
    concurrency: int  # running decode requests (one decode token each per iteration)
    kv_capacity_tokens: int  # tokens of KV cache that fit on one GPU (all layers)
    kv_bytes_per_token: int  # per GPU, all layers, K and V
    weight_bytes_per_gpu: int
    kv_limited: bool  # the KV cache, not the dense batch, capped the decode requests
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch.to_dict(), "concurrency": self.concurrency,
                "kv_capacity_tokens": self.kv_capacity_tokens, "kv_bytes_per_token": self.kv_bytes_per_token,
                "weight_bytes_per_gpu": self.weight_bytes_per_gpu, "kv_limited": self.kv_limited,
                "note": self.note}


def kv_bytes_per_token(model: ModelConfig, tp: int = 1) -> int:
    """KV-cache bytes one token occupies on one GPU: K and V, every layer, this GPU's KV heads."""
    check_tp(model, tp)
    return 2 * model.num_layers * (model.num_kv_heads // tp) * model.head_dim * BYTES_PER_PARAM


def _round_multiple(x: float, g: int) -> int:
    return int(math.floor(x / g + 0.5)) * g


def compose_batch(model: ModelConfig, workload: Workload, gpu: GpuSpec, tp: int = 1,
                  dense_batch: int = DEFAULT_DENSE_BATCH,
                  activation_reserve_frac: float = DEFAULT_ACTIVATION_RESERVE_FRAC,
                  round_to: int = 1) -> Composition:
    """Steady-state decode/prefill mix of `dense_batch` tokens per iteration (docs/workload.md).

    `round_to`: the search's token granule; decode tokens (and a KV-limited dense batch) are
    rounded to multiples of it, and `dense_batch` must be one.
    """
    if not isinstance(dense_batch, int) or isinstance(dense_batch, bool) or dense_batch <= 0:
        raise NfsearchError(f"dense_batch must be a positive integer, got {dense_batch!r}")
    if not isinstance(round_to, int) or round_to <= 0 or dense_batch % round_to:
        raise NfsearchError(f"round_to {round_to!r} must be a positive divisor of "
                            f"dense_batch {dense_batch}")
    if not 0.0 <= activation_reserve_frac < 1.0:
        raise NfsearchError(f"activation_reserve_frac must be in [0, 1), got {activation_reserve_frac!r}")
    check_tp(model, tp)
    g = round_to
    n_in, n_out = workload.input_len, workload.output_len

    weights = weight_bytes_per_gpu(model, tp, BYTES_PER_PARAM)
    usable = gpu.memory_bytes * (1.0 - activation_reserve_frac)
    if weights >= usable:
        raise NfsearchError(f"model {model.name!r} needs {weights / 2**30:.1f} GiB of bf16 weights per GPU "
                            f"at tp {tp}, more than the {usable / 2**30:.1f} GiB usable on {gpu.name}; "
                            f"raise --tp")
    kv_token = kv_bytes_per_token(model, tp)
    capacity = int((usable - weights) // kv_token)

    # Each request brings n_in prefill tokens and n_out decode tokens, so in steady state the
    # decode share of all processed tokens is n_out / (n_in + n_out).
    decode = _round_multiple(dense_batch * n_out / (n_in + n_out), g)
    decode_context = int(math.floor(n_in + n_out / 2 + 0.5))  # a request is halfway through decoding
    kv_limited = decode * decode_context > capacity
    if kv_limited:
        cap = (capacity // decode_context) // g * g
        if cap == 0:
            raise NfsearchError(f"the KV cache of {capacity} tokens per GPU cannot hold {g} request(s) of "
                                f"mean context {decode_context} for {model.name!r} on {gpu.name} at tp {tp}")
        wanted = decode
        decode = cap
        # Keep the decode/prefill ratio: fewer decode requests also admit fewer new prompts.
        dense_batch = max(decode, _round_multiple(decode * (n_in + n_out) / n_out, g))
        note = (f"KV-limited: {capacity} tokens of KV cache hold {decode} decode requests of mean context "
                f"{decode_context} (wanted {wanted}); dense batch scaled down to {dense_batch} tokens")
    prefill = dense_batch - decode
    if not kv_limited:
        note = (f"{decode} decode requests at mean context {decode_context} and {prefill} prefill tokens "
                f"of {n_in}-token prompts (length-biased {workload.prefill_prompt_len}); KV cache "
                f"{decode * decode_context}/{capacity} tokens in use")
    batch = BatchComposition(dense_batch=dense_batch, decode_tokens=decode, prefill_tokens=prefill,
                             decode_context=decode_context if decode else 0,
                             prefill_context=workload.prefill_prompt_len)
    return Composition(batch=batch, concurrency=decode, kv_capacity_tokens=capacity,
                       kv_bytes_per_token=kv_token, weight_bytes_per_gpu=weights, kv_limited=kv_limited,
                       note=note)


def smallest_tp(model: ModelConfig, workload: Workload, gpu: GpuSpec, dense_batch: int = DEFAULT_DENSE_BATCH,
                round_to: int = 1, candidates: tuple[int, ...] = (1, 2, 4, 8)) -> int:
    """The least tensor-parallel degree whose weights and KV cache fit (`compose_batch` succeeds)."""
    why = ""
    for tp in candidates:
        try:
            compose_batch(model, workload, gpu, tp=tp, dense_batch=dense_batch, round_to=round_to)
            return tp
        except NfsearchError as e:
            why = str(e)
    raise NfsearchError(f"{model.name} does not fit on {max(candidates)} x {gpu.name}: {why}")
