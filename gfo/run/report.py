"""Run summaries and side-by-side reports: Markdown tables and PNG curves from `metrics.jsonl`."""

from __future__ import annotations

import json
import os

_LOWER_IS_BETTER = ("loss", "cross_entropy", "perplexity")



# Per-step estimator diagnostics (train records): signal-to-noise cosine of two halves, fitness spread.
DIAGNOSTICS = ("snr_cosine", "loss_std", "loss_range")

# Record fields that are not metrics: the step, the split, and the optimisation wall time.
NOT_METRICS = ("step", "split", "time_s")


class MetricsError(ValueError):
    """A `metrics.jsonl` line that is not a JSON record (other than a last line cut short by a kill)."""


def read_jsonl(path: str) -> list[dict]:
    """The records of a `metrics.jsonl`. A last line without its newline that does not parse is a write
    cut short (the process was killed mid-line) and is skipped; any other bad line is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        from gfo.errors import not_utf8

        raise MetricsError(f"{path} is not UTF-8 text ({not_utf8(path)}): expected one JSON record per "
                           f"line") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                break
            raise MetricsError(f"{path}:{i}: not a JSON record ({e.msg}): {line.strip()[:80]!r}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise MetricsError(f"{path}:{i}: expected a record with a 'step', got {line.strip()[:80]!r}")
        rows.append(row)
    return rows


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a gfo run directory: it has no metrics.jsonl")
    return read_jsonl(path)


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

    diagnostics = [f"train/{k}" for k in DIAGNOSTICS if any(k in r for rs in runs.values() for r in rs
                                                              if r.get("split") == "train")]
    panels = ["train/loss"] + diagnostics + sorted({f"eval/{k}" for rs in runs.values() for r in _evals(rs) for k in r
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


def selection_text(records: list[dict], select_by: str | None) -> str:
    """Markdown: the eval record chosen by `select_by` (a dev metric) and its test metrics."""
    from gfo.diagnostics import select

    row = select(records, select_by) if select_by else None
    if row is None:
        return ""
    cells = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in NOT_METRICS and not k.startswith("dev_"))
    return f"\n**Selected by {select_by}** ({row[select_by]:.4f}): step {row['step']} — test {cells}\n"


def diagnostics_text(records: list[dict]) -> str:
    """Markdown: mean and last value of the per-step estimator diagnostics, when logged."""
    train = [r for r in records if r.get("split") == "train"]
    names = [k for k in DIAGNOSTICS if any(k in r for r in train)]
    if not names:
        return ""
    lines = ["\n| diagnostic | mean over logged steps | last |", "|---|---|---|"]
    for k in names:
        values = [r[k] for r in train if k in r and r[k] == r[k]]
        if values:
            lines.append(f"| {k} | {sum(values) / len(values):.4g} | {values[-1]:.4g} |")
    return "\n".join(lines) + "\n"


def write_summary(run_dir: str, cfg, records: list[dict]) -> str:
    select_by = getattr(getattr(cfg, "eval", None), "select_by", None)
    text = (f"# {cfg.name}\n\nmodel `{cfg.model.path or cfg.model.family}` · space `{cfg.space.kind}` · optimizer "
            f"`{cfg.optimizer.method}` · task `{cfg.task.name}` · {cfg.steps} steps · seed {cfg.seed}\n\n"
            + summary_table(records) + selection_text(records, select_by) + diagnostics_text(records))
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


def _select_by(run_dir: str) -> str | None:
    """The run's `eval.select_by` from its config.yaml (None if unset or the file is absent; a garbage one
    is an error naming it)."""
    from gfo.run.config import read_run_config

    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return None
    eval_section = read_run_config(run_dir).get("eval")
    return eval_section.get("select_by") if isinstance(eval_section, dict) else None


def compare(run_dirs: list[str], out: str | None = None) -> str:
    """Side-by-side table of several runs or sweeps (their best trial): the final eval metrics, or the
    dev-selected record's where a run selects by dev (`eval.select_by`), the mean per-step diagnostics
    (`mean_snr_cosine`, `mean_loss_std`, …), and their curves."""
    from gfo.diagnostics import select

    resolved = [resolve_run(d) for d in run_dirs]
    runs = {label: read_metrics(d) for label, d in resolved}
    finals = {}
    for label, d in resolved:  # the dev-selected record where the run selects by dev, else the last
        rs, select_by = runs[label], _select_by(d)
        row = select(rs, select_by) if select_by else None
        finals[label] = dict(row or (_evals(rs)[-1] if _evals(rs) else {}))
        train = [r for r in rs if r.get("split") == "train"]
        for k in DIAGNOSTICS:  # per-step diagnostics: their mean over the logged steps
            values = [r[k] for r in train if k in r and r[k] == r[k]]
            if values:
                finals[label][f"mean_{k}"] = sum(values) / len(values)
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
