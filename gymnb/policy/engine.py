"""Policy server, generation stage: a batching engine over a transformers causal LM with a KV cache.

One worker thread owns the model. Requests (each expanded to `n` rows) wait in a queue; at every decode step
the worker admits waiting rows into the running batch (a left-padded prefill whose KV cache is merged into the
batch's cache), runs one decode step for all rows, and retires rows that finished. New requests therefore
join at step boundaries instead of waiting for the whole batch to drain (continuous batching, without paged
memory). Prompts that extend a finished sequence reuse its KV (gymnb.policy.prefix_cache).

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

from gymnb.core.errors import RequestError, ServerError
from gymnb.policy import lean_decode as lean_decode_mod
from gymnb.policy.cpu_threads import ThreadBudget
from gymnb.policy.packed_linear import matmul_path, pack_linears
from gymnb.policy.prefix_cache import CacheEntry, PrefixCache

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
        self.started = False  # some row was admitted: a refit waits until the whole group is done


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
                 max_prefill_tokens: int = 8192, prefix_cache_bytes: int = 1 << 30,
                 threads: int | None = None, adapt_threads: bool = True, pack_weights: bool = True,
                 lean_decode: bool = True):
        """`max_batch_tokens` bounds the KV cache (rows x padded length); `max_prefill_tokens` bounds one
        prefill (newcomers x padded uncached prompt length). Both admit at least one row, so any prompt that
        fits the context runs. `prefix_cache_bytes` is the budget for KV kept from finished rows (0 = off).
        `threads`: the worker's torch team (default: the constructing thread's); `adapt_threads`: that team
        shrinks to the cores other processes leave free and grows back (gymnb.policy.cpu_threads: why a
        fixed team collapses, and why a serving process keeps its other threads to one).
        `pack_weights`: the model's Linear weights are laid out once for oneDNN (gymnb.policy.packed_linear:
        the same outputs on bf16 units, equal to float32 rounding in float32, to one bf16 rounding for bf16
        weights on a CPU without bf16 matmul; faster decode). `lean_decode`: decode
        steps of a Llama-shaped model skip transformers' generic forward and write K/V in place
        (gymnb.policy.lean_decode: the same logits); other models keep the generic forward.
        """
        if min(max_batch_size, max_batch_tokens, max_prefill_tokens) < 1:
            raise ValueError("max_batch_size, max_batch_tokens and max_prefill_tokens must be >= 1")
        self.model = loaded.model
        self.num_packed = pack_linears(self.model) if pack_weights else 0
        self.matmul = matmul_path(self.model)  # e.g. bf16 weights on a CPU without bf16 matmul: float32 units
        self.lean = None
        if lean_decode:
            if (why := lean_decode_mod.supports(self.model)) is None:
                self.lean = lean_decode_mod.LeanDecoder(self.model)
            else:
                log.info("decoding with transformers' forward: %s", why)
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
        self.team_size = threads or torch.get_num_threads()
        self.threads = ThreadBudget(self.team_size) if adapt_threads else None
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
        """Wait until in-flight requests finish (new ones wait), load `state_dict`, resume.

        In flight means every row of a request that has any row admitted: a request with `n` larger than the
        batch still has rows queued when its first rows finish, and all `n` choices (a GRPO group) must come
        from one policy.
        """
        with self._update_lock:
            with self._cond:
                self._paused = True
                self._cond.wait_for(lambda: not self._requests_in_flight() or self._closed)
            try:
                with self._model_lock, torch.no_grad():
                    self.model.load_state_dict(state_dict)  # packed weights follow on their next forward
                    self.prefix_cache.clear()  # KV computed with the old weights is off-policy now
            finally:
                with self._cond:
                    self._paused = False
                    self._cond.notify_all()

    def _requests_in_flight(self) -> bool:
        return self._num_active > 0 or any(row.group.started for row in self._queue)

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
        torch.set_num_threads(self.team_size)  # OpenMP team sizes are per thread: this one's, for every op
        batch = _Batch(self)
        while True:
            with self._cond:
                while not (self._closed or batch.rows or self._admissible()):
                    self._cond.wait()
                if self._closed:
                    self._fail_rows(list(self._queue) + batch.rows, ServerError("the engine was closed"))
                    return
                newcomers = self._admit(batch, started_only=self._paused)
                self._num_active = len(batch.rows) + len(newcomers)
            if self.threads is not None:
                self.threads.adjust()  # per-thread OpenMP setting: must run on this worker thread
            try:
                with self._model_lock, torch.inference_mode():
                    finished, failed = batch.step(newcomers)
            except Exception as exc:  # a bug or OOM in the shared decode step: fail this batch, keep serving
                log.exception("generation step failed")
                self._fail_rows(batch.rows + newcomers, ServerError(f"generation failed: {exc}"))
                batch = _Batch(self)
                finished, failed = [], []
            for row, exc in failed:  # a row that failed alone fails its request only
                log.error("generation failed for one request: %s: %s", type(exc).__name__, exc)
                self._fail_rows([row], ServerError(f"generation failed for this request: {exc}"))
            # the other rows of a failed request would be wasted work
            batch.remove([row for row in batch.rows if row.group.future.done()])
            for row in finished:
                self._finish_row(row)
            with self._cond:
                self._num_active = len(batch.rows)
                self._cond.notify_all()

    def _admissible(self) -> bool:
        """Whether a queued row may start: any, unless a refit is waiting; then only rows of started requests
        (a request's rows are contiguous in the FIFO queue, so those are at its head)."""
        return bool(self._queue) and (not self._paused or self._queue[0].group.started)

    def _admit(self, batch: _Batch, *, started_only: bool = False) -> list[_Row]:
        """Pop the waiting rows that fit the batch's row, cache and prefill budgets (FIFO, at least one).

        `started_only` (a refit is waiting): only rows of requests that already have rows admitted.
        """
        newcomers: list[_Row] = []
        width = batch.mask.shape[1] if batch.rows else 0
        prompt_width = reuse_width = 0
        while self._queue and len(batch.rows) + len(newcomers) < self.max_batch_size:
            row = self._queue[0]
            if row.group.future.done():  # another row of this request failed
                self._queue.popleft()
                continue
            if started_only and not row.group.started:
                break
            # Looked up afresh at every attempt: a refit may have cleared the cache since the last one.
            reuse, row.cached = self.prefix_cache.lookup(row.prompt_ids)
            row.reuse = min(reuse, len(row.prompt_ids) - 1)  # the last prompt token is fed for its logits
            uncached = len(row.prompt_ids) - row.reuse
            rows = len(batch.rows) + len(newcomers) + 1
            # The prefill lays every newcomer out as [pad | cached prefix | pad | suffix]: its width is the
            # longest reused prefix plus the longest suffix, wider than any one prompt when they differ.
            laid_out = max(reuse_width, row.reuse) + max(prompt_width, uncached)
            cache_cells = rows * max(width, laid_out)
            prefill_cells = (len(newcomers) + 1) * max(prompt_width, uncached)
            if rows > 1 and (cache_cells > self.max_batch_tokens or prefill_cells > self.max_prefill_tokens):
                break
            prompt_width, reuse_width = max(prompt_width, uncached), max(reuse_width, row.reuse)
            row.group.started = True
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

    def step(self, newcomers: list[_Row]) -> tuple[list[_Row], list[tuple[_Row, Exception]]]:
        """One step: admit `newcomers`, decode every row. Returns (finished rows, (row, error) that failed).

        What depends on one request alone (its prompt's prefill, sampling under its parameters) fails that
        row alone; the decode step is shared, and its failure propagates to the caller (whole batch).
        """
        finished, failed = [], []
        if newcomers:
            for rows, logits in self._prefill_isolated(newcomers, failed):
                finished += self._sample(rows, logits, failed)
            self._drop(finished)
            self.remove([row for row, _ in failed])  # a row without a sampled token cannot be decoded
        if self.rows:
            logits = self._decode()  # (B, V)
            done = self._sample(self.rows, logits, failed)
            self._drop(done)
            finished += done
            self.remove([row for row, _ in failed])
        return finished, failed

    def _prefill_isolated(self, newcomers: list[_Row], failed: list) -> list[tuple[list[_Row], torch.Tensor]]:
        """Prefill the newcomers in one batch; if that fails, one by one, so only a row at fault fails.

        The batch's own state changes only in `_merge`, after a prefill succeeded.
        """
        try:
            groups = [(newcomers, self._prefill(newcomers))]
        except Exception as exc:  # noqa: BLE001
            if len(newcomers) == 1:
                failed.append((newcomers[0], exc))
                return []
            groups = []
            for row in newcomers:
                try:
                    groups.append(([row], self._prefill([row])))
                except Exception as row_exc:  # noqa: BLE001
                    failed.append((row, row_exc))
        out = []
        for rows, (logits, cache, mask, lengths) in groups:
            self._merge(rows, cache, mask, lengths)
            out.append((rows, logits))
        return out

    def _prefill(self, newcomers: list[_Row]):
        """(last logits (b, V), cache, mask (b, C + S), lengths (b,)) of the newcomers' prompts.

        Runs the newcomers' uncached prompt suffixes in one left-padded batch, for `_merge` into the batch.
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
        return out.logits[:, -1, :].float(), getattr(out, name), mask, lengths

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
        if self.engine.lean is not None:
            logits = self.engine.lean.step(ids[:, 0], self.next_pos, self.mask, self.cache)
        else:
            logits = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.next_pos[:, None],
                                use_cache=True, **{cache_argument(self.model): self.cache}).logits[:, -1, :]
        self.engine.stats["decode_steps"] += 1
        self.next_pos = self.next_pos + 1
        return logits.float()

    def _drop(self, finished: list[_Row]) -> None:
        """Remove finished rows from the batch, keeping their KV in the prefix cache."""
        if finished and self.engine.prefix_cache.max_bytes > 0:
            self._store_prefixes(finished)
        self.remove(finished)

    def remove(self, rows: list[_Row]) -> None:
        """Remove rows from the batch and trim cache columns that only padding uses any more."""
        gone = {id(r) for r in rows} & {id(r) for r in self.rows}
        if not gone:
            return
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
            columns = self.mask[i].nonzero()[:, 0]  # (n,) once per row: a boolean index per layer costs 10x
            ids = row.prompt_ids + row.out_ids[:-1]
            assert len(columns) == len(ids), "cache columns and token count disagree"
            keys = [layer.keys[i].index_select(1, columns) for layer in self.cache.layers]  # per layer (H, n, D)
            values = [layer.values[i].index_select(1, columns) for layer in self.cache.layers]
            self.engine.prefix_cache.store(ids, keys, values)

    def _sample(self, rows: list[_Row], logits: torch.Tensor, failed: list) -> list[_Row]:
        """Sample one token per row, record it and its log-prob; return the rows that finished.

        If the batched sampling fails, each row is sampled alone and the rows that fail go to `failed`.
        """
        try:
            picks = [(row, sampled) for row, sampled in zip(rows, unbatch(sample_tokens(rows, logits)))]
        except Exception:  # noqa: BLE001
            picks = []
            for i, row in enumerate(rows):
                try:
                    picks.append((row, next(unbatch(sample_tokens([row], logits[i:i + 1])))))
                except Exception as exc:  # noqa: BLE001
                    failed.append((row, exc))
        finished = []
        for row, (token, chosen_lp, top) in picks:
            row.out_ids.append(token)
            row.out_lps.append(chosen_lp)
            if row.params.top_logprobs:
                row.top = row.top or []
                row.top.append(top[: row.params.top_logprobs])
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
    # Passes over (B, V) are a tenth of a small model's decode step: the division and the argmax are skipped
    # when no row needs them (all T = 1, no greedy row), the common case of RL sampling.
    temps = [r.params.temperature or 1.0 for r in rows]
    if any(t != 1.0 for t in temps):
        logits = logits / torch.tensor(temps, device=logits.device)[:, None]
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    tokens = (logits.argmax(dim=-1) if len(sampled) < len(rows)  # greedy rows keep this
              else torch.zeros(len(rows), dtype=torch.long, device=logits.device))
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = truncate_probs(probs_of(logprobs[index]), [rows[i].params for i in sampled])  # (S, V)
        uniforms = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampled])
        tokens[index] = inverse_cdf(probs, uniforms.to(logits.device))
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    k = max(r.params.top_logprobs for r in rows)
    top = logprobs.topk(k, dim=-1) if k else None
    return tokens, chosen, top


# torch's float32 exp (this CPU build's vectorized kernel) takes a slow path for every result under float32's
# smallest normal number, e^-87.3: 16 x 49,152 log-probs at -88 took 14 ms, at -86 0.3 ms, at -inf 1.5 ms
# (2 cores, AVX-512). Confident predictions put most of the vocabulary below that: in a 16-row bf16 wave
# the samplings after the prefill took 50-77 ms, against 2 ms for the others. Such a token's probability is
# under 1.7e-38, below what a float32 CDF over the vocabulary can resolve, so it is sampled as 0.
NEGLIGIBLE_LOG_PROB = -87.0


def probs_of(logprobs: torch.Tensor) -> torch.Tensor:
    """exp(logprobs), with 0 for log-probs under NEGLIGIBLE_LOG_PROB (exp's fast path: see there)."""
    if float(logprobs.min()) >= NEGLIGIBLE_LOG_PROB:
        return logprobs.exp()
    return logprobs.clamp(min=NEGLIGIBLE_LOG_PROB).exp_().mul_(logprobs >= NEGLIGIBLE_LOG_PROB)


def unbatch(sampled):
    """`sample_tokens` output -> per row (token, its log-prob, [(top id, top log-prob), ...] or [])."""
    tokens, chosen_lps, top = sampled
    tops = ([list(zip(ids.tolist(), values.tolist(), strict=True)) for values, ids in zip(*top, strict=True)]
            if top is not None else [[] for _ in range(len(tokens))])
    yield from zip(tokens.tolist(), chosen_lps.tolist(), tops, strict=True)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The token whose CDF interval holds `uniforms * total` for each row of unnormalized `probs` (S, V).

    Two levels instead of one cumsum over the vocabulary (a sequential, unvectorized pass): cumulate block
    sums to find the block, then cumulate inside that block only.
    """
    rows, vocab = probs.shape
    padded = (F.pad(probs, (0, -vocab % block)) if vocab % block else probs).view(rows, -1, block)  # (S, N, block)
    block_cdf = padded.sum(dim=-1).cumsum(dim=-1)  # (S, N)
    target = (uniforms * block_cdf[:, -1])[:, None]  # (S, 1)
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp(max=block_cdf.shape[1] - 1)  # (S, 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)  # (S, 1)
    inner = padded[torch.arange(rows, device=probs.device), chosen[:, 0]].cumsum(dim=-1)  # (S, block)
    offset = torch.searchsorted(inner, target - before, right=True).clamp(max=block - 1)  # (S, 1)
    return (chosen * block + offset).squeeze(1).clamp(max=vocab - 1)


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
