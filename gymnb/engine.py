"""Policy server, generation stage: a batching engine over a transformers causal LM with a KV cache.

One worker thread owns the model. Requests (each expanded to `n` rows) wait in a queue; at every decode step
the worker admits waiting rows into the running batch (a left-padded prefill whose KV cache is merged into the
batch's cache), runs one decode step for all rows, and retires rows that finished. New requests therefore
join at step boundaries instead of waiting for the whole batch to drain (continuous batching, without paged
memory). Prompts that extend a finished sequence reuse its KV (gymnb.prefix_cache).

Log-prob convention (the trainer must compute the same quantity):
    generation_log_probs[t] = log_softmax(logits_t / T)[token_t]
with T the request's temperature (T = 0, greedy, reports T = 1), computed in float32 BEFORE top-k / top-p
truncation. With top_p=1 and top_k=-1, as the GRPO configs use, this is exactly the distribution sampled from.

Sampling is reproducible: each row draws its uniforms from its own torch.Generator seeded from (seed, choice
index), so a row's tokens do not depend on which other requests share its batch (up to float rounding of
padded batches, which can only matter on exact ties).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import logging
import secrets
import threading
from collections import deque
from concurrent.futures import Future

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from gymnb.errors import RequestError, ServerError
from gymnb.prefix_cache import CacheEntry, PrefixCache

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int | None = None  # None = all the context the prompt leaves; always clamped to it
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings; not part of the returned text
    n: int = 1
    top_logprobs: int = 0
    ignore_eos: bool = False  # keep generating past eos (benchmarks with fixed output lengths)


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # every sampled token, eos or stop-string tokens included
    log_probs: list[float]
    finish_reason: str  # stop | length
    text: str  # decoded without special tokens, cut before the first stop string
    top_logprobs: list[list[tuple[int, float]]] | None = None


class _Group:
    """One request: n rows that resolve one future together."""

    def __init__(self, n: int):
        self.future: Future = Future()
        self.completions: list[Completion | None] = [None] * n
        self.remaining = n


@dataclasses.dataclass(eq=False)
class _Row:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    generator: torch.Generator
    group: _Group
    index: int
    out_ids: list[int] = dataclasses.field(default_factory=list)
    out_lps: list[float] = dataclasses.field(default_factory=list)
    top: list | None = None
    finish_reason: str | None = None
    reuse: int = 0  # prompt tokens whose KV comes from the prefix cache
    cached: CacheEntry | None = None


class GenerationEngine:
    """Batches concurrent generation requests over one model. Thread-safe; `generate` is the asyncio face."""

    def __init__(self, loaded, *, max_batch_size: int = 16, max_batch_tokens: int = 65536,
                 max_prefill_tokens: int = 8192, prefix_cache_bytes: int = 1 << 30):
        """`max_batch_tokens` bounds the KV cache (rows x padded length); `max_prefill_tokens` bounds one
        prefill (newcomers x padded uncached prompt length). Both admit at least one row, so any prompt that
        fits the context runs. `prefix_cache_bytes` is the budget for KV kept from finished rows (0 = off).
        """
        if min(max_batch_size, max_batch_tokens, max_prefill_tokens) < 1:
            raise ValueError("max_batch_size, max_batch_tokens and max_prefill_tokens must be >= 1")
        self.model = loaded.model
        # Fast tokenizers are not thread-safe: an encode on one thread can fail ("Already borrowed") against a
        # decode on another. The server's event loop (`tokenizer`), the worker and the caller (who may keep
        # using `loaded.tokenizer`, e.g. a trainer) therefore each use their own copy.
        self.tokenizer = copy.deepcopy(loaded.tokenizer)
        self._worker_tokenizer = copy.deepcopy(loaded.tokenizer)
        self.max_model_len = loaded.max_model_len
        self.vocab_size = len(loaded.tokenizer)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = collect_eos_ids(loaded)
        self.pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0,
                      "decode_steps": 0, "prefills": 0}
        self._queue: deque[_Row] = deque()
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._update_lock = threading.Lock()
        self._paused = False
        self._closed = False
        self._num_active = 0
        self._thread = threading.Thread(target=self._run, name="gymnb-engine", daemon=True)
        self._thread.start()

    # ----- public API
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Future:
        """Queue one request; the future resolves to a list of `params.n` Completions."""
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Future]:
        """Queue several requests atomically, so an idle worker admits them in one padded batch."""
        rows, futures = [], []
        for prompt_ids, params in requests:
            group = _Group(params.n)
            rows += self._make_rows(prompt_ids, params, group)
            futures.append(group.future)
        with self._cond:
            if self._closed:
                raise ServerError("the generation engine is closed")
            self._queue.extend(rows)
            self.stats["requests"] += len(futures)
            self._cond.notify_all()
        return futures

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[Completion]:
        return await asyncio.wrap_future(self.submit(prompt_ids, params))

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """In-process generation of all prompts in one padded batch (no HTTP): the engine's ceiling."""
        futures = self.submit_many([(p, params) for p in prompts])
        return [f.result() for f in futures]

    @property
    def num_active(self) -> int:
        """Rows being decoded right now (for health checks and tests)."""
        return self._num_active

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    def update_weights(self, state_dict: dict) -> None:
        """Wait until in-flight rows finish (new ones wait), load `state_dict`, resume; next rows see it."""
        with self._update_lock:
            with self._cond:
                self._paused = True
                self._cond.wait_for(lambda: self._num_active == 0 or self._closed)
            try:
                with self._model_lock, torch.no_grad():
                    self.model.load_state_dict(state_dict)
                    self.prefix_cache.clear()  # KV computed with the old weights is off-policy now
            finally:
                with self._cond:
                    self._paused = False
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ----- request -> rows
    def _make_rows(self, prompt_ids: list[int], params: SamplingParams, group: _Group) -> list[_Row]:
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="messages")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {self.max_model_len}; "
                f"shorten the conversation", param="messages", code="context_length_exceeded")
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        rows = []
        for index in range(params.n):
            seed = secrets.randbits(62) if params.seed is None else hash((params.seed, index)) & (2**62 - 1)
            generator = torch.Generator().manual_seed(seed)
            rows.append(_Row(list(prompt_ids), params, max_new, generator, group, index))
        return rows

    # ----- worker
    def _run(self) -> None:
        batch = _Batch(self)
        while True:
            with self._cond:
                while not (self._closed or batch.rows or (self._queue and not self._paused)):
                    self._cond.wait()
                if self._closed:
                    self._fail_rows(list(self._queue) + batch.rows, ServerError("the engine was closed"))
                    return
                newcomers = [] if self._paused else self._admit(batch)
                self._num_active = len(batch.rows) + len(newcomers)
            try:
                with self._model_lock, torch.inference_mode():
                    finished = batch.step(newcomers)
            except Exception as exc:  # a bug or OOM: fail this batch, keep serving the next ones
                log.exception("generation step failed")
                self._fail_rows(batch.rows + newcomers, ServerError(f"generation failed: {exc}"))
                batch = _Batch(self)
                finished = []
            for row in finished:
                self._finish_row(row)
            with self._cond:
                self._num_active = len(batch.rows)
                self._cond.notify_all()

    def _admit(self, batch: _Batch) -> list[_Row]:
        """Pop the waiting rows that fit the batch's row, cache and prefill budgets (FIFO, at least one)."""
        newcomers: list[_Row] = []
        width = batch.mask.shape[1] if batch.rows else 0
        prompt_width = 0
        while self._queue and len(batch.rows) + len(newcomers) < self.max_batch_size:
            row = self._queue[0]
            # Looked up afresh at every attempt: a refit may have cleared the cache since the last one.
            reuse, row.cached = self.prefix_cache.lookup(row.prompt_ids)
            row.reuse = min(reuse, len(row.prompt_ids) - 1)  # the last prompt token is fed for its logits
            length, uncached = len(row.prompt_ids), len(row.prompt_ids) - row.reuse
            rows = len(batch.rows) + len(newcomers) + 1
            cache_cells = rows * max(width, prompt_width, length)
            prefill_cells = (len(newcomers) + 1) * max(prompt_width, uncached)
            if rows > 1 and (cache_cells > self.max_batch_tokens or prefill_cells > self.max_prefill_tokens):
                break
            prompt_width = max(prompt_width, uncached)
            newcomers.append(self._queue.popleft())
        return newcomers

    def _finish_row(self, row: _Row) -> None:
        self.stats["prompt_tokens"] += len(row.prompt_ids)
        self.stats["cached_prompt_tokens"] += row.reuse
        self.stats["generated_tokens"] += len(row.out_ids)
        row.cached = None  # release the entry's tensors
        group = row.group
        group.completions[row.index] = Completion(
            token_ids=row.out_ids, log_probs=row.out_lps, finish_reason=row.finish_reason,
            text=decode_text(self._worker_tokenizer, row.out_ids, row.params.stop), top_logprobs=row.top)
        group.remaining -= 1
        if group.remaining == 0 and not group.future.done():
            group.future.set_result(group.completions)

    @staticmethod
    def _fail_rows(rows: list[_Row], exc: Exception) -> None:
        for row in rows:
            if not row.group.future.done():
                row.group.future.set_exception(exc)


