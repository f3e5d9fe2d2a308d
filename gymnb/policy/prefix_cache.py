"""Policy server, generation stage: reuse the KV cache of finished sequences for prompts that extend them.

The on-policy splice makes turn k's prompt start with turn k-1's prompt + generation, token for token, and
rollouts of one environment share a long system prompt (the workplace tools are ~4.5k tokens). Keeping the KV
of finished rows and prefilling only the new suffix turns a multi-second prefill per model call into a short
one (SmolLM2 on a busy 2-core CPU, 4.3k-token workplace prompt: 28 s for the first call, 2 s for the next).

Entries are whole sequences (no radix tree): an entry that is a prefix of a newer one is dropped, and the
least recently used entries go first when the byte budget is exceeded. Cached keys already carry their rotary
positions, and a sequence's positions start at 0 whatever padding surrounds it, so a prefix's KV is valid in
any batch. Entries depend on the weights: `clear()` on every weight update.

Finding the longest cached prefix must not cost a pass over every entry: the cache holds hundreds (a
rollout's every turn is one), and the worker looks up each admitted row and stores each finished one. With a
comparison per entry (two torch ops, about 7 us), 300 entries of 77-token chat sequences cost 2.1 ms per
lookup and 2.6 ms per store, 75 ms per wave of 16 rows; through the index below, 0.21 and 0.01 ms (500
entries: 3.7 and 4.2 ms against 0.36 and 0.01). So entries are indexed by their leading blocks of BLOCK
tokens: a chain hash of the first b blocks maps to the entries that start with them. A lookup walks the prompt's blocks down the index to the deepest one some entry shares; the entries
sharing it are compared token by token in the next block only (no entry shares that block whole), and the
winner's shared blocks are compared once in full, so a hash collision cannot pass off a wrong prefix. The
result is exactly the longest common prefix over all entries, at the cost of the prompt's length plus the
entries that share its deepest block.
"""

from __future__ import annotations

import array
import dataclasses
import threading
from collections import OrderedDict

import torch

BLOCK = 16  # tokens per indexed block (module docstring)


@dataclasses.dataclass
class CacheEntry:
    ids: array.array  # (n,) token ids whose KV is stored
    keys: list[torch.Tensor]  # per layer (H, n, D)
    values: list[torch.Tensor]  # per layer (H, n, D)
    num_bytes: int
    blocks: list[int] = dataclasses.field(default_factory=list)  # chain hashes of its full leading blocks


class PrefixCache:
    """LRU store of per-sequence KV; `lookup` returns the longest cached prefix of a prompt."""

    def __init__(self, max_bytes: int, *, block: int = BLOCK):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.block = block
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        # chain hash of b leading blocks (b >= 1) -> keys of the entries that start with them; for b = 0 that
        # is every entry, `self._entries`
        self._sharing: dict[int, set[int]] = {}
        # chain hash of an entry's full blocks (0 for none) -> keys of entries with exactly those full blocks
        self._ending: dict[int, set[int]] = {}
        self._next_key = 0
        self._lock = threading.Lock()  # the worker stores and looks up; update_weights clears

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt_ids: list[int]) -> tuple[int, CacheEntry | None]:
        """(length of the longest cached prefix of `prompt_ids`, the entry holding it)."""
        if not self._entries:
            return 0, None
        prompt = array.array("q", prompt_ids)
        with self._lock:
            best, best_key = self._longest(prompt, self._chain(prompt))
            if best_key is None:
                return 0, None
            self._entries.move_to_end(best_key)
            return best, self._entries[best_key]

    def store(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the KV of `ids` (per layer (H, n, D)); drop entries it extends; evict LRU over budget."""
        num_bytes = sum(k.numel() * k.element_size() * 2 for k in keys)
        if self.max_bytes <= 0 or num_bytes > self.max_bytes or not ids:
            return
        new = array.array("q", ids)
        chain = self._chain(new)
        with self._lock:
            covering = self._keys_sharing(chain, len(chain))  # entries starting with all of new's full blocks
            for key in covering:
                entry = self._entries[key]
                if len(entry.ids) >= len(new) and entry.ids[:len(new)] == new:  # already covered by a longer one
                    self._entries.move_to_end(key)
                    return
            # entries that are a prefix of the new one are superseded: each ends within one of new's blocks
            for ended in [0, *chain]:
                for key in list(self._ending.get(ended, ())):
                    entry = self._entries[key]
                    if len(entry.ids) <= len(new) and new[:len(entry.ids)] == entry.ids:
                        self._remove(key)
            self._add(CacheEntry(new, keys, values, num_bytes, chain))
            while self.num_bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sharing.clear()
            self._ending.clear()
            self.num_bytes = 0

    def _chain(self, ids: array.array) -> list[int]:
        """Chain hashes of the leading 1, 2, ... full blocks of `ids`."""
        chain, link = [], 0
        for start in range(0, len(ids) - self.block + 1, self.block):
            link = hash((link, ids[start:start + self.block].tobytes()))
            chain.append(link)
        return chain

    def _keys_sharing(self, chain: list[int], depth: int):
        return self._entries.keys() if depth == 0 else self._sharing.get(chain[depth - 1], ())

    def _longest(self, prompt: array.array, chain: list[int]) -> tuple[int, int | None]:
        depth = 0  # the most leading blocks some entry shares with the prompt
        while depth < len(chain) and chain[depth] in self._sharing:
            depth += 1
        start = depth * self.block
        best, best_key = 0, None
        for key in self._keys_sharing(chain, depth):  # none of them shares block `depth` + 1 whole
            ids = self._entries[key].ids
            n, end = start, min(len(ids), len(prompt))
            while n < end and ids[n] == prompt[n]:
                n += 1
            if n > best:
                best, best_key = n, key
        if best_key is not None and self._entries[best_key].ids[:start] != prompt[:start]:
            return 0, None  # a hash collision: the blocks only looked shared; reuse nothing, not a wrong prefix
        return best, best_key

    def _add(self, entry: CacheEntry) -> None:
        key, self._next_key = self._next_key, self._next_key + 1
        self._entries[key] = entry
        for link in entry.blocks:
            self._sharing.setdefault(link, set()).add(key)
        self._ending.setdefault(entry.blocks[-1] if entry.blocks else 0, set()).add(key)
        self.num_bytes += entry.num_bytes

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        for index, links in ((self._sharing, entry.blocks),
                             (self._ending, [entry.blocks[-1] if entry.blocks else 0])):
            for link in links:
                keys = index[link]
                keys.discard(key)
                if not keys:
                    del index[link]
        self.num_bytes -= entry.num_bytes
