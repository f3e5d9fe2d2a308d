"""Generation engine: batched rows match unbatched ones, requests join a running batch, refit is clean."""

from __future__ import annotations

import threading

import pytest
import torch
from test_server import model_log_probs

from gymnb.core.models import load_model
from gymnb.policy.engine import GenerationEngine, SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), max_model_len=512)


@pytest.fixture(scope="module")
def engine(loaded):
    engine = GenerationEngine(loaded, max_batch_size=8)
    yield engine
    engine.close()


def prompts(tokenizer, count: int) -> list[list[int]]:
    texts = [
        "Hi",
        "Tell me a story about a cat",
        "2+2=",
        "Why is the sky blue? Explain it slowly.",
        "Ok",
        "List three fruits",
        "Translate 'hello' to French please",
        "Bye",
    ]
    return [tokenizer.encode(texts[i % len(texts)] * (1 + i // len(texts))) for i in range(count)]


def test_batched_rows_match_single_rows(engine, loaded):
    """Different prompt lengths in one padded batch give the ids and log-probs of unpadded single runs."""
    batch = prompts(loaded.tokenizer, 6)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)
    together = engine.generate_batch(batch, params)
    for prompt, (completion,) in zip(batch, together):
        (alone,) = engine.submit(prompt, params).result()
        assert completion.token_ids == alone.token_ids
        expected = model_log_probs(loaded.model, prompt, completion.token_ids, 0.8)
        assert torch.allclose(torch.tensor(completion.log_probs), expected, atol=1e-4)


def test_new_request_joins_a_running_batch(engine, loaded):
    """A short request sent while a long one runs finishes first: it joined at a step boundary."""
    long_prompt, short_prompt = prompts(loaded.tokenizer, 2)
    long = engine.submit(long_prompt, SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
    short = engine.submit(short_prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    (short_result,) = short.result()
    assert not long.done()
    (long_result,) = long.result()
    assert len(long_result.token_ids) == 150 and long_result.finish_reason == "length"
    expected = model_log_probs(loaded.model, short_prompt, short_result.token_ids, 0)
    assert torch.allclose(torch.tensor(short_result.log_probs), expected, atol=1e-4)
    expected = model_log_probs(loaded.model, long_prompt, long_result.token_ids, 0)
    assert torch.allclose(torch.tensor(long_result.log_probs), expected, atol=1e-4)


def test_top_k_one_and_tiny_top_p_are_greedy(engine, loaded):
    prompt = prompts(loaded.tokenizer, 3)[2]
    greedy = engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).result()[0]
    for params in (
        SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=2, ignore_eos=True),
    ):
        sampled = engine.submit(prompt, params).result()[0]
        assert sampled.token_ids == greedy.token_ids
        # the log-probs are still those of the untruncated tempered distribution
        expected = model_log_probs(loaded.model, prompt, sampled.token_ids, 1.5)
        assert torch.allclose(torch.tensor(sampled.log_probs), expected, atol=1e-4)


def test_n_choices_differ_and_seed_reproduces(engine, loaded):
    prompt = prompts(loaded.tokenizer, 1)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42, n=3, ignore_eos=True)
    first = [c.token_ids for c in engine.submit(prompt, params).result()]
    again = [c.token_ids for c in engine.submit(prompt, params).result()]
    assert first == again and len({tuple(ids) for ids in first}) == 3


def test_stop_string_ends_generation_and_is_cut_from_text(engine, loaded):
    prompt = prompts(loaded.tokenizer, 4)[3]
    free = engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)).result()[0]
    stop = loaded.tokenizer.decode(free.token_ids[5:7]).strip()
    assert stop
    cut = engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0, stop=[stop])).result()[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) <= 7
    assert stop in loaded.tokenizer.decode(cut.token_ids)  # the stop's tokens stay in the token fields


