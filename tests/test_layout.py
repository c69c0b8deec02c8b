"""nfrt.layout: where the synthetic batch's prefill tokens sit in their prompts."""

from __future__ import annotations

import random

import pytest
from nfrt.errors import NfrtError
from nfrt.layout import from_zero_chunks, position_sum, prefill_chunks


def _positions(chunks) -> list[int]:
    return [s + i for s, n in chunks for i in range(n)]


def _brute_phase(tokens: int, L: int) -> int:
    """The phase of the stream of length-L prompts whose mean position is closest to (L - 1) / 2.
    In integers (twice the position sum against tokens x (L - 1)): with floats, two phases exactly
    as close could compare unequal (683 tokens of 2-token prompts: phases 0 and 1, CI 2026-11-21)."""
    def miss(phase: int) -> int:
        return abs(2 * sum((phase + i) % L for i in range(tokens)) - tokens * (L - 1))
    return min(range(L), key=lambda p: (miss(p), p))


def test_prefill_chunks_properties_random():
    rng = random.Random()
    for _ in range(60):
        L = rng.randint(1, 400)
        tokens = rng.randint(1, 1200)
        chunks = prefill_chunks(tokens, L)
        assert sum(n for _, n in chunks) == tokens
        assert all(n >= 1 and 0 <= s and s + n <= L for s, n in chunks)  # each within one prompt
        # back to back: every chunk but the first starts a prompt, every one but the last ends one
        assert all(s == 0 for s, _ in chunks[1:]) and all(s + n == L for s, n in chunks[:-1])
        pos = _positions(chunks)
        mean = sum(pos) / tokens
        assert abs(mean - (L - 1) / 2) <= 0.5 + 1e-9, (tokens, L, chunks)
        if tokens >= L:  # the closest phase, smallest on ties
            assert chunks[0][0] == _brute_phase(tokens, L), (tokens, L)
        else:  # one chunk centred in the prompt
            assert chunks == (((L - tokens) // 2, tokens),)
        assert prefill_chunks(tokens, L) == chunks  # deterministic
        assert position_sum(chunks) == sum(p + 1 for p in pos)
        s = rng.randint(0, tokens)
        e = rng.randint(s, tokens)
        assert position_sum(chunks, s, e) == sum(p + 1 for p in pos[s:e])


def test_prefill_chunks_exact_ties_go_to_the_smallest_phase():
    # phases 0 and 1 of 683 tokens of 2-token prompts are equally close (sums 341 and 342 against
    # 341.5); so are the phases of any odd stretch of 2-token prompts
    assert _brute_phase(683, 2) == 0 and prefill_chunks(683, 2)[0][0] == 0
    for tokens in range(3, 200, 2):
        assert prefill_chunks(tokens, 2)[0][0] == _brute_phase(tokens, 2) == 0


def test_from_zero_chunks_are_whole_prompts_then_a_head():
    rng = random.Random()
    for _ in range(30):
        L, tokens = rng.randint(1, 300), rng.randint(0, 1000)
        chunks = from_zero_chunks(tokens, L)
        assert _positions(chunks) == [i % L for i in range(tokens)]


def test_splitwise_llama3_8b_region_reads_what_serving_reads():
    """1728 prefill tokens of length-biased 1540-token prompts: Σ(p + 1) as measured in real serving
    on an H200 (median 1,331,524 per iteration), against 832,041 for 1155-token prompts from 0."""
    assert position_sum(prefill_chunks(1728, 1540)) == pytest.approx(1_331_524, rel=0.02)
    assert position_sum(from_zero_chunks(1728, 1155)) == 832_041  # the old synthetic batch


@pytest.mark.parametrize("tokens,L", [(-1, 4), (3, 0), (2.5, 4), (True, 4)])
def test_bad_inputs_raise(tokens, L):
    with pytest.raises(NfrtError, match="prefill layout"):
        prefill_chunks(tokens, L)


def test_position_sum_range_checked():
    with pytest.raises(NfrtError, match="outside"):
        position_sum(((0, 4),), 2, 5)
