"""Run summaries and side-by-side reports: Markdown tables and PNG curves from `metrics.jsonl`."""

from __future__ import annotations

import json
import os

_LOWER_IS_BETTER = ("loss", "cross_entropy", "perplexity")



# Record fields that are not metrics: the step, the split, and the optimisation wall time.
NOT_METRICS = ("step", "split", "time_s")

def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a gfo run directory: it has no metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _evals(records):
    return [r for r in records if r.get("split") == "eval"]


def summary_table(records: list[dict]) -> str:
    """Markdown: each eval metric at the start, at the end, and its best value."""
    evals = _evals(records)
    if not evals:
        return "(no evaluations)\n"
    first, last = evals[0], evals[-1]
    names = [k for k in last if k not in NOT_METRICS]
    lines = ["| metric | step 0 | final (step %d) | best |" % last["step"], "|---|---|---|---|"]
    for name in names:
        values = [r[name] for r in evals if name in r]
        best = min(values) if name.endswith(_LOWER_IS_BETTER) else max(values)
        lines.append(f"| {name} | {first.get(name, float('nan')):.4f} | {last[name]:.4f} | {best:.4f} |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, list[dict]], path: str) -> None:
    """One panel per metric: train loss, then every eval metric, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["train/loss"] + sorted({f"eval/{k}" for rs in runs.values() for r in _evals(rs) for k in r
                                      if k not in NOT_METRICS})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        split, name = panel.split("/")
        for label, records in runs.items():
            rows = [r for r in records if r.get("split") == split and name in r]
            ax.plot([r["step"] for r in rows], [r[name] for r in rows], marker="." if split == "eval" else None,
                    label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_summary(run_dir: str, cfg, records: list[dict]) -> str:
    text = (f"# {cfg.name}\n\nmodel `{cfg.model.path or cfg.model.family}` · space `{cfg.space.kind}` · optimizer "
            f"`{cfg.optimizer.method}` · task `{cfg.task.name}` · {cfg.steps} steps · seed {cfg.seed}\n\n"
            + summary_table(records))
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(text)
    plot_curves({cfg.name: records}, os.path.join(run_dir, "curves.png"))
    print("\n" + text)
    return text


def resolve_run(path: str) -> tuple[str, str]:
    """`(label, run_dir)`: a run directory itself, or for a sweep directory its best trial's first seed."""
    best = os.path.join(path, "best.yaml")
    if not os.path.isfile(os.path.join(path, "metrics.jsonl")) and os.path.isfile(best):
        with open(best) as f:
            header = f.readline()  # "# best trial N: ..."
        trial = int(header.split("best trial ")[1].split(":")[0])
        return f"{os.path.basename(os.path.normpath(path))} (best trial {trial})", os.path.join(path, f"trial_{trial}_seed_0")
    return os.path.basename(os.path.normpath(path)), path


def compare(run_dirs: list[str], out: str | None = None) -> str:
    """Side-by-side table of the final eval metrics of several runs or sweeps (their best trial), and
    their curves."""
    runs = {label: read_metrics(d) for label, d in map(resolve_run, run_dirs)}
    finals = {name: (_evals(rs)[-1] if _evals(rs) else {}) for name, rs in runs.items()}
    metrics = sorted({k for f in finals.values() for k in f if k not in NOT_METRICS})
    lines = ["| run | step | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, final in finals.items():
        cells = [f"{final[m]:.4f}" if m in final else "–" for m in metrics]
        lines.append(f"| {name} | {final.get('step', '–')} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(table)
        plot_curves(runs, os.path.join(out, "curves.png"))
    return table
