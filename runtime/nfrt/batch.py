"""One dense batch (decode requests first, then prefill chunks) and its static device buffers.

`BatchBuffers` holds every per-batch input the forward reads, allocated once for a `BatchShape`;
`prepare(batch, allocator)` refreshes them in place, so a CUDA graph captured over them replays
on any new batch of the same shape.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch

from nfrt.config import BatchComposition
from nfrt.errors import NfrtError
from nfrt.kvcache import PAGE_SIZE, PageAllocator, slot_of
from nfrt.layout import from_zero_chunks, prefill_chunks


@dataclass(frozen=True)
class DecodeRequest:
    seq_id: int
    context_len: int  # KV length including the new token; the new token sits at context_len - 1

    def __post_init__(self) -> None:
        if self.context_len < 1:
            raise NfrtError(f"decode request {self.seq_id}: context_len must be >= 1, got {self.context_len}")


@dataclass(frozen=True)
class PrefillChunk:
    seq_id: int
    start: int  # position of the chunk's first token in its prompt
    length: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 1:
            raise NfrtError(f"prefill chunk {self.seq_id}: start {self.start} must be >= 0 and length "
                            f"{self.length} >= 1")


@dataclass(frozen=True)
class Batch:
    """Tokens [0, len(decodes)) are decode tokens, one per request; then each chunk's tokens in order.

    `sample_positions`: dense-batch token indices whose logits `tail()` returns; default: every
    decode token and the last token of every prefill chunk.
    """

    decodes: tuple[DecodeRequest, ...]
    prefills: tuple[PrefillChunk, ...]
    input_ids: tuple[int, ...]
    sample_positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "decodes", tuple(self.decodes))
        object.__setattr__(self, "prefills", tuple(self.prefills))
        object.__setattr__(self, "input_ids", tuple(int(i) for i in self.input_ids))
        if len(self.input_ids) != self.num_tokens:
            raise NfrtError(f"batch: {len(self.input_ids)} input_ids for {self.num_tokens} tokens")
        seqs = [d.seq_id for d in self.decodes] + [p.seq_id for p in self.prefills]
        if len(set(seqs)) != len(seqs):
            raise NfrtError("batch: a sequence appears twice (seq ids must be unique in one batch)")
        if self.sample_positions is None:
            ends, pos = [], self.num_decode
            for p in self.prefills:
                pos += p.length
                ends.append(pos - 1)
            object.__setattr__(self, "sample_positions", tuple(range(self.num_decode)) + tuple(ends))
        else:
            object.__setattr__(self, "sample_positions", tuple(int(i) for i in self.sample_positions))
        bad = [i for i in self.sample_positions if not 0 <= i < self.num_tokens]
        if bad:
            raise NfrtError(f"batch: sample position {bad[0]} outside [0, {self.num_tokens})")

    @property
    def num_decode(self) -> int:
        return len(self.decodes)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(p.length for p in self.prefills)

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill_tokens

    def seq_lengths(self) -> dict[int, int]:
        """KV positions each sequence must hold after this batch."""
        out = {d.seq_id: d.context_len for d in self.decodes}
        out.update({p.seq_id: p.start + p.length for p in self.prefills})
        return out


@dataclass(frozen=True)
class BatchShape:
    """What the static buffers are sized for; batches of one shape share one CUDA graph."""

    num_tokens: int
    num_decode: int
    num_prefill_reqs: int
    num_samples: int
    decode_pages: int  # page-table width for decode requests
    prefill_pages: int  # page-table width for prefill requests

    @classmethod
    def of(cls, batch: Batch, page_size: int = PAGE_SIZE, headroom_pages: int = 0) -> BatchShape:
        dp = max((math.ceil(d.context_len / page_size) for d in batch.decodes), default=0)
        pp = max((math.ceil((p.start + p.length) / page_size) for p in batch.prefills), default=0)
        return cls(batch.num_tokens, batch.num_decode, len(batch.prefills), len(batch.sample_positions),
                   max(1, dp + headroom_pages), max(1, pp + headroom_pages))


class BatchBuffers:
    """Static device tensors of one dense batch (see the module docstring)."""

    def __init__(self, shape: BatchShape, device: torch.device | str) -> None:
        s = shape
        self.shape = s
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(s.num_tokens, **i64)
        self.positions = torch.zeros(s.num_tokens, **i64)
        self.slot_mapping = torch.zeros(s.num_tokens, **i64)
        self.decode_page_table = torch.zeros(s.num_decode, s.decode_pages, **i32)
        self.context_lens = torch.ones(s.num_decode, **i32)
        self.prefill_page_table = torch.zeros(s.num_prefill_reqs, s.prefill_pages, **i32)
        self.token_req = torch.zeros(s.num_tokens - s.num_decode, **i32)
        self.token_pos = torch.zeros(s.num_tokens - s.num_decode, **i32)
        self.sample_positions = torch.zeros(s.num_samples, **i64)

    @property
    def num_tokens(self) -> int:
        return self.shape.num_tokens

    @property
    def num_decode(self) -> int:
        return self.shape.num_decode

    def fits(self, batch: Batch, page_size: int = PAGE_SIZE) -> bool:
        need = BatchShape.of(batch, page_size)
        s = self.shape
        return (need.num_tokens, need.num_decode, need.num_prefill_reqs, need.num_samples) == (
            s.num_tokens, s.num_decode, s.num_prefill_reqs, s.num_samples) and (
            need.decode_pages <= s.decode_pages or not s.num_decode) and (
            need.prefill_pages <= s.prefill_pages or not s.num_prefill_reqs)

    def prepare(self, batch: Batch, allocator: PageAllocator) -> None:
        """Allocate the batch's KV pages and copy its inputs into the buffers, in place."""
        ps = allocator.page_size
        if not self.fits(batch, ps):
            raise NfrtError(f"batch of shape {BatchShape.of(batch, ps)} does not fit buffers of shape "
                             f"{self.shape}")
        for seq, length in batch.seq_lengths().items():
            allocator.ensure(seq, length)
        s = self.shape
        positions, slots = [], []
        dpt = [[0] * s.decode_pages for _ in range(s.num_decode)]
        for r, d in enumerate(batch.decodes):
            pages = allocator.pages(d.seq_id)
            dpt[r][: len(pages)] = pages
            positions.append(d.context_len - 1)
            slots.append(allocator.slot(d.seq_id, d.context_len - 1))
        ppt = [[0] * s.prefill_pages for _ in range(s.num_prefill_reqs)]
        token_req, token_pos = [], []
        for r, p in enumerate(batch.prefills):
            pages = allocator.pages(p.seq_id)
            ppt[r][: len(pages)] = pages
            for pos in range(p.start, p.start + p.length):
                positions.append(pos)
                slots.append(slot_of(pages, pos, ps))
                token_req.append(r)
                token_pos.append(pos)
        host = [(self.input_ids, batch.input_ids, torch.int64), (self.positions, positions, torch.int64),
                (self.slot_mapping, slots, torch.int64), (self.decode_page_table, dpt, torch.int32),
                (self.context_lens, [d.context_len for d in batch.decodes], torch.int32),
                (self.prefill_page_table, ppt, torch.int32), (self.token_req, token_req, torch.int32),
                (self.token_pos, token_pos, torch.int32),
                (self.sample_positions, batch.sample_positions, torch.int64)]
        for dst, values, dtype in host:
            if dst.numel():
                src = torch.tensor(values, dtype=dtype).reshape(dst.shape)
                dst.copy_(src.pin_memory() if dst.is_cuda else src, non_blocking=dst.is_cuda)


