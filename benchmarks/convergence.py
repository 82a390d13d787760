"""Convergence of ES, low-rank ES, SPSA (ZO-SGD), ZO-SGD-Cons, LOZO, HiZOO, MeZO-SVRG, RandOpt, Adam and
policy gradient at an equal budget.

    python -m benchmarks.convergence            # full: 3 tasks × 5 methods × 3 seeds
    python -m benchmarks.convergence --quick    # seconds: one task, a tiny budget, one seed
    python -m benchmarks.convergence --quick --methods lozo hizoo   # chosen rows only

Every method starts from the same pretrained tiny model per task (Adam on the task's cross-entropy for
`pretrain_steps`, saved as a Hugging Face checkpoint and loaded through `model.path`) and runs through
`gfo train` with a budget of *forward-pass equivalents over one batch*: an ES step of population N
costs N, an SPSA step 2 (two-point), an Adam step 3 (a backward pass counted as two forwards), a policy-
gradient step 3 per sampled completion (sampling, then the log-probability forward and backward).
`steps = budget // cost`. On countdown the objective is the reward of generated answers, which has no
gradient: the Adam baseline there fine-tunes on the reference solutions' cross-entropy (SFT). Results are the final eval metric, mean ± std over seeds, at the equal
forward budget, and separately at equal wall-clock: each method's last evaluation whose optimisation
time (`time_s` in `metrics.jsonl`, compilation and evaluation excluded) is within the shortest method's
total. Writes `convergence.json`, `convergence.md` and `convergence.png` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from benchmarks.common import describe, machine, write

TASKS = {
    "countdown": {"task": {"name": "countdown", "batch_size": 16, "eval_size": 32,
                           "options": {"n_numbers": 2, "max_number": 3}},
                  "metric": "reward", "higher": True, "reward_objective": True},
    "prompt_classification": {"task": {"name": "prompt_classification", "batch_size": 16, "eval_size": 32,
                                       "options": {"k": 16}},
                              "metric": "accuracy", "higher": True},
    "grammar_lm": {"task": {"name": "grammar_lm", "batch_size": 16, "eval_size": 32, "options": {"seq_len": 32}},
                   "metric": "cross_entropy", "higher": False},
}
METHODS = {
    "es": ({"method": "es", "population": 16, "sigma": 0.01, "lr": 2e-3, "transform": "adam", "eval_chunk": 16}, 16),
    "lowrank_es": ({"method": "lowrank_es", "population": 16, "sigma": 0.01, "rank": 1, "lr": 2e-3,
                    "transform": "adam", "eval_chunk": 16}, 16),
    "spsa": ({"method": "spsa", "eps": 1e-3, "n": 1, "lr": 2e-4, "transform": "sgd"}, 2),
    "adam": ({"method": "backprop", "lr": 1e-3, "transform": "adam"}, 3),
    "policy_gradient": ({"method": "policy_gradient", "group_size": 4, "lr": 1e-3, "transform": "adam"}, 12),
    # ZO-Bench's conservative ZO-SGD: SPSA (2) + θ, θ ± ηg (3).
    "zo_sgd_cons": ({"method": "zo_sgd_cons", "eps": 1e-3, "n": 1, "lr": 2e-4}, 5),
    "lozo": ({"method": "lozo", "eps": 1e-3, "rank": 2, "lr": 2e-4, "transform": "sgd", "nu": 50}, 2),
    "hizoo": ({"method": "hizoo", "eps": 1e-3, "lr": 2e-4, "transform": "sgd", "alpha": 1e-4}, 3),
    # 4 mini-batch forwards per step + a full-batch anchor (2 forwards of 4 mini-batches) every 10 steps.
    "mezo_svrg": ({"method": "mezo_svrg", "eps": 1e-3, "lr": 2e-4, "transform": "sgd",
                   "q": 10, "minibatch": 4}, 5),
    # One round spending the whole budget (population = budget), top 8 by loss, majority vote where the task
    # scores classes (its `vote_accuracy` is reported as its accuracy).
    "randopt": ({"method": "randopt", "sigma": 0.01, "eval_chunk": 16, "top_k": 8}, None),
}
NEW_METHODS = ("zo_sgd_cons", "lozo", "hizoo", "mezo_svrg", "randopt")
MODEL = {"family": "gpt2", "overrides": {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 160}}
QUICK_MODEL = {"family": "gpt2", "overrides": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 160}}


def pretrained(root: str, task: str, steps: int, model_section: dict) -> str:
    """A Hugging Face checkpoint of the tiny model after `steps` Adam steps on the task's cross-entropy."""
    import models
    from gfo.run.config import from_dict, RunConfig
    from gfo.run.train import train

    path = os.path.join(root, "pretrained", task)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    section = dict(TASKS[task]["task"], objective="cross_entropy")
    cfg = from_dict(RunConfig, {"name": f"pretrain_{task}", "runs_dir": os.path.join(root, "runs"), "steps": steps,
                                "eval_every": steps, "log_every": steps, "checkpoint_every": steps, "model": model_section,
                                "task": section, "optimizer": {"method": "backprop", "lr": 3e-3}})
    result = train(cfg)
    model = models.TransformerLM(models.tiny(model_section["family"], **model_section["overrides"]))
    models.save_pretrained(model, result["params"], path)
    return path


