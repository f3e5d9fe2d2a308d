"""Benchmarks stage, `gymnb bench logprobs`: how on-policy each engine x trainer dtype pairing is.

Each engine (gymnb and real vLLM, in float32 and bfloat16) samples the same chat prompts at temperature 1; the
trainer (float32 weights) then recomputes the log-prob of every generated token, computing in float32 and in
bfloat16 (`compute_dtype`, as `model.compute_dtype` trains), and the pairing's figure is
token_mult_prob_error = mean(exp(|generation_lp - trainer_lp|)) (1.0 = exact). gymnb reports its log-probs in
`generation_log_probs`; vLLM in `logprobs` (its default raw log-probs, the same quantity at temperature 1),
with the ids from `return_token_ids`. Results: outputs/bench/logprobs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import torch

from gymnb.bench import http_load
from gymnb.bench.server import find_vllm, gymnb_server, start_all, vllm_server
from gymnb.core.config import REPO_ROOT
from gymnb.core.wire import RETURN_TOKEN_IDS_REQUEST, VLLM_MODEL_TOKEN_REQUEST, read_token_ids

ENGINES = ("gymnb:float32", "gymnb:bfloat16", "vllm:float32", "vllm:bfloat16")


async def sample_all(s, num_prompts: int, max_tokens: int) -> list[tuple[list[int], list[int], list[float]]]:
    """(prompt ids, generated ids, generation log-probs) of every prompt, 8 requests in flight."""
    limit = asyncio.Semaphore(8)

    async def one(session, index: int):
        body = {"model": s.model, "messages": http_load.user_messages(index), "max_tokens": max_tokens,
                "temperature": 1.0, "top_p": 1.0, "seed": index, **VLLM_MODEL_TOKEN_REQUEST, **RETURN_TOKEN_IDS_REQUEST}
        async with limit, session.post(f"{s.url}/v1/chat/completions", json=body) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"{s.key} answered {resp.status}: {str(data)[:300]}")
        ids = read_token_ids(data)[0]  # gymnb: the message bundle; vLLM: its token_ids with the logprobs
        return ids.prompt_token_ids, ids.generation_token_ids, ids.generation_log_probs

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        return await asyncio.gather(*(one(session, i) for i in range(num_prompts)))


def mult_prob_error(model, generations, compute_dtype) -> dict:
    from gymnb.train.loss import compute_token_logprobs, logprob_error_sums

    sums, tokens, worst = 0.0, 0, 0.0
    for prompt, gen, lps in generations:
        ids = torch.tensor([prompt + gen])  # (1, T)
        with torch.no_grad():
            train_lp = compute_token_logprobs(model, ids, torch.ones_like(ids), 1.0, compute_dtype=compute_dtype)
        mask = torch.zeros_like(train_lp)
        mask[0, len(prompt):] = 1
        gen_lp = torch.zeros_like(train_lp)
        gen_lp[0, len(prompt):] = torch.tensor(lps)
        part = logprob_error_sums(train_lp, gen_lp, mask)
        sums, tokens = sums + part["mult_prob_error_sum"], tokens + len(gen)
        worst = max(worst, part["abs_logprob_diff_max"])
    return {"token_mult_prob_error": sums / tokens, "max_abs_logprob_diff": worst, "num_tokens": tokens}


def sample_engine(spec: str, args, model_dir: Path) -> list | str:
    """The generations of one engine ("name:dtype"), or why it could not run."""
    name, dtype = spec.split(":")
    s = gymnb_server(args, dtype) if name == "gymnb" else vllm_server(args, dtype, model_dir)
    if s.cmd is None:
        return s.skipped
    try:
        start_all([s], args)
        if s.skipped:
            return s.skipped
        return asyncio.run(sample_all(s, args.prompts, args.max_tokens))
    finally:
        if s.proc is not None:
            http_load.stop(s.proc)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gymnb bench logprobs", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="preset or local HF-format dir")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated from {','.join(ENGINES)}")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm", default=None, help="vllm executable or venv (default: the realstack install)")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench" / "logprobs.json"))
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    if bad := [e for e in engines if e not in ENGINES]:
        print(f"gymnb bench logprobs: unknown engine(s) {bad}; expected some of {list(ENGINES)}", file=sys.stderr)
        return 2
    if args.vllm and any(e.startswith("vllm") for e in engines) and (why := find_vllm(args.vllm)[1]):
        print(f"gymnb bench logprobs: {why}", file=sys.stderr)
        return 2
    # What start_all and the server helpers read; gymnb serves with its defaults, vLLM with 16 sequences.
    args.threads, args.max_batch_size, args.prefix_cache_mb, args.vllm_max_model_len = None, 16, 0, 2048
    args.server_timeout = 1800.0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from gymnb.core.models import load_model, resolve_model_path

    model_dir = Path(str(resolve_model_path(args.model)[0]))
    trainer = load_model(args.model).model  # float32 weights, as the trainer keeps them
    result = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens,
              "load_average": os.getloadavg(), "pairs": {}}
    for spec in engines:
        generations = sample_engine(spec, args, model_dir)
        if isinstance(generations, str):
            result["pairs"][spec] = {"skipped": generations}
            print(f"{spec}: skipped: {generations}")
            continue
        for trainer_dtype in ("float32", "bfloat16"):
            row = mult_prob_error(trainer, generations, getattr(torch, trainer_dtype))
            row.update(token_mult_prob_error=round(row["token_mult_prob_error"], 6),  # the report's precision
                       max_abs_logprob_diff=round(row["max_abs_logprob_diff"], 4))
            result["pairs"].setdefault(spec, {})[f"trainer {trainer_dtype}"] = row
            print(f"{spec:>15} engine vs {trainer_dtype:>8} trainer: token_mult_prob_error "
                  f"{row['token_mult_prob_error']:.6f} (max |diff| {row['max_abs_logprob_diff']}, "
                  f"{row['num_tokens']} tokens)", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return 0