def test_update_weights_waits_for_in_flight_rows(tiny_model_dir):
    """A refit called mid-generation loads the weights only after the row's last token: the completion is
    wholly old-weights, the next one wholly new. Passes through the model (its input embedding, which prefills
    and both decode paths call once a step) serve as the clock of the overlap."""
    loaded = load_model(str(tiny_model_dir), max_model_len=512)
    old_model = load_model(str(tiny_model_dir), max_model_len=512).model
    engine = GenerationEngine(loaded)
    forwards, events = [], {}
    refit_called = threading.Event()
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in loaded.model.state_dict().items()}
    load_state_dict = loaded.model.load_state_dict

    def refit():
        events["called"] = (len(forwards), in_flight.done())
        refit_called.set()
        engine.update_weights(new_state)

    def on_forward(module, args):
        forwards.append(1)
        if len(forwards) == 5:  # prefill + 4 decode steps of 60: start the refit, go on once it is called
            events["refit"] = threading.Thread(target=refit)
            events["refit"].start()
            refit_called.wait(timeout=60)

    def recording_load(state_dict, *args, **kwargs):
        events["loaded"] = len(forwards)
        return load_state_dict(state_dict, *args, **kwargs)

    hook = loaded.model.get_input_embeddings().register_forward_pre_hook(on_forward)
    loaded.model.load_state_dict = recording_load
    try:
        prompt = prompts(loaded.tokenizer, 2)[1]
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        in_flight = engine.submit(prompt, params)
        in_flight.add_done_callback(lambda _: events.setdefault("finished", len(forwards)))
        (before,) = in_flight.result()
        events["refit"].join()
        assert events["called"] == (5, False)  # the refit came while the generation was in flight
        assert len(before.token_ids) == 60 and events["finished"] == 60  # one prefill, 59 decode steps
        assert events["loaded"] == events["finished"]  # weights loaded after its last forward, before any other
        assert len(engine.prefix_cache) == 0  # KV of the old weights must not be reused
        expected_old = model_log_probs(old_model, prompt, before.token_ids, 0)
        assert torch.allclose(torch.tensor(before.log_probs), expected_old, atol=1e-4)
        (after,) = engine.submit(prompt, params).result()
        expected_new = model_log_probs(loaded.model, prompt, after.token_ids, 0)
        assert torch.allclose(torch.tensor(after.log_probs), expected_new, atol=1e-4)
        old_view = model_log_probs(old_model, prompt, after.token_ids, 0)
        assert not torch.allclose(torch.tensor(after.log_probs), old_view, atol=1e-3)
    finally:
        hook.remove()
        engine.close()


def test_next_turn_reuses_cached_kv_and_matches_model(loaded):
    """Turn 2 extends turn 1's ids: its prompt is mostly served from the prefix cache, log-probs unchanged."""
    engine = GenerationEngine(loaded)
    try:
        first, other = prompts(loaded.tokenizer, 5)[3], prompts(loaded.tokenizer, 5)[4]
        params = SamplingParams(max_tokens=10, temperature=0.9, seed=4, ignore_eos=True)
        (turn1,) = engine.submit(first, params).result()
        second = first + turn1.token_ids + loaded.tokenizer.encode(" and then?")
        before = engine.stats["cached_prompt_tokens"]
        done = engine.generate_batch([second, other], params)  # one prefill: a cached row next to a fresh one
        assert engine.stats["cached_prompt_tokens"] - before == len(first) + len(turn1.token_ids) - 1
        for prompt, (completion,) in zip([second, other], done):
            expected = model_log_probs(loaded.model, prompt, completion.token_ids, 0.9)
            assert torch.allclose(torch.tensor(completion.log_probs), expected, atol=1e-4)
    finally:
        engine.close()


