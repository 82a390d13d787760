"""The benchmarks' --quick modes run end to end and write their JSON, Markdown (and plot)."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import convergence, throughput
from benchmarks.common import mark

ALLOW_RANK_PROMOTION = True  # the throughput benchmark runs evosax's Open_ES


@pytest.mark.slow
def test_throughput_quick_measures_every_method_and_marks_the_targets(tmp_path):
    payload = throughput.main(["--quick", "--out", str(tmp_path)])
    row = payload["rows"][0]
    for n, entry in row["populations"].items():
        assert entry["ceiling"]["tokens_per_s"] > 0
        for method in ("lowrank_es", "es"):
            assert entry[method]["step_s"] > 0 and entry[method]["peak_x_params"] > 0
        assert "fits" in entry["evosax_open_es"]
    assert row["spsa"]["forward_passes"] > 0 and row["backprop"]["step_s"] > 0
    targets = {t["target"]: t["met"] for t in payload["targets"]}
    assert list(targets) == list(throughput.TARGETS)
    lowrank, es_memory, spsa, _ = throughput.TARGETS
    assert targets[lowrank] is None  # --quick measures no population >= 64: not judged
    # Seed-regenerated ES at a fixed chunk: XLA's compiled peak memory (deterministic, not a timing) must
    # not grow from population 8 to 16.
    assert targets[es_memory] is True
    assert targets[spsa] == (row["spsa"]["forward_passes"] <= 2.5)
    text = open(tmp_path / "throughput_quick.md").read()
    for t in payload["targets"]:
        assert f"| {t['target']} | {t['measured']} | {mark(t['met'])} |" in text
    assert json.load(open(tmp_path / "throughput_quick.json"))["quick"] is True


def _row(ratio_64: float, es_peaks: tuple[int, int], forward_passes: float, es_s: float, open_es_s: float) -> dict:
    """A throughput row with chosen measurements (populations 8 and 64, chunk 8)."""
    entry = lambda n, peak: {  # noqa: E731
        "lowrank_es": {"ratio_to_ceiling": ratio_64 if n == 64 else 0.1, "step_s": es_s, "peak_bytes": peak},
        "es": {"step_s": es_s, "peak_bytes": peak}, "evosax_open_es": {"step_s": open_es_s}}
    return {"chunk": 8, "populations": {8: entry(8, es_peaks[0]), 64: entry(64, es_peaks[1])},
            "spsa": {"forward_passes": forward_passes}}


def test_targets_are_judged_by_their_definitions():
    met = throughput.evaluate_targets([_row(0.95, (100, 110), 2.0, 1.0, 2.0)])
    assert [t["met"] for t in met] == [True, True, True, True]
    missed = throughput.evaluate_targets([_row(0.85, (100, 111), 2.6, 2.0, 1.0)])
    assert [t["met"] for t in missed] == [False, False, False, False]
    assert missed[0]["measured"] == "min ratio 0.85" and missed[3]["measured"] == "0/4 comparisons ahead"
    assert (mark(True), mark(False), mark(None)) == ("**met**", "**not met**", "n/a")


@pytest.mark.slow
def test_convergence_quick_compares_methods_at_an_equal_budget(tmp_path):
    payload = convergence.main(["--quick", "--out", str(tmp_path)])
    table = payload["table"]["grammar_lm"]["methods"]
    assert set(table) == {"es", "spsa", "adam"}
    assert table["es"]["steps"] * 16 == table["spsa"]["steps"] * 2 == table["adam"]["steps"] * 3 == 48
    assert table["adam"]["final_mean"] < table["adam"]["start"]  # the exact gradient makes progress
    for name in ("convergence_quick.json", "convergence_quick.md", "convergence_quick.png"):
        assert os.path.isfile(tmp_path / name)
