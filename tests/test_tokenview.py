"""Token views: what the HTML shows for continuous and broken rollouts, and the explorer widget's wiring."""

from __future__ import annotations

import html
import json
import re

from rollout_builders import build_rollout, call_text, naive_client, tool

from gymnb.tokens.continuity import check_continuity, extract_trainable_turns
from gymnb.tokens.tokenview import (
    explore_rollouts,
    render_call_html,
    render_rollout_html,
    render_tokens,
    show_rollout,
    tool_mask,
)

TOOLS = [tool("email_send_email", recipient="to", subject="subject")]
INPUT = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Email Ann."}]
ARGS = {"recipient": "ann@example.com", "subject": "Hi"}


def turns(tokenizer):
    merged = [i for p in ("Done. Sk", "in", "ny") for i in tokenizer.encode(p, add_special_tokens=False)]
    return [{"text": call_text("email_send_email", ARGS), "content": "",
             "tool_calls": [("email_send_email", json.dumps(ARGS))], "tool_outputs": ['{"output": "sent"}']},
            {"text": "Done. Skinny", "gen_ids": merged, "user_after": "Thanks"}, {"text": "Bye"}]


def spans(page: str, cls: str) -> list[str]:
    return re.findall(rf'<span class="[^"]*\b{cls}\b[^"]*" title="([^"]*)"', page)


def test_continuous_rollout_shows_every_generated_token_with_its_log_prob(tokenizer):
    rollout = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS)
    page = render_rollout_html(rollout, tokenizer, fold=False)
    generated = [t for t in extract_trainable_turns(rollout)]
    titles = spans(page, "gen")
    assert len(titles) == sum(len(t["generation_token_ids"]) for t in generated)
    first = generated[0]
    assert titles[0] == (f"#{len(first['prompt_token_ids'])} id {first['generation_token_ids'][0]} · call 0 · "
                         f"logp {first['generation_log_probs'][0]:.3f}")
    assert "continuous" in page and "div" not in re.findall(r'class="([^"]*)"', page)
    last = generated[-1]
    assert len(spans(page, "ctx")) + len(titles) == len(last["prompt_token_ids"]) + len(last["generation_token_ids"])


def test_tool_spans_cover_calls_and_responses_only():
    pieces = ["Sure", ".\n", "<tool_call>", '\n{"a"', ": 1}", "\n</tool_call>", "<|im_end|>", "\n<tool_response>",
              "ok", "</tool_response>", " bye"]
    assert tool_mask(pieces) == [False, False, True, True, True, True, False, True, True, True, False]


def test_broken_rollout_marks_the_first_divergence(tokenizer):
    rollout = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS, client=naive_client)
    div = check_continuity(rollout, tokenizer).divergence
    page = render_rollout_html(rollout, tokenizer)
    assert "broken" in page and "BPE merge" in page
    marked = spans(page, "div")
    assert marked and all(t.startswith(f"#{div.token_index} ") for t in marked)  # expected, actual, and the call


def test_long_context_is_folded_but_generations_never_are(tokenizer):
    rollout = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS)
    folded = render_call_html(rollout, tokenizer, 1)
    full = render_call_html(rollout, tokenizer, 1, fold=False)
    hidden = int(re.search(r"… (\d+) context tokens folded …", folded).group(1))
    assert len(spans(full, "ctx")) - len(spans(folded, "ctx")) == hidden
    assert spans(full, "gen") == spans(folded, "gen")


def test_render_tokens_escapes_html(tokenizer):
    text = "<b>bold</b> & done"
    page = render_tokens(tokenizer, tokenizer.encode(text, add_special_tokens=False), fold=False)
    assert re.sub(r"</?span[^>]*>", "", page) == html.escape(text)  # the only markup is ours
    assert show_rollout(build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS), tokenizer).data


def as_probe(rollout: dict, title: str) -> dict:
    """A rollout shaped like layer 04's probes: named, and known to have sent the token fields back."""
    return {**rollout, "probe": "splice_bpe", "title": title, "sent_token_fields": True, "reward": None}


def test_explorer_opens_on_the_first_divergence_and_steps_between_divergences(tokenizer):
    good = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS)
    bad = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS, client=naive_client)
    box = explore_rollouts([good, bad, good], tokenizer, probes=[as_probe(bad, "BPE merge Sk|in|ny")])
    explorer = box.explorer
    assert [label for label, _ in explorer.picker.options] == [
        "probe: BPE merge Sk|in|ny · 3 call(s) · broken: BPE merge",
        "rollout 1 · reward 1 · 3 call(s) · continuous",
        "rollout 2 · reward 1 · 3 call(s) · broken: BPE merge",
        "rollout 3 · reward 1 · 3 call(s) · continuous"]
    assert explorer.position == (0, 2) and spans(explorer.view.value, "div")
    assert "Server at fault" in explorer.view.value  # the probe sent the fields: the server ignored them
    assert explorer.buttons["prev-divergence"].disabled and not explorer.buttons["next-divergence"].disabled
    explorer.buttons["next-divergence"].click()
    assert explorer.position == (2, 2) and "breaks continuity" in explorer.view.value
    assert "Server at fault" in explorer.view.value  # a broken probe convicts the server for rollouts too
    assert explorer.buttons["next-divergence"].disabled
    explorer.buttons["next-rollout"].click()
    assert explorer.position == (3, 0) and not spans(explorer.view.value, "div")
    explorer.buttons["prev-divergence"].click()
    assert explorer.position == (2, 2)
    explorer.call.value = 0  # the slider still moves within a sequence
    assert "call 0 of 3" in explorer.view.value and not spans(explorer.view.value, "div")
    assert "showing divergence" not in explorer.status.value


def test_explorer_blames_the_client_when_the_probes_stay_continuous(tokenizer):
    good = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS)
    bad = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS, client=naive_client)
    explorer = explore_rollouts([good, bad], tokenizer, probes=[as_probe(good, "BPE merge Sk|in|ny")]).explorer
    assert explorer.position == (2, 2) and "Client at fault" in explorer.view.value
    alone = explore_rollouts([bad], tokenizer).explorer  # no probes: the rollout cannot say who dropped the ids
    assert "Either the client" in alone.view.value and "docs/protocol.md" in alone.view.value


def test_explorer_carries_a_static_view_for_html_exports(tokenizer):
    bad = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS, client=naive_client)
    bundle = explore_rollouts([bad], tokenizer)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert 'class="div"' in bundle["text/html"] and "Either the client" in bundle["text/html"]


def test_explorer_given_a_model_name_that_cannot_load_shows_why_instead_of_failing(tokenizer):
    good = build_rollout(tokenizer, INPUT, turns(tokenizer), tools=TOOLS)
    widget = explore_rollouts([good], "smollm2-135")
    text = html.unescape(widget.value)
    assert "no explorer: unknown model 'smollm2-135'" in text and "did you mean smollm2-135m" in text
