"""The serving loop's fixed-shape dense batch: static device buffers and their host staging.

Every iteration has the same shape (`ServingShape`), so one CUDA graph replays all of them:
tokens [0, decode_slots) are single-token slots (decode attention); the prefill region
[decode_slots, dense_batch) holds the plan's runs in row order, then padding. Unused slots and
padding are dummy tokens: id 0 at position 0, writing and reading only a reserved scratch page,
in decode slots with context length 1 and in the prefill region as one extra page-table row (the
last) whose tokens all sit at position 0. Their logits are never read. Page tables are
`pages_per_seq` wide (the longest sequence allowed), so no length changes a buffer's shape.

Inputs go up in three packed copies (int64, int32, float32 fields), from pinned host staging
that is double-buffered: the host fills set i+1 while the device may still read set i. A decode
token whose id was sampled by the previous iteration and is not back on the host yet is gathered
on the device from that iteration's sampled ids (`src_row` >= 0), so the host never waits for it.
The upload allocates nothing: the gather works in preallocated device tensors.

`ServingShape.decode_only()` is the drain's shape: the decode slots alone, no prefill region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nfrt.batch import BatchBuffers, BatchShape
from nfrt.errors import NfrtError
from nfrt.kvcache import slot_of
from nfrt.scheduler import Item, Plan, Request

_I64 = ("staged_ids", "src_row", "positions", "slot_mapping", "sample_positions", "keys", "steps")
_I32 = ("decode_page_table", "context_lens", "prefill_page_table", "token_req", "token_pos")
_F32 = ("temperature", "top_p")
_GROUPS = ((torch.int64, _I64), (torch.int32, _I32), (torch.float32, _F32))
# fields of nfrt.batch.BatchBuffers that become views of the packed device buffers
_BATCH_FIELDS = ("positions", "slot_mapping", "sample_positions", "decode_page_table", "context_lens",
                 "prefill_page_table", "token_req", "token_pos")


@dataclass(frozen=True)
class ServingShape:
    dense_batch: int
    decode_slots: int  # the schedule's decode tokens
    prefill_rows: int  # at most this many runs in the prefill region
    pages_per_seq: int  # page-table width

    def __post_init__(self) -> None:
        if not 0 <= self.decode_slots <= self.dense_batch or self.dense_batch < 1:
            raise NfrtError(f"serving shape: decode_slots {self.decode_slots} must be in [0, dense_batch "
                            f"{self.dense_batch}]")
        if self.prefill_tokens and not 1 <= self.prefill_rows <= self.prefill_tokens:
            raise NfrtError(f"serving shape: prefill_rows {self.prefill_rows} must be in [1, "
                            f"{self.prefill_tokens}]")
        if self.pages_per_seq < 1:
            raise NfrtError(f"serving shape: pages_per_seq must be >= 1, got {self.pages_per_seq}")

    @property
    def prefill_tokens(self) -> int:
        return self.dense_batch - self.decode_slots

    @property
    def rows(self) -> int:
        """Prefill page-table rows: the runs plus the padding row."""
        return self.prefill_rows + 1 if self.prefill_tokens else 0

    @property
    def num_samples(self) -> int:
        return self.decode_slots + (self.prefill_rows if self.prefill_tokens else 0)

    def decode_only(self) -> ServingShape:
        """The decode slots alone (no prefill region): the shape of the drain's batches."""
        if self.decode_slots < 1:
            raise NfrtError("serving shape: a decode-only shape needs decode slots")
        return ServingShape(self.decode_slots, self.decode_slots, 0, self.pages_per_seq)

    def batch_shape(self) -> BatchShape:
        return BatchShape(self.dense_batch, self.decode_slots, self.rows, self.num_samples,
                          self.pages_per_seq, self.pages_per_seq)

    def field_shapes(self) -> dict[str, tuple[int, ...]]:
        d, s, w = self.dense_batch, self.num_samples, self.pages_per_seq
        return {"staged_ids": (d,), "src_row": (d,), "positions": (d,), "slot_mapping": (d,),
                "sample_positions": (s,), "keys": (s,), "steps": (s,),
                "decode_page_table": (self.decode_slots, w), "context_lens": (self.decode_slots,),
                "prefill_page_table": (self.rows, w), "token_req": (self.prefill_tokens,),
                "token_pos": (self.prefill_tokens,), "temperature": (s,), "top_p": (s,)}


def _packed(shape: ServingShape, device: torch.device, pin: bool) -> tuple[list[torch.Tensor], dict]:
    """One flat tensor per dtype group and a view of it per field."""
    shapes = shape.field_shapes()
    flats, views = [], {}
    for dtype, names in _GROUPS:
        total = sum(math.prod(shapes[n]) for n in names)
        flat = torch.zeros(max(total, 1), dtype=dtype, device=device, pin_memory=pin)
        at = 0
        for n in names:
            size = math.prod(shapes[n])
            views[n] = flat[at: at + size].view(shapes[n])
            at += size
        flats.append(flat)
    return flats, views


