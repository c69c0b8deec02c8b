"""Token sampling: greedy, or temperature + top-p with seeded, batch-independent noise.

Sampling draws with the Gumbel-max trick: token = argmax(logits / T + g), g = -log(-log(u)), over
the top-p nucleus. The uniforms u come from a counter-based hash of (request key, output step,
vocabulary index), computed on the device in int64 arithmetic. So a request's tokens depend only on
its seed, its index and its logits — never on which other requests share its batch, where in the
batch it sits, or how its prompt was chunked — and no generator state is carried between
iterations (nothing to keep in step with a CUDA graph or a pipelined loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nfrt.errors import NfrtError

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: a 32-bit value times it stays inside int64


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0: greedy (argmax, first index on ties, as transformers); else softmax(logits / T)
    restricted to the smallest set of tokens whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0 or t == float("inf"):
            raise NfrtError(f"sampling: temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise NfrtError(f"sampling: top_p must be in (0, 1], got {p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise NfrtError(f"sampling: seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mix_int(x: int) -> int:
    """Host twin of `_mix32` on one integer (keeps the low 32 bits first)."""
    x &= _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def request_key(seed: int, index: int) -> int:
    """The 32-bit noise key of request `index` under `seed` (host side, once per request)."""
    return _mix_int(_mix_int(seed) ^ _mix_int(index + 0x9E3779B9))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, elementwise on int64 tensors holding values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys, steps [s] int64 -> Gumbel(0, 1) noise [s, vocab] float32, a pure function of its inputs."""
    row = _mix32(_mix32(keys & _M32) ^ (steps & _M32))  # [s]
    col = _mix32(torch.arange(vocab, device=keys.device, dtype=torch.int64) + 0x2545F491)  # [V]
    bits = _mix32(row[:, None] ^ col[None, :]) >> 8  # [s, V], 24 random bits
    u = (bits.float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
           steps: torch.Tensor, out: torch.Tensor, greedy_only: bool = False) -> torch.Tensor:
    """logits [s, V]; temperature, top_p [s] float32; keys, steps [s] int64 -> token ids into out [s] int64.

    Rows with temperature 0 take the argmax. `greedy_only` (the host knows no row samples) skips
    the noise and the sort and writes the argmax straight into `out` (no allocation). Nothing here
    reads a device value on the host (no `.item()`, no data-dependent shape), so it never waits for
    the device and could be captured in a CUDA graph: the loop may run ahead of the device.
    """
    if greedy_only:
        return torch.argmax(logits, dim=-1, out=out)
    greedy = torch.argmax(logits, dim=-1)  # [s]
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]  # [s, V]
    probs = torch.softmax(x, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly ahead of each token
    keep_sorted = before < top_p[:, None]  # the first token is always kept
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    scores = torch.where(keep, x + gumbel_noise(keys, steps, x.shape[1]), float("-inf"))
    drawn = torch.argmax(scores, dim=-1)
    return out.copy_(torch.where(temperature > 0, drawn, greedy))