def run(root: str, task: str, method: str, seed: int, budget: int, evals: int, checkpoint: str) -> dict:
    from gfo.run.config import from_dict, RunConfig
    from gfo.run.train import train

    optimizer, cost = METHODS[method]
    if cost is None:  # RandOpt: one round of `budget` members
        optimizer, cost, steps = dict(optimizer, population=budget), budget, 1
    else:
        steps = max(1, budget // cost)
    every = max(1, steps // evals)
    name = f"{task}-{method}-s{seed}"  # a finished run in `root` is reused (gfo train resumes it)
    task_section = dict(TASKS[task]["task"])
    if method == "adam" and TASKS[task].get("reward_objective"):
        task_section["objective"] = "cross_entropy"  # a reward on generated text has no gradient: SFT instead
    cfg = from_dict(RunConfig, {"name": name, "runs_dir": os.path.join(root, "runs"), "seed": seed, "steps": steps,
                                "eval_every": every, "log_every": every, "checkpoint_every": steps,
                                "model": {"path": checkpoint, "tokenizer": "byte"}, "task": task_section, "optimizer": optimizer})
    result = train(cfg)
    jax.clear_caches()  # dozens of runs in one process: drop their executables (memory, mmap count)
    curve = [r for r in result["records"] if r["split"] == "eval"]
    if method == "randopt":  # RandOpt predicts by the vote of its top-K members where the task scores classes
        curve = [dict(r, accuracy=r["vote_accuracy"]) if "vote_accuracy" in r else r for r in curve]
    return {"steps": steps, "cost_per_step": cost, "curve": curve}


def summarise(results: dict) -> dict:
    """Per task and method: final metric mean/std (equal forward budget) and at equal wall-clock."""
    table = {}
    for task, by_method in results.items():
        metric = TASKS[task]["metric"]
        horizon = min(max(r["curve"][-1]["time_s"], 1e-9) for runs in by_method.values() for r in runs)
        table[task] = {"metric": metric, "higher_is_better": TASKS[task]["higher"], "wall_clock_s": horizon,
                       "methods": {}}
        for method, runs in by_method.items():
            final = [r["curve"][-1][metric] for r in runs]
            at_time = [[row for row in r["curve"] if row["time_s"] <= horizon + 1e-9][-1][metric] for r in runs]
            start = [r["curve"][0][metric] for r in runs]
            table[task]["methods"][method] = {
                "start": float(np.mean(start)), "final_mean": float(np.mean(final)), "final_std": float(np.std(final)),
                "wall_mean": float(np.mean(at_time)), "wall_std": float(np.std(at_time)),
                "time_s": float(np.mean([r["curve"][-1]["time_s"] for r in runs])), "steps": runs[0]["steps"]}
    return table


def markdown(payload) -> str:
    m = payload["machine"]
    lines = [f"# Convergence at an equal budget ({'quick' if payload['quick'] else 'full'} run)", "",
             f"{describe(m)} Budget: {payload['budget']} forward-pass equivalents over one batch; seeds {payload['seeds']}; "
             f"pretraining {payload['pretrain_steps']} Adam steps. Costs per step: "
             + ", ".join(f"{k} {v[1] if v[1] is not None else 'budget (one round)'}" for k, v in METHODS.items())
             + ".", ""]
    for task, t in payload["table"].items():
        arrow = "↑" if t["higher_is_better"] else "↓"
        lines += [f"## {task} — {t['metric']} {arrow}", "",
                  f"| method | steps | start | equal forward budget | equal wall-clock ({t['wall_clock_s']:.1f} s) "
                  f"| optimisation time s |", "|---|---|---|---|---|---|"]
        for method, r in t["methods"].items():
            lines.append(f"| {method} | {r['steps']} | {r['start']:.3f} | {r['final_mean']:.3f} ± {r['final_std']:.3f} | "
                         f"{r['wall_mean']:.3f} ± {r['wall_std']:.3f} | {r['time_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(payload, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(payload["results"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = TASKS[task]["metric"]
        for method, runs in payload["results"][task].items():
            cost = runs[0]["cost_per_step"]
            xs = np.asarray([row["step"] * cost for row in runs[0]["curve"]])
            ys = np.asarray([[row[metric] for row in r["curve"]] for r in runs])
            ax.plot(xs, ys.mean(0), label=method)
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("forward-pass equivalents")
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="grammar_lm, es/spsa/adam, budget 48, one seed, a 1-layer model")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default=None, help="directory for the runs (default: OUT/convergence_runs)")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--tasks", nargs="*", default=None, help=f"among {list(TASKS)}")
    p.add_argument("--methods", nargs="*", default=None, help=f"among {list(METHODS)} (default: all; --quick: es, "
                   f"spsa, adam)")
    args = p.parse_args(argv)
    quick = args.quick
    tasks = args.tasks or (["grammar_lm"] if quick else list(TASKS))
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown tasks {sorted(unknown)}: expected some of {list(TASKS)}")
    bad = set(args.methods or ()) - set(METHODS)
    if bad:
        raise SystemExit(f"unknown methods {sorted(bad)}: expected some of {list(METHODS)}")
    budget = args.budget or (48 if quick else 1536)
    seeds = list(range(args.seeds or (1 if quick else 3)))
    pretrain_steps = 10 if quick else 150
    work = args.work or os.path.join(args.out, "convergence_runs" + ("_quick" if quick else ""))
    results: dict = {}
    for task in tasks:
        checkpoint = pretrained(work, task, pretrain_steps, QUICK_MODEL if quick else MODEL)
        methods = args.methods or (["es", "spsa", "adam"] if quick else list(METHODS))
        methods = [m for m in methods if m != "policy_gradient" or task == "countdown"]
        for method in methods:
            results.setdefault(task, {})[method] = [run(work, task, method, s, budget, 1 if quick else 8, checkpoint)
                                                    for s in seeds]
            print(f"[{task}] {method}: " + ", ".join(f"{r['curve'][-1][TASKS[task]['metric']]:.3f}"
                                                       for r in results[task][method]), flush=True)
    payload = {"quick": quick, "machine": machine(), "budget": budget, "seeds": seeds,
               "pretrain_steps": pretrain_steps, "results": results}
    payload["table"] = summarise(results)
    text = markdown(payload)
    name = "convergence" + ("_quick" if quick else "")
    paths = write(args.out, name, payload, text)
    plot(payload, os.path.join(args.out, name + ".png"))
    print(text)
    print("wrote", *paths, os.path.join(args.out, name + ".png"))
    return payload


if __name__ == "__main__":
    main()
