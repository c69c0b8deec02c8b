"""Paged KV cache: per layer K and V tensors of fixed-size pages, and a page allocator.

Layout per layer: `[num_pages, page_size, kv_heads, head_dim]`; the slot of position p of a
sequence is `pages[p // page_size] * page_size + p % page_size`. The cache starts zeroed (never
NaN), so synthetic batches that attend to positions never written still compute finite values.
"""

from __future__ import annotations

import math

import torch

from nfrt.config import ModelConfig
from nfrt.errors import NfrtError

PAGE_SIZE = 16


def slot_of(pages, position, page_size: int):
    """Cache slot of `position` of a sequence whose pages (in position order) are `pages`.
    Works elementwise when `pages` and `position` are numpy arrays."""
    return pages[position // page_size] * page_size + position % page_size


class PageAllocator:
    """Hands out page numbers to sequences; a sequence's pages are in position order."""

    def __init__(self, num_pages: int, page_size: int = PAGE_SIZE) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise NfrtError(f"page allocator: num_pages {num_pages} and page_size {page_size} must be "
                            "positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._pages: dict[int, list[int]] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages(self, seq_id: int) -> list[int]:
        """The pages of `seq_id` in position order (empty for an unknown sequence)."""
        return list(self._pages.get(seq_id, ()))

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id` to hold `num_tokens` positions; returns its pages."""
        have = self._pages.setdefault(seq_id, [])
        need = math.ceil(num_tokens / self.page_size) - len(have)
        if need > len(self._free):
            raise NfrtError(f"KV cache: out of pages: sequence {seq_id} needs {need} more for {num_tokens} "
                            f"tokens, {len(self._free)} of {self.num_pages} free")
        for _ in range(max(0, need)):
            have.append(self._free.pop())
        return list(have)

    def free(self, seq_id: int) -> None:
        """Return all pages of `seq_id` (no-op for an unknown sequence)."""
        self._free.extend(reversed(self._pages.pop(seq_id, [])))

    def slot(self, seq_id: int, position: int) -> int:
        pages = self._pages.get(seq_id, [])
        if position // self.page_size >= len(pages):
            raise NfrtError(f"KV cache: sequence {seq_id} has no page for position {position}")
        return slot_of(pages, position, self.page_size)


class KVCache:
    """K and V pages of every layer plus their allocator."""

    def __init__(self, num_layers: int, num_pages: int, kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 page_size: int = PAGE_SIZE) -> None:
        self.allocator = PageAllocator(num_pages, page_size)
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_pages, page_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, config: ModelConfig, num_pages: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> KVCache:
        return cls(config.num_layers, num_pages, config.num_kv_heads, config.head_dim, device, dtype)

    @staticmethod
    def bytes_per_page(config: ModelConfig, dtype: torch.dtype, page_size: int = PAGE_SIZE) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * page_size * config.kv_size * elem

    @classmethod
    def pages_for_bytes(cls, config: ModelConfig, budget_bytes: int, dtype: torch.dtype) -> int:
        return budget_bytes // cls.bytes_per_page(config, dtype)

    def gather(self, layer: int, seq_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, length) of `seq_id` in `layer`: each [length, kv_heads, head_dim]."""
        pages = self.allocator.pages(seq_id)
        if math.ceil(length / self.page_size) > len(pages):
            raise NfrtError(f"KV cache: sequence {seq_id} holds fewer than {length} positions")
        idx = torch.tensor(pages, dtype=torch.long, device=self.k[layer].device)
        k = self.k[layer][idx].flatten(0, 1)[:length]
        v = self.v[layer][idx].flatten(0, 1)[:length]
        return k, v
