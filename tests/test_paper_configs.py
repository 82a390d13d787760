"""Every paper config validates at full scale, cites its source, and its `smoke` variant runs two steps."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from gfo.run.config import ConfigError, load_config
from gfo.run.train import train

ALLOW_RANK_PROMOTION = True  # bbt_sst2 runs evosax's CMA-ES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPERS = sorted(p for p in glob.glob(os.path.join(ROOT, "paper_configs", "*.yaml"))
                if not p.endswith("quickstart.yaml"))


def test_the_published_setups_are_all_there():
    names = {os.path.basename(p)[:-5] for p in PAPERS}
    assert {"mezo_roberta_sst2", "mezo_opt13b_sst2", "es_countdown", "eggroll_countdown", "openai_es",
            "bbt_sst2"} <= names


@pytest.mark.parametrize("path", PAPERS, ids=lambda p: os.path.basename(p)[:-5])
def test_full_config_validates_and_cites_its_paper(path):
    cfg = load_config(path)
    assert {"paper", "table", "settings", "checkpoint", "data"} <= set(cfg.reference), cfg.reference
    assert "arXiv" in cfg.reference["paper"]
    assert cfg.steps >= 400  # full scale, not the smoke run
    with pytest.raises(ConfigError, match="variant 'tiny' is not in"):
        load_config(path, variant="tiny")


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPERS, ids=lambda p: os.path.basename(p)[:-5])
def test_smoke_variant_runs_two_steps(path, tmp_path):
    cfg = load_config(path, [f"runs_dir={tmp_path}"], variant="smoke")
    result = train(cfg)
    train_rows = [r for r in result["records"] if r["split"] == "train"]
    logged = sorted({t for t in range(1, cfg.steps + 1) if t % cfg.log_every == 0} | {cfg.steps})
    assert cfg.steps == 2 and [r["step"] for r in train_rows] == logged
    assert all(np.isfinite(r["loss"]) for r in train_rows)
