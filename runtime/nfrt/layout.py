"""Where the prefill tokens of a synthetic batch sit in their prompts (torch-free).

Chunked prefill in real serving takes a stretch of the stream of queued prompts at an arbitrary
phase, so a prefill token belongs to a prompt with probability proportional to its length, and
its mean position over a random phase is (L - 1) / 2 for prompts of length L. A synthetic batch
that stands for serving (`nfrt.batch.make_batch`, `nfrt.llm.LLM.time_iteration`, the search's
`nfsearch.plan.prefill_work`) lays its prefill region out with `prefill_chunks`: prompts of
`prompt_len` back to back, cut at the phase whose mean position is closest to that expectation.
The profiler's reference layout (`from_zero_chunks`) starts at position 0 instead.
"""

from __future__ import annotations

from nfrt.errors import NfrtError

Chunks = tuple[tuple[int, int], ...]  # (start position in its prompt, length), in batch order


def _check(tokens: int, prompt_len: int) -> None:
    for name, v, least in (("tokens", tokens, 0), ("prompt_len", prompt_len, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise NfrtError(f"prefill layout: {name} must be an integer >= {least}, got {v!r}")


def _stream(phase: int, tokens: int, prompt_len: int) -> Chunks:
    """Chunks of stream tokens [phase, phase + tokens) of back-to-back prompts of `prompt_len`."""
    out, pos, left = [], phase, tokens
    while left > 0:
        n = min(left, prompt_len - pos)
        out.append((pos, n))
        left -= n
        pos = 0
    return tuple(out)


def from_zero_chunks(tokens: int, prompt_len: int) -> Chunks:
    """The profiler's attn_prefill layout: whole prompts from position 0, the last one partial."""
    _check(tokens, prompt_len)
    return _stream(0, tokens, prompt_len)


def _stream_position_sum(x: int, prompt_len: int) -> int:
    """Sum of the positions of stream tokens [0, x)."""
    q, r = divmod(x, prompt_len)
    return q * prompt_len * (prompt_len - 1) // 2 + r * (r - 1) // 2


def prefill_chunks(tokens: int, prompt_len: int) -> Chunks:
    """(start, length) of each chunk of a stretch of `tokens` prefill tokens of back-to-back prompts
    of `prompt_len`, at the phase (first token's position) whose mean position is closest to the
    random-phase expectation (prompt_len - 1) / 2; ties go to the smallest phase.

    Mean position over all phases is exactly that expectation and moves by under one position per
    phase step when tokens >= prompt_len, so the chosen mean is within 1/2 of it. A stretch shorter
    than a prompt is the one chunk centred in the prompt (also within 1/2; a phase wrapping into
    the next prompt could be closer by less than that, at the cost of a second sequence)."""
    _check(tokens, prompt_len)
    if tokens == 0:
        return ()
    L = prompt_len
    if tokens <= L:
        return (((L - tokens) // 2, tokens),)
    want = tokens * (L - 1)  # 2 * (sum of positions) at the expected mean

    def miss(phase: int) -> int:
        s = _stream_position_sum(phase + tokens, L) - _stream_position_sum(phase, L)
        return abs(2 * s - want)

    best = min(range(L), key=lambda p: (miss(p), p))
    return _stream(best, tokens, L)


def position_sum(chunks: Chunks, start: int = 0, end: int | None = None) -> int:
    """Causal attention work of prefill tokens [start, end) of the region (all by default):
    the sum of (p + 1) over their prompt positions p (position p attends to p + 1 keys)."""
    total = sum(n for _, n in chunks)
    end = total if end is None else end
    if not 0 <= start <= end <= total:
        raise NfrtError(f"prefill layout: token range [{start}, {end}) outside [0, {total}]")
    out, base = 0, 0
    for s, n in chunks:
        lo, hi = max(start, base), min(end, base + n)
        if lo < hi:  # positions s + (lo - base) .. s + (hi - base) - 1, each reads one key more
            a, b = s + lo - base + 1, s + hi - base
            out += (a + b) * (b - a + 1) // 2
        base += n
    return out
