"""The benchmarks' --quick modes run end to end and write their JSON, Markdown (and plot)."""

from __future__ import annotations

import json
import os

from benchmarks import convergence, throughput

ALLOW_RANK_PROMOTION = True  # the throughput benchmark runs evosax's Open_ES


def test_throughput_quick_measures_every_method_and_marks_the_targets(tmp_path):
    payload = throughput.main(["--quick", "--out", str(tmp_path)])
    row = payload["rows"][0]
    for n, entry in row["populations"].items():
        assert entry["ceiling"]["tokens_per_s"] > 0
        for method in ("lowrank_es", "es"):
            assert entry[method]["step_s"] > 0 and entry[method]["peak_x_params"] > 0
        assert "fits" in entry["evosax_open_es"]
    assert row["spsa"]["forward_passes"] > 0 and row["backprop"]["step_s"] > 0
    assert [t["target"] for t in payload["targets"]] == list(throughput.TARGETS)
    text = open(tmp_path / "throughput_quick.md").read()
    assert "| target | measured | status |" in text and ("**met**" in text or "**not met**" in text)
    assert json.load(open(tmp_path / "throughput_quick.json"))["quick"] is True


def test_convergence_quick_compares_methods_at_an_equal_budget(tmp_path):
    payload = convergence.main(["--quick", "--out", str(tmp_path)])
    table = payload["table"]["grammar_lm"]["methods"]
    assert set(table) == {"es", "spsa", "adam"}
    assert table["es"]["steps"] * 16 == table["spsa"]["steps"] * 2 == table["adam"]["steps"] * 3 == 48
    assert table["adam"]["final_mean"] < table["adam"]["start"]  # the exact gradient makes progress
    for name in ("convergence_quick.json", "convergence_quick.md", "convergence_quick.png"):
        assert os.path.isfile(tmp_path / name)