class _Batch:
    """The running batch: rows, their shared left-padded KV cache, attention mask and next positions.

    Invariant between steps: every row's last sampled token is not yet in the cache; the next decode feeds it.
    """

    def __init__(self, engine: GenerationEngine):
        self.engine = engine
        self.model = engine.model
        self.device = engine.model.device
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token in the cache
        self.next_pos: torch.Tensor | None = None  # (B,) position id of each row's pending token

    def step(self, newcomers: list[_Row]) -> list[_Row]:
        finished = []
        if newcomers:
            logits = self._prefill(newcomers)  # (b, V)
            finished += self._sample(newcomers, logits)
            self._drop(finished)
        if self.rows:
            logits = self._decode()  # (B, V)
            done = self._sample(self.rows, logits)
            self._drop(done)
            finished += done
        return finished

    def _prefill(self, newcomers: list[_Row]) -> torch.Tensor:
        """Run the newcomers' uncached prompt suffixes in one left-padded batch; merge their KV in the batch.

        Layout of a newcomer's cache row: [pad | cached prefix | pad | suffix]. Padding in the middle is
        masked like padding on the left; positions come from each row's own token count, not from the column.
        """
        suffixes = [r.prompt_ids[r.reuse:] for r in newcomers]
        width = max(map(len, suffixes))
        ids = torch.full((len(newcomers), width), self.engine.pad_id, dtype=torch.long)  # (b, S)
        new_mask = torch.zeros((len(newcomers), width), dtype=torch.long)  # (b, S)
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix):] = torch.tensor(suffix)
            new_mask[i, width - len(suffix):] = 1
        reuse = torch.tensor([r.reuse for r in newcomers])
        positions = (reuse[:, None] + new_mask.cumsum(-1) - 1).clamp(min=0)  # (b, S)
        cache, past_mask = self._cached_prefixes(newcomers)  # past_mask (b, C)
        mask = torch.cat([past_mask, new_mask], dim=1).to(self.device)  # (b, C + S)
        name = cache_argument(self.model)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask,
                         position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1, **{name: cache})
        self.engine.stats["prefills"] += 1
        lengths = torch.tensor([len(r.prompt_ids) for r in newcomers], device=self.device)
        self._merge(newcomers, getattr(out, name), mask, lengths)
        return out.logits[:, -1, :].float()

    def _cached_prefixes(self, newcomers: list[_Row]) -> tuple[DynamicCache, torch.Tensor]:
        """A cache holding each newcomer's reused prefix right-aligned in C columns, and its (b, C) mask."""
        cache = DynamicCache(config=self.model.config)
        width = max(r.reuse for r in newcomers)
        mask = torch.zeros((len(newcomers), width), dtype=torch.long)
        if width == 0:
            return cache, mask
        donor = next(r.cached for r in newcomers if r.reuse)
        for layer_index, sample in enumerate(donor.keys):
            heads, _, head_dim = sample.shape
            shape = (len(newcomers), heads, width, head_dim)
            keys = torch.zeros(shape, dtype=sample.dtype, device=self.device)  # (b, H, C, D)
            values = torch.zeros(shape, dtype=sample.dtype, device=self.device)
            for i, row in enumerate(newcomers):
                if row.reuse:
                    keys[i, :, width - row.reuse:] = row.cached.keys[layer_index][:, :row.reuse]
                    values[i, :, width - row.reuse:] = row.cached.values[layer_index][:, :row.reuse]
            cache.update(keys, values, layer_index)
        for i, row in enumerate(newcomers):
            if row.reuse:
                mask[i, width - row.reuse:] = 1
        return cache, mask

    def _merge(self, newcomers, cache, mask, next_pos) -> None:
        """Append the newcomers' cache to the batch's, left-padding the shorter one so positions line up."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_pos = list(newcomers), cache, mask, next_pos
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([left_pad(old.keys, width), left_pad(new.keys, width)], dim=0)
            old.values = torch.cat([left_pad(old.values, width), left_pad(new.values, width)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, width, dim=1), left_pad(mask, width, dim=1)], dim=0)
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.rows += newcomers

    def _decode(self) -> torch.Tensor:
        ids = torch.tensor([[r.out_ids[-1]] for r in self.rows], device=self.device)  # (B, 1)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (B, L + 1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.next_pos[:, None],
                         use_cache=True, **{cache_argument(self.model): self.cache})
        self.engine.stats["decode_steps"] += 1
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float()

    def _drop(self, finished: list[_Row]) -> None:
        """Remove finished rows from the batch and trim cache columns that only padding uses any more."""
        if not finished:
            return
        if self.engine.prefix_cache.max_bytes > 0:
            self._store_prefixes(finished)
        gone = set(map(id, finished))
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.next_pos = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.next_pos = self.next_pos[index]

    def _store_prefixes(self, finished: list[_Row]) -> None:
        """Keep the KV of finished rows (prompt + generation but the never-fed last token) for later turns."""
        index_of = {id(r): i for i, r in enumerate(self.rows)}
        for row in finished:
            i = index_of[id(row)]
            columns = self.mask[i].bool()
            ids = row.prompt_ids + row.out_ids[:-1]
            assert int(columns.sum()) == len(ids), "cache columns and token count disagree"
            keys = [layer.keys[i][:, columns] for layer in self.cache.layers]  # per layer (H, n, D)
            values = [layer.values[i][:, columns] for layer in self.cache.layers]
            self.engine.prefix_cache.store(ids, keys, values)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[_Row]:
        """Sample one token per row, record it and its log-prob; return the rows that finished."""
        tokens, chosen_lps, top = sample_tokens(rows, logits)
        finished = []
        for i, row in enumerate(rows):
            token = int(tokens[i])
            row.out_ids.append(token)
            row.out_lps.append(float(chosen_lps[i]))
            if row.params.top_logprobs:
                row.top = row.top or []
                ids, values = top[1][i, : row.params.top_logprobs], top[0][i, : row.params.top_logprobs]
                row.top.append([(int(t), float(v)) for t, v in zip(ids, values, strict=True)])
            row.finish_reason = self._finish_reason(row, token)
            if row.finish_reason:
                finished.append(row)
        return finished

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if token in self.engine.eos_ids and not row.params.ignore_eos:
            return "stop"
        if row.params.stop and hits_stop(self.engine._worker_tokenizer, row.out_ids, row.params.stop):
            return "stop"
        if len(row.out_ids) >= row.max_new:
            return "length"
        return None


@functools.cache
def _cache_argument_of(model_class: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model) -> str:
    """The forward() keyword of the KV cache: `cache` since transformers 5 renamed it (the old
    `past_key_values` warns on every call), `past_key_values` before. The output field has the same name."""
    return _cache_argument_of(type(model))


def sample_tokens(rows: list[_Row], logits: torch.Tensor):
    """(tokens (B,), their log-probs (B,), top (values, indices) or None), under the convention above."""
    temps = torch.tensor([r.params.temperature or 1.0 for r in rows], device=logits.device)
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)  # (B, V)
    tokens = logits.argmax(dim=-1)  # greedy rows keep this
    sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = truncate_probs(logprobs[index].exp(), [rows[i].params for i in sampled])  # (S, V)
        cdf = probs.cumsum(dim=-1)
        uniforms = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampled])
        uniforms = uniforms.to(logits.device)  # (S,) one draw per row from its own generator
        picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens[index] = picks.clamp(max=logits.shape[-1] - 1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    k = max(r.params.top_logprobs for r in rows)
    top = logprobs.topk(k, dim=-1) if k else None
    return tokens, chosen, top


def truncate_probs(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero the tokens outside each row's top-k / top-p set (the unnormalized rest is sampled by CDF)."""
    if all(p.top_k <= 0 and p.top_p >= 1.0 for p in params):
        return probs
    vocab = probs.shape[-1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=probs.device)
    top_p = torch.tensor([p.top_p for p in params], device=probs.device)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (S, V)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (ranks < top_k[:, None]) & (mass_before < top_p[:, None])  # the top token is always kept
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)


def left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` up to `width` (dim 2 = the sequence axis of (B, H, L, D))."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


def hits_stop(tokenizer, out_ids: list[int], stops: list[str]) -> bool:
    """Whether a stop string appears in the decoded tail (a window wide enough for the longest stop)."""
    window = max(len(s) for s in stops) + 8
    tail = tokenizer.decode(out_ids[-window:], skip_special_tokens=True)
    return any(s in tail for s in stops)


def decode_text(tokenizer, ids: list[int], stops: list[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def collect_eos_ids(loaded) -> set[int]:
    """End-of-generation ids: the tokenizer's eos plus the model's generation_config eos ids."""
    ids = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    config = getattr(loaded.model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    ids.update([extra] if isinstance(extra, int) else list(extra or []))
    return ids
