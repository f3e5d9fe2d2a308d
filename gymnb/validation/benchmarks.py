"""Benchmarks stage: score a training run against the seed's success criteria (verdicts, intervals, plots).

Used by notebooks/benchmarks/*.ipynb. A run is a metrics JSONL (one object per step: `step`, `train/*`,
`validation/accuracy`, `validation/num_samples`, ...) plus, for gymnb's own runs, the per-sample validation
rewards under `<run>/validation/step_NNNNNN.jsonl`, which allow a paired (same prompts) before/after interval.
Another trainer's run (mode `external`) supplies only the metrics JSONL; its served checkpoint (and the
checkpoint it started from) are then scored independently through gymnb's environments and `collect_rollouts`.
Only gymnb's own measurement meets an outcome criterion: the trainer's numbers are checked, not trusted.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from gymnb.core.jsonl import read_jsonl
from gymnb.core.stats import normal_interval, standard_error, wilson_interval

MAX_MULT_PROB_ERROR = 1.05  # health of an on-policy run (docs/protocol.md)

# Seed criteria (full scale) and this machine's evidence criteria (cpu scale).
CRITERIA = {
    ("math", "full"): {"config": "grpo_math_qwen3_4b.yaml", "min_steps": 1000, "target_accuracy": 0.85},
    ("math", "cpu"): {"config": "grpo_math_cpu.yaml", "min_steps": 1, "improvement": True},
    ("workplace", "full"): {"config": "grpo_workplace_qwen3_4b.yaml", "min_steps": 100, "improvement": True},
    ("workplace", "cpu"): {"config": "grpo_workplace_cpu.yaml", "min_steps": 1, "improvement": True},
}
ENV_OF = {"math": "math_with_judge", "workplace": "workplace_assistant"}
# Mode `smoke` (the notebooks' default): a real run of the scale's config, cut to minutes and always fresh (no
# resume). It shows the loop working end to end (steps, plots, on-policy health); the criterion needs mode `run`.
SMOKE = {
    # drop_uniform_groups off: in two steps every group may score alike, and a dropped step trains nothing and
    # measures no token_mult_prob_error
    "math": {"steps": 2, "overrides": ["run_name=grpo_math_cpu_smoke", "grpo.max_steps=2",
                                       "grpo.num_prompts_per_step=4", "grpo.drop_uniform_groups=false",
                                       "env.validation_limit=16", "validation.every_steps=0",
                                       "checkpoint.every_steps=0", "checkpoint.resume=false"]},
    "workplace": {"steps": 1, "overrides": ["run_name=grpo_workplace_cpu_smoke", "grpo.max_steps=1",
                                            "grpo.num_prompts_per_step=1", "grpo.group_size=2",
                                            "grpo.drop_uniform_groups=false", "env.validation_limit=2",
                                            "validation.num_repeats=1", "warm_start.num_trajectories=8",
                                            "generation.max_new_tokens=48", "checkpoint.every_steps=0",
                                            "checkpoint.resume=false"]},
}
# What mode `run` costs, measured on the shared 2-core CPU (see the configs' headers and README).
LONG_RUN_TIME = {("math", "cpu"): "10-25 min (24 steps, 2-core CPU)",
                 ("workplace", "cpu"): "about 1 h 40 min on a shared 2-core CPU (warm start 32 min, 20 GRPO steps "
                                       "of 1-3 min, each validation of 60 tasks x 2 11-18 min; compact tools, "
                                       "a departure from NeMo Gym's rows)",
                 ("math", "full"): "days on one GPU (1,000+ steps of Qwen3-4B)",
                 ("workplace", "full"): "about a day on one GPU (100+ steps of Qwen3-4B)"}


def criteria_for(benchmark: str, scale: str) -> dict:
    if (benchmark, scale) not in CRITERIA:
        raise ValueError(f"unknown benchmark/scale {benchmark!r}/{scale!r}: benchmark is math | workplace, "
                         "scale is cpu | full")
    return CRITERIA[(benchmark, scale)]


# ----- reading runs
def load_metrics(path: str | Path, key_map: dict[str, str] | None = None) -> list[dict]:
    """Step records from a JSONL file; `key_map` renames another trainer's keys to gymnb's ({theirs: ours})."""
    records = read_jsonl(path, what='one {"step": ...} metrics object per line')
    if key_map:
        records = [{key_map.get(k, k): v for k, v in record.items()} for record in records]
    for number, record in enumerate(records, 1):
        if "step" not in record:
            raise ValueError(f"{path}: record {number} has no 'step' key (use key_map to name it)")
    return sorted(records, key=lambda r: r["step"])


def validation_points(metrics: list[dict]) -> list[dict]:
    return [{"step": m["step"], "accuracy": m["validation/accuracy"], "num_samples": m.get("validation/num_samples")}
            for m in metrics if "validation/accuracy" in m]


def load_samples(path: str | Path) -> list[dict]:
    """Per-rollout validation records (collect_rollouts output): task index and reward only."""
    return [{"task_index": int(r.get("_ng_task_index", i)), "reward": float(r.get("reward", 0.0))}
            for i, r in enumerate(read_jsonl(path, what="one rollout result per line"))]


def load_run(run_dir: str | Path) -> dict:
    """A gymnb run directory -> metrics, first/last validation samples (paired by prompt) and config hash."""
    import yaml

    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir / "metrics.jsonl")
    # step_NNNNNN.jsonl only: collect_rollouts also leaves step_NNNNNN.failures.jsonl next to it
    files = sorted(p for p in (run_dir / "validation").glob("step_*.jsonl") if p.stem[5:].isdigit())
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    return {"run_dir": str(run_dir), "metrics": metrics, "config_hash": config.get("config_hash"),
            "before_samples": load_samples(files[0]) if len(files) >= 2 else None,
            "after_samples": load_samples(files[-1]) if files else None}


# ----- statistics
def task_means(samples: list[dict]) -> dict[int, float]:
    by_task = defaultdict(list)
    for s in samples:
        by_task[s["task_index"]].append(s["reward"])
    return {t: sum(v) / len(v) for t, v in by_task.items()}


def accuracy_interval(samples: list[dict]) -> dict:
    """Mean reward with a 95% interval: Wilson for one 0/1 sample per prompt, else normal over prompt means
    (the repeats of one prompt are correlated; prompts are the independent units)."""
    means = list(task_means(samples).values())
    n = len(means)
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "num_prompts": 0, "num_samples": 0}
    if n == len(samples) and all(s["reward"] in (0.0, 1.0) for s in samples):
        mean = sum(means) / n
        low, high = wilson_interval(mean, n)
    else:
        mean, interval = normal_interval(means, 0.0, 1.0)
        low, high = interval or (mean, mean)
    return {"mean": mean, "low": max(low, 0.0), "high": min(high, 1.0), "num_prompts": n,
            "num_samples": len(samples)}


def paired_improvement(before: list[dict], after: list[dict]) -> dict:
    """After minus before on the same prompts: mean difference, 95% interval and two-sided p (normal approx)."""
    b, a = task_means(before), task_means(after)
    common = sorted(set(a) & set(b))
    diffs = [a[t] - b[t] for t in common]
    n = len(diffs)
    if n < 2:
        return {"delta": float("nan"), "low": float("nan"), "high": float("nan"), "num_prompts": n, "p_value": None}
    delta, (low, high) = normal_interval(diffs)
    se = standard_error(diffs)
    p = math.erfc(abs(delta) / (se * math.sqrt(2))) if se > 0 else (0.0 if delta else 1.0)
    return {"delta": delta, "low": low, "high": high, "num_prompts": n, "p_value": p,
            "before": sum(b[t] for t in common) / n, "after": sum(a[t] for t in common) / n,
            "improved_prompts": sum(d > 0 for d in diffs), "worsened_prompts": sum(d < 0 for d in diffs)}


def median_mult_prob_error(metrics: list[dict]) -> float | None:
    values = sorted(m["train/token_mult_prob_error"] for m in metrics if "train/token_mult_prob_error" in m)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


# ----- verdict
MET, NOT_MET, NOT_VERIFIED = "met", "not met", "not verified"
INFORMATION = "information"  # shown, never judged: a smoke run's outcome numbers


def compute_verdict(benchmark: str, scale: str, metrics: list[dict], *, before_samples=None, after_samples=None,
                    external: bool = False, mode: str = "run") -> dict:
    """Criteria met, not met or not verified; each check with its number, interval and status.

    `before_samples` / `after_samples` are gymnb's own measurement (per-prompt rewards): the run's validation
    files when gymnb trained, gymnb's evaluation of the base and the final checkpoint in mode external. An
    outcome criterion (accuracy, improvement) is judged on them alone: the trainer's own validation numbers
    in `metrics` never meet a criterion, so an external run that gymnb did not measure is "not verified".
    With `external`, the trainer's last reported accuracy must also lie inside gymnb's 95% interval.
    Step count and token_mult_prob_error are process facts that only the trainer's log holds.

    A smoke run (`mode="smoke"`) is judged as what it is: its steps ran and stayed on-policy; the outcome
    criteria are shown as information but, at a few steps, not required.
    """
    crit = criteria_for(benchmark, scale)
    if mode == "smoke":
        crit = {"min_steps": SMOKE[benchmark]["steps"]}
    source = "trainer" if external else "gymnb"
    steps = max((m["step"] for m in metrics), default=0)
    checks = [_check("training steps", _status(steps >= crit["min_steps"]), steps, f">= {crit['min_steps']}",
                     source=source)]
    final = accuracy_interval(after_samples) if after_samples else None
    if "target_accuracy" in crit:
        status = NOT_VERIFIED if final is None else _status(final["mean"] >= crit["target_accuracy"])
        checks.append(_check("final validation accuracy", status, final and final["mean"],
                             f">= {crit['target_accuracy']}", interval=final, source="gymnb",
                             detail=None if final else "gymnb did not measure the final policy"))
    if crit.get("improvement"):
        imp = paired_improvement(before_samples, after_samples) if before_samples and after_samples else None
        status = NOT_VERIFIED if imp is None or imp["num_prompts"] < 2 else _status(imp["low"] > 0)
        checks.append(_check("validation improvement (95% interval above 0)", status, imp and imp["delta"],
                             "> 0 with 95% confidence", interval=imp, source="gymnb",
                             detail=None if imp else "gymnb did not measure both the base and the final policy"))
    err = median_mult_prob_error(metrics)
    checks.append(_check("median token_mult_prob_error", NOT_VERIFIED if err is None else
                         _status(err < MAX_MULT_PROB_ERROR), err, f"< {MAX_MULT_PROB_ERROR}", source=source,
                         detail=None if err is not None else "not in the metrics"))
    if external:
        checks.append(reproduce_check(metrics, final))
    statuses = {c["status"] for c in checks}
    status = NOT_MET if NOT_MET in statuses else NOT_VERIFIED if NOT_VERIFIED in statuses else MET
    if mode == "smoke":
        shown = compute_verdict(benchmark, scale, metrics, before_samples=before_samples,
                                after_samples=after_samples, external=external)["checks"]
        checks += [{**c, "status": INFORMATION, "passed": None, "detail": f"{c['status']} here",
                    "required": "information (a smoke run is too short to judge it)"}
                   for c in shown if c["name"].startswith(("validation improvement", "final validation"))]
    return {"benchmark": benchmark, "scale": scale, "mode": mode, "status": status, "passed": status == MET,
            "checks": checks}


def reproduce_check(metrics: list[dict], measured: dict | None) -> dict:
    """The trainer's last validation accuracy inside gymnb's 95% interval for the final policy (no slack)."""
    points = validation_points(metrics)
    reported = points[-1]["accuracy"] if points else None
    if measured is None or reported is None:
        missing = "gymnb did not measure the final policy" if measured is None else "the trainer logged no validation"
        return _check("trainer's last validation reproduces under gymnb's environments", NOT_VERIFIED,
                      measured and measured["mean"], f"trainer reported {reported}", interval=measured,
                      source="gymnb", detail=missing)
    inside = measured["low"] <= reported <= measured["high"]
    return _check("trainer's last validation reproduces under gymnb's environments", _status(inside),
                  measured["mean"], f"trainer reported {reported} inside the 95% interval", interval=measured,
                  source="gymnb")


def _status(ok: bool) -> str:
    return MET if ok else NOT_MET


def _check(name, status, value, required, interval=None, detail=None, source="gymnb") -> dict:
    """`source`: whose number `value` is (gymnb's measurement or the trainer's own log)."""
    return {"name": name, "status": status, "passed": status == MET, "value": value, "required": required,
            "interval": interval, "detail": detail, "source": source}


def format_verdict(verdict: dict) -> str:
    mode = verdict.get("mode", "run")
    if mode == "smoke":
        head = "SMOKE RUN OK" if verdict["passed"] else "SMOKE RUN " + (
            "FAILED" if verdict["status"] == NOT_MET else verdict["status"].upper())
        note = (f"\n  (a smoke run checks the loop, not the benchmark: mode='run' trains the full config, "
                f"{LONG_RUN_TIME[(verdict['benchmark'], verdict['scale'])]})")
    else:
        head, note = ("CRITERIA MET" if verdict["passed"] else verdict["status"].upper()), ""
    lines = [f"{verdict['benchmark']} ({verdict['scale']}, mode {mode}): {head}{note}"]
    marks = {MET: "x", NOT_MET: " ", NOT_VERIFIED: "?", INFORMATION: "i"}
    for c in verdict["checks"]:
        value = f"{c['value']:.6g}" if isinstance(c["value"], float) else str(c["value"])
        iv = c["interval"] or {}
        ci = f"  95% CI [{iv['low']:.3f}, {iv['high']:.3f}]" if "low" in iv and iv["low"] == iv["low"] else ""
        lines.append(f"  [{marks[c['status']]}] {c['name']}: {value} (required {c['required']}, "
                     f"{c['source']}'s number){ci}" + (f"  ({c['detail']})" if c["detail"] else ""))
    return "\n".join(lines)


# ----- plots
def plot_training(metrics: list[dict], *, target_accuracy: float | None = None, title: str = ""):
    """Four panels: reward per step, validation accuracy (with the criterion line), mult-prob error, length."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    panels = [("train/reward_mean", "train reward (mean)", None),
              ("validation/accuracy", "validation accuracy", target_accuracy),
              ("train/token_mult_prob_error", "token_mult_prob_error", MAX_MULT_PROB_ERROR),
              ("train/response_length_mean", "response length (tokens)", None)]
    for ax, (key, label, line) in zip(axes, panels):
        points = [(m["step"], m[key]) for m in metrics if key in m and m[key] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=4 if key.startswith("validation") or len(xs) < 12 else 0)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        if line is not None:
            ax.axhline(line, color="red", ls="--", lw=1, label=f"criterion {line}")
            ax.legend(loc="best", fontsize=8)
        elif key == "validation/accuracy" and points:  # improvement criterion: the step-0 level is the bar
            ax.axhline(points[0][1], color="gray", ls=":", lw=1, label=f"before training {points[0][1]:.3f}")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 0.5 ticks
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def timing_summary(metrics: list[dict]) -> dict:
    """Mean seconds per step of each phase over the training steps."""
    keys = sorted({k for m in metrics for k in m if k.startswith("timing/")})
    return {k: sum(m[k] for m in metrics if k in m) / max(sum(k in m for m in metrics), 1) for k in keys}


