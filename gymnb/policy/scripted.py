"""Scripted tiny models: real models that deterministically say what a test or smoke run needs.

A random tiny model almost never emits an end-of-turn token or a tool call, so multi-turn rollouts cannot be
exercised with it. `make_scripted_model` overfits a tiny model (a few seconds on a CPU) until greedy decoding
reproduces given completions for given conversations. It is a real model served by the real server: nothing
in the pipeline is mocked, and on-policy properties (token fields, splice, log-probs) hold as for any model.

A conversation is a dict:
    {"messages": [...initial chat messages...], "tools": [...] | None,
     "completions": ["assistant text of call 1", "assistant text of call 2", ...],
     "followups": [[messages appended after call 1 (e.g. a tool result)], ...]}
Prompts are built exactly as the server builds them (`gymnb.policy.splice.build_prompt_ids`, earlier assistant turns
carrying their token fields), so the contexts seen in training are the ones seen when served.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gymnb.core.models import load_tokenizer, make_tiny_model


def build_scripted_pairs(tokenizer, conversation: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, generation_ids) for every model call of a conversation, as the server would see them."""
    from gymnb.policy.chat import parse_tool_calls, parse_tools
    from gymnb.policy.splice import build_prompt_ids

    messages = [dict(m) for m in conversation["messages"]]
    # Normalise tools exactly as the server does, or the served prompt differs from the trained one.
    tools = parse_tools(conversation.get("tools"))
    followups = conversation.get("followups") or []
    pairs = []
    for k, completion in enumerate(conversation["completions"]):
        prompt_ids = build_prompt_ids(tokenizer, messages, tools=tools)
        generation_ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        pairs.append((prompt_ids, generation_ids))
        content, tool_calls = parse_tool_calls(completion)
        assistant = {"role": "assistant", "content": content, "prompt_token_ids": prompt_ids,
                     "generation_token_ids": generation_ids, "generation_log_probs": [0.0] * len(generation_ids)}
        if tool_calls:
            assistant["tool_calls"] = tool_calls
        messages.append(assistant)
        messages.extend(dict(m) for m in (followups[k] if k < len(followups) else []))
    return pairs


def make_scripted_model(
    out_dir: str | Path,
    conversations: list[dict],
    *,
    max_steps: int = 600,
    lr: float = 1e-2,
    seed: int = 0,
    hidden_size: int = 64,
    num_heads: int = 4,
) -> Path:
    """Train a tiny model until greedy decoding reproduces every completion; save it to `out_dir`.

    Reuses `out_dir` when it already holds a model trained on the same conversations (hash in scripted.json).
    Raises RuntimeError if the model has not memorised every completion after `max_steps` updates.
    """
    import torch

    out = Path(out_dir)
    shape = [] if (hidden_size, num_heads) == (64, 4) else [hidden_size, num_heads]  # old caches stay valid
    digest = hashlib.sha256(json.dumps([conversations, seed, *shape], sort_keys=True).encode()).hexdigest()[:16]
    marker = out / "scripted.json"
    if marker.exists() and json.loads(marker.read_text()).get("hash") == digest:
        return out
    base = make_tiny_model(out.with_name(out.name + ".base"), seed=seed, hidden_size=hidden_size, num_heads=num_heads)
    tokenizer = load_tokenizer(str(base))
    pairs = [p for conv in conversations for p in build_scripted_pairs(tokenizer, conv)]

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(max_steps):
        with torch.no_grad():
            wrong = sum(_completion_loss(model, p, g)[1] for p, g in pairs)
        if wrong == 0:
            break
        for prompt_ids, generation_ids in pairs:
            loss, _ = _completion_loss(model, prompt_ids, generation_ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        raise RuntimeError(f"scripted model did not memorise its completions in {max_steps} steps")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps({"hash": digest, "steps": step + 1, "num_pairs": len(pairs)}))
    return out


def _completion_loss(model, prompt_ids: list[int], generation_ids: list[int]):
    """Cross-entropy on the generation positions only; also counts positions whose argmax is wrong."""
    import torch

    ids = torch.tensor([prompt_ids + generation_ids])  # (1, T)
    hidden = model.model(input_ids=ids).last_hidden_state  # (1, T, H)
    # Position t predicts token t+1: the generation is predicted from the last prompt position onwards.
    start = len(prompt_ids) - 1
    logits = model.lm_head(hidden[0, start : start + len(generation_ids)])  # (G, V): only G rows, not T x V
    target = torch.tensor(generation_ids)
    loss = torch.nn.functional.cross_entropy(logits, target)
    num_wrong = int((logits.argmax(-1) != target).sum())
    return loss, num_wrong