class StaticBatch:
    """Device buffers of the fixed-shape batch (`buffers`, for `Engine.bind`) and the staging."""

    def __init__(self, shape: ServingShape, device: torch.device, page_size: int, scratch_page: int) -> None:
        self.shape = shape
        self.device = device
        self.page_size = page_size
        self.scratch_page = scratch_page
        self.buffers = BatchBuffers(shape.batch_shape(), device)
        self._dev_flats, self.dev = _packed(shape, device, pin=False)
        for name in _BATCH_FIELDS:  # the forward reads these straight from the packed upload
            setattr(self.buffers, name, self.dev[name])
        pin = device.type == "cuda"
        self._host = [_packed(shape, torch.device("cpu"), pin) for _ in range(2)]
        self._np = [{k: v.numpy() for k, v in views.items()} for _, views in self._host]
        d = shape.dense_batch  # the gather's work tensors (no allocation per iteration)
        self._src = torch.zeros(d, dtype=torch.int64, device=device)
        self._gathered = torch.zeros(d, dtype=torch.int64, device=device)
        self._feed = torch.zeros(d, dtype=torch.bool, device=device)

    # ---- host side ------------------------------------------------------------------------------
    def fill(self, plan: Plan | None, pages_of, which: int) -> bool:
        """Write `plan` (None: all padding) into host set `which`; `pages_of(seq_id)` -> its pages.
        Returns whether any row samples with temperature > 0."""
        h, s, ps = self._np[which], self.shape, self.page_size
        scratch_slot = self.scratch_page * ps
        h["staged_ids"][:] = 0
        h["src_row"][:] = -1
        h["positions"][:] = 0
        h["slot_mapping"][:] = scratch_slot
        h["decode_page_table"][:] = self.scratch_page
        h["context_lens"][:] = 1
        h["prefill_page_table"][:] = self.scratch_page
        h["token_req"][:] = s.rows - 1
        h["token_pos"][:] = 0
        h["sample_positions"][:] = 0
        h["keys"][:] = 0
        h["steps"][:] = 0
        h["temperature"][:] = 0.0
        h["top_p"][:] = 1.0
        if plan is None:
            return False
        runs = s.prefill_rows if s.prefill_tokens else 0
        if len(plan.decode) > s.decode_slots or len(plan.prefill) > runs or \
                sum(it.length for it in plan.prefill) > s.prefill_tokens:
            raise NfrtError(f"serving loop: plan {plan.iteration} ({len(plan.decode)} decode items, "
                            f"{len(plan.prefill)} prefill runs) does not fit the batch shape {s}")
        sampling = False
        for j, it in enumerate(plan.decode):
            pages = pages_of(it.request.index)
            h["decode_page_table"][j, : len(pages)] = pages
            p = it.start
            h["context_lens"][j] = p + 1
            h["positions"][j] = p
            h["slot_mapping"][j] = slot_of(pages, p, ps)
            self._token(h, it, p, j, plan.iteration)
            sampling |= self._sample(h, it.request, it.sample_row, j)
        t = s.decode_slots
        for k, it in enumerate(plan.prefill):
            r, n = it.request, it.length
            pages = np.asarray(pages_of(r.index), dtype=np.int64)
            h["prefill_page_table"][k, : len(pages)] = pages
            pos = np.arange(it.start, it.start + n, dtype=np.int64)
            h["positions"][t: t + n] = pos
            h["slot_mapping"][t: t + n] = slot_of(pages, pos, ps)
            a = t - s.decode_slots
            h["token_req"][a: a + n] = k
            h["token_pos"][a: a + n] = pos
            in_prompt = max(0, min(n, r.prompt_len - it.start))
            h["staged_ids"][t: t + in_prompt] = r.prompt[it.start: it.start + in_prompt]
            for q in range(in_prompt, n):  # past the prompt: only single-token runs
                self._token(h, it, it.start + q, t + q, plan.iteration)
            sampling |= self._sample(h, r, it.sample_row, t + n - 1)
            t += n
        return sampling

    def _token(self, h: dict, it: Item, pos: int, at: int, iteration: int) -> None:
        r = it.request
        if pos < r.prompt_len:
            h["staged_ids"][at] = r.prompt[pos]
            return
        k = pos - r.prompt_len  # the output token fed at `pos`
        if k < len(r.outputs):
            h["staged_ids"][at] = r.outputs[k]
        elif it.prev is not None and it.prev[0] == iteration - 1 and k == len(r.outputs):
            h["src_row"][at] = it.prev[1]
        else:
            raise NfrtError(f"serving loop: the input token of request {r.index} at position {pos} is "
                            "neither known nor in flight")

    @staticmethod
    def _sample(h: dict, r: Request, row: int, position: int) -> bool:
        if row < 0:
            return False
        h["sample_positions"][row] = position
        h["keys"][row] = r.key
        h["steps"][row] = r.num_sampled - 1  # fill() runs after the scheduler counted this sample
        h["temperature"][row] = r.temperature
        h["top_p"][row] = r.top_p
        return r.temperature > 0

    # ---- device side ----------------------------------------------------------------------------
    def upload(self, which: int, prev_sampled: torch.Tensor) -> None:
        """Copy host set `which` up (asynchronously from pinned memory) and build the input ids:
        staged ids, or the previous iteration's sampled ids `prev_sampled [samples]` at `src_row`."""
        blocking = self.device.type != "cuda"
        for dst, src in zip(self._dev_flats, self._host[which][0], strict=True):
            dst.copy_(src, non_blocking=not blocking)
        src = self.dev["src_row"]  # [dense_batch]
        torch.clamp(src, min=0, out=self._src)
        torch.index_select(prev_sampled, 0, self._src, out=self._gathered)
        torch.ge(src, 0, out=self._feed)
        torch.where(self._feed, self._gathered, self.dev["staged_ids"], out=self.buffers.input_ids)