def test_admission_counts_the_width_the_prefill_lays_out(loaded):
    """A prefix-reusing turn next to a fresh long prompt: together they would be laid out as
    2 x (reused prefix + fresh prompt) cells, past max_batch_tokens; they must be prefilled apart."""
    engine = GenerationEngine(loaded, max_batch_tokens=600)
    widths = []  # rows x columns of every attention mask the model is given: the KV the batch lays out
    hook = loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["attention_mask"].numel()), with_kwargs=True)
    try:
        first = loaded.tokenizer.encode("a long history of tool calls " * 50)[:245]
        fresh = loaded.tokenizer.encode("an unrelated question, asked at length " * 50)[:250]
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        (turn1,) = engine.submit(first, params).result()
        second = first + turn1.token_ids + loaded.tokenizer.encode(" next")  # reuses 254 cached tokens
        prefills = engine.stats["prefills"]
        widths.clear()
        engine.generate_batch([second, fresh], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert engine.stats["prefills"] - prefills == 2
        assert max(widths) <= 600, widths  # one prefill of both: 2 x 505 = 1010 cells
    finally:
        hook.remove()
        engine.close()


def test_prefix_cache_supersedes_and_evicts():
    from gymnb.policy.prefix_cache import PrefixCache

    def kv(n):  # one layer, 1 head, dim 2: n tokens = 16 n bytes of keys + values
        return [torch.zeros(1, n, 2)], [torch.zeros(1, n, 2)]

    cache = PrefixCache(max_bytes=16 * 10)
    cache.store([1, 2, 3], *kv(3))
    cache.store([1, 2, 3, 4, 5], *kv(5))  # supersedes [1, 2, 3]
    assert len(cache) == 1 and cache.lookup([1, 2, 3, 4, 9])[0] == 4
    cache.store([7, 8, 9, 10, 11], *kv(5))  # 10 tokens: at the budget
    cache.lookup([1, 2])  # touch the first entry: the second is now least recently used
    cache.store([20, 21], *kv(2))  # over budget: evicts [7, ...]
    assert cache.lookup([7, 8])[0] == 0 and cache.lookup([1, 2, 3])[0] == 3 and cache.lookup([20])[0] == 1
    cache.clear()
    assert len(cache) == 0 and cache.num_bytes == 0


@pytest.mark.parametrize("block", [1, 4, 16])
def test_prefix_cache_lookup_is_the_longest_prefix_over_all_entries(block):
    """The block index finds what a scan of every entry finds, through stores, supersessions and evictions."""
    import random

    from gymnb.policy.prefix_cache import PrefixCache

    rng = random.Random(block)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(0, 40))] for _ in range(6)]  # shared openings

    def sequence():
        return rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(1, 30))]

    cache = PrefixCache(max_bytes=8 * 600, block=block)  # room for about 600 tokens: evictions happen
    for _ in range(400):
        ids = sequence()
        cache.store(ids, [torch.zeros(1, len(ids), 1)], [torch.zeros(1, len(ids), 1)])
        prompt = sequence()
        stored = [list(entry.ids) for entry in cache._entries.values()]
        expected = max((next((i for i, (a, b) in enumerate(zip(s, prompt)) if a != b), min(len(s), len(prompt)))
                        for s in stored), default=0)
        found, entry = cache.lookup(prompt)
        assert found == expected
        assert found == 0 or list(entry.ids[:found]) == prompt[:found]
    assert not any(list(a.ids) == list(b.ids)[:len(a.ids)] for a in cache._entries.values()
                   for b in cache._entries.values() if a is not b)  # no entry is a prefix of another



def test_sampling_probabilities_are_exp_of_log_probs_with_negligible_ones_zero():
    from gymnb.policy.engine import NEGLIGIBLE_LOG_PROB, probs_of

    logprobs = torch.log_softmax(torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 40, dim=-1)
    kept = logprobs >= NEGLIGIBLE_LOG_PROB
    assert kept.any() and not kept.all()
    probs = probs_of(logprobs)
    assert torch.equal(probs[kept], logprobs[kept].exp()) and not probs[~kept].any()
    assert torch.equal(probs_of(logprobs[:, :1] * 0), torch.ones(4, 1))  # nothing negligible: plain exp