def write_results(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# ----- notebook plumbing
MODES = ("smoke", "run", "external")


def check_mode(mode: str, scale: str, external_metrics: str = "") -> None:
    """Fail fast, naming the parameter to fix, before any training starts."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use 'smoke' (a short real run, minutes), 'run' (train the full config) "
                         "or 'external' (score another trainer's run)")
    if mode == "smoke" and scale != "cpu":
        raise ValueError("mode='smoke' runs the cpu config cut short: use scale='cpu' (or mode='run' for full)")
    if scale not in ("cpu", "full"):
        raise ValueError(f"scale={scale!r}: use 'cpu' (embedded model, this machine) or 'full' (the seed's setup)")
    if mode == "external" and not external_metrics:
        raise ValueError("mode='external' needs external_metrics: the other trainer's metrics JSONL (step -> metrics)")


def output_dir_for(output_dir: str, benchmark: str) -> Path:
    from gymnb.core.config import REPO_ROOT

    out = Path(output_dir) if output_dir else REPO_ROOT / "outputs" / "benchmarks" / benchmark
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_external(metrics_path: str | Path, key_map: dict | None = None) -> dict:
    """Another trainer's run: metrics only (no per-sample validation rewards)."""
    return {"run_dir": None, "metrics": load_metrics(metrics_path, key_map or None), "config_hash": None,
            "before_samples": None, "after_samples": None}


def get_run(benchmark: str, mode: str, config: str, overrides=(), external_metrics: str = "",
            external_key_map: dict | None = None) -> dict:
    """The run to score: trained here (mode `smoke`: cut to minutes; `run`: the whole config) or another
    trainer's metrics (mode `external`). `config` is a path or a name in configs/train."""
    if mode == "external":
        return load_external(external_metrics, external_key_map)
    cut = SMOKE[benchmark]["overrides"] if mode == "smoke" else []
    return run_training(config, [*cut, *overrides])  # the caller's overrides win


def results_payload(verdict: dict, run: dict, *, mode: str, evaluated: dict | None = None) -> dict:
    """What the results JSON holds: the verdict, the validation curve, timings and where the run lives.

    `status` is pass (criteria met), fail (a criterion not met) or not_verified (gymnb lacks a measurement).
    """
    measured = {k: accuracy_interval(v) for k, v in (evaluated or {}).items() if v}
    return {"status": {MET: "pass", NOT_MET: "fail"}.get(verdict["status"], "not_verified"), "mode": mode,
            "verdict": verdict, "validation": validation_points(run["metrics"]),
            "median_token_mult_prob_error": median_mult_prob_error(run["metrics"]),
            "num_steps": max((m["step"] for m in run["metrics"]), default=0),
            "timing_mean_s": timing_summary(run["metrics"]), "run_dir": run["run_dir"],
            "config_hash": run["config_hash"], "evaluated": measured or None}


# ----- producing runs (mode `run`) and scoring served checkpoints (mode `external`)
def run_training(config: str | Path, overrides=(), *, progress: bool = True) -> dict:
    """Train with gymnb's GRPO loop and return `load_run` of the run directory."""
    from gymnb.core.config import load_config
    from gymnb.train.config import GRPOConfig, resolve_config_path
    from gymnb.train.grpo import train

    cfg = load_config(GRPOConfig, resolve_config_path(config), list(overrides))
    return load_run(train(cfg, progress=progress).run_dir)


def evaluate_external(benchmark: str, mode: str, *, policy_base_url: str = "", checkpoint: str = "",
                      base_checkpoint: str = "", out_dir: str | Path, **options) -> dict:
    """Mode external: gymnb's own measurement of the other trainer's policy, in `load_run`'s sample keys.

    `after_samples`: the final policy (its served endpoint or its checkpoint); `before_samples`: the policy
    training started from (`base_checkpoint`, a preset name or a directory), needed for an improvement
    criterion. Either is None when not given; `options` go to `evaluate_policy`. Mode run: both None.
    """
    out = {"before_samples": None, "after_samples": None}
    if mode != "external":
        return out
    if policy_base_url or checkpoint:
        out["after_samples"] = evaluate_policy(benchmark, policy_base_url=policy_base_url or None,
                                               checkpoint=checkpoint or None,
                                               out_path=Path(out_dir) / "external_eval.jsonl", **options)
    if base_checkpoint:
        options.pop("model_name", None)  # the endpoint's model id names the final policy, not the base
        out["before_samples"] = evaluate_policy(benchmark, checkpoint=base_checkpoint,
                                                out_path=Path(out_dir) / "external_base_eval.jsonl", **options)
    return out


def evaluate_policy(benchmark: str, *, policy_base_url: str | None = None, model_name: str | None = None,
                    checkpoint: str | None = None, split: str = "validation", limit: int | None = None,
                    num_repeats: int = 1, temperature: float = 0.0, max_new_tokens: int = 512,
                    concurrency: int = 16, env_overrides=(), out_path: str | Path | None = None) -> list[dict]:
    """Validation rewards of a policy: an already served endpoint (`policy_base_url` ending in /v1, e.g. the
    other trainer's vLLM server) or a checkpoint directory that gymnb serves itself. `split` is an embedded
    split name or the path of a NeMo Gym rows JSONL."""
    from contextlib import ExitStack

    from gymnb.gym import start_gym
    from gymnb.gym.data import read_rows
    from gymnb.rollouts.collect import collect_rollouts_sync

    if (policy_base_url is None) == (checkpoint is None):
        raise ValueError("give exactly one of policy_base_url (a served endpoint) or checkpoint (a model dir)")
    is_file = split.endswith((".jsonl", ".json")) or Path(split).is_file()
    rows = read_rows(ENV_OF[benchmark], split if is_file else None, split, limit)
    with ExitStack() as stack:
        if checkpoint is not None:
            from gymnb.policy.server import PolicyServer

            server = stack.enter_context(PolicyServer.start(str(checkpoint), model_id=model_name))
            policy_base_url, model_name = server.base_url, server.model_id
        gym = stack.enter_context(start_gym([ENV_OF[benchmark]], policy_base_url=policy_base_url,
                                            policy_model_name=model_name, overrides=list(env_overrides)))
        overrides = {"temperature": temperature, "max_output_tokens": max_new_tokens}
        run = collect_rollouts_sync(rows, head_url=gym.head_url, num_repeats=num_repeats, concurrency=concurrency,
                                    overrides=overrides, out_path=out_path)
    samples = [{"task_index": int(r.get("_ng_task_index", i)), "reward": float(r.get("reward", 0.0))}
               for i, r in enumerate(run.results)]
    # A failed rollout scores 0: a policy that cannot complete the task did not solve it.
    samples += [{"task_index": int(f.get("_ng_task_index", -1)), "reward": 0.0} for f in run.failures]
    return samples
