"""Policy server, generation stage: reuse the KV cache of finished sequences for prompts that extend them.

The on-policy splice makes turn k's prompt start with turn k-1's prompt + generation, token for token, and
rollouts of one environment share a long system prompt (the workplace tools are ~4.5k tokens). Keeping the KV
of finished rows and prefilling only the new suffix turns a multi-second prefill per model call into a short
one (SmolLM2 on a busy 2-core CPU, 4.3k-token workplace prompt: 28 s for the first call, 2 s for the next).

Entries are whole sequences (no radix tree): an entry that is a prefix of a newer one is dropped, and the
least recently used entries go first when the byte budget is exceeded. Cached keys already carry their rotary
positions, and a sequence's positions start at 0 whatever padding surrounds it, so a prefix's KV is valid in
any batch. Entries depend on the weights: `clear()` on every weight update.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import torch


@dataclasses.dataclass
class CacheEntry:
    ids: torch.Tensor  # (n,) token ids whose KV is stored
    keys: list[torch.Tensor]  # per layer (H, n, D)
    values: list[torch.Tensor]  # per layer (H, n, D)
    num_bytes: int


class PrefixCache:
    """LRU store of per-sequence KV; `lookup` returns the longest cached prefix of a prompt."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()  # the worker stores and looks up; update_weights clears

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt_ids: list[int]) -> tuple[int, CacheEntry | None]:
        """(length of the longest cached prefix of `prompt_ids`, the entry holding it)."""
        if not self._entries:
            return 0, None
        prompt = torch.tensor(prompt_ids)
        best, best_key = 0, None
        with self._lock:
            for key, entry in self._entries.items():
                n = common_prefix_length(entry.ids, prompt)
                if n > best:
                    best, best_key = n, key
            if best_key is None:
                return 0, None
            self._entries.move_to_end(best_key)
            return best, self._entries[best_key]

    def store(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the KV of `ids` (per layer (H, n, D)); drop entries it extends; evict LRU over budget."""
        num_bytes = sum(k.numel() * k.element_size() * 2 for k in keys)
        if self.max_bytes <= 0 or num_bytes > self.max_bytes or not ids:
            return
        new = torch.tensor(ids)
        with self._lock:
            for key, entry in list(self._entries.items()):
                n = common_prefix_length(entry.ids, new)
                if n == len(entry.ids):  # superseded: the new entry covers it
                    self._remove(key)
                elif n == len(new):  # already covered by a longer entry
                    self._entries.move_to_end(key)
                    return
            self._entries[self._next_key] = CacheEntry(new, keys, values, num_bytes)
            self._next_key += 1
            self.num_bytes += num_bytes
            while self.num_bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.num_bytes = 0

    def _remove(self, key: int) -> None:
        self.num_bytes -= self._entries.pop(key).num_bytes


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