def make_batch(composition: BatchComposition, vocab_size: int, seed: int = 0, first_seq_id: int = 0,
               layout: Literal["serving", "from_zero"] = "serving") -> Batch:
    """A synthetic batch of `composition`: decode requests at the mean context, then the prefill
    region as chunks of back-to-back prompts of `prefill_context` tokens.

    `layout`: "serving" (default) cuts the prompt stream where real chunked prefill puts its tokens
    on average (`nfrt.layout.prefill_chunks`: the first chunk may start mid-prompt; the KV of the
    positions before it are pages holding whatever); "from_zero" is the profiler's reference layout
    (`nfrt.layout.from_zero_chunks`: whole prompts from position 0, the last one partial)."""
    c = composition
    if layout not in ("serving", "from_zero"):
        raise NfrtError(f"make_batch: layout must be 'serving' or 'from_zero', got {layout!r}")
    rng = random.Random(seed)
    seq = first_seq_id
    decodes = []
    for _ in range(c.decode_tokens):
        decodes.append(DecodeRequest(seq, c.decode_context))
        seq += 1
    prefills = []
    if c.prefill_tokens:
        chunker = prefill_chunks if layout == "serving" else from_zero_chunks
        for start, n in chunker(c.prefill_tokens, c.prefill_context):
            prefills.append(PrefillChunk(seq, start, n))
            seq += 1
    ids = [rng.randrange(vocab_size) for _ in range(c.dense_batch)]
    return Batch(tuple(decodes), tuple(prefills), tuple(ids))


def pages_needed(batch: Batch, page_size: int = PAGE_SIZE) -> int:
    """KV pages the batch's sequences hold after it runs (if none held pages before)."""
    return sum(math.ceil(n / page_size) for n in batch.seq_lengths().values())
