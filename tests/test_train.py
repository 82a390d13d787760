"""`gfo train` end to end: every optimizer family, exact resume, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
import yaml

from gfo.run import cli
from gfo.run.config import ConfigError, from_dict, load_config, RunConfig
from gfo.run.train import DivergenceError, RunCheckpointError, RunInterrupted, train

ALLOW_RANK_PROMOTION = True  # evosax runs here

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}


def _config(tmp_path, **sections) -> RunConfig:
    base = {"name": "run", "runs_dir": str(tmp_path), "steps": 4, "eval_every": 2, "log_every": 1,
            "checkpoint_every": 2, "model": {"family": "gpt2", "overrides": TINY},
            "task": {"name": "grammar_lm", "batch_size": 4, "eval_size": 4, "options": {"seq_len": 16}},
            "space": {"kind": "full"}, "optimizer": {"method": "backprop", "lr": 0.01}}
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(base.get(key), dict)
        if key == "optimizer" and "method" in value:  # another method: none of the default's fields
            merge = False
        base[key] = {**base[key], **value} if merge else value
    return from_dict(RunConfig, base)


FAMILIES = {
    "backprop+adam": {"optimizer": {"method": "backprop", "transform": "adam", "lr": 0.01}},
    "spsa+sgd": {"optimizer": {"method": "spsa", "transform": "sgd", "lr": 0.01, "eps": 1e-3, "n": 2}},
    "es": {"optimizer": {"method": "es", "population": 8, "sigma": 0.01, "eval_chunk": 4}},
    "lowrank_es": {"optimizer": {"method": "lowrank_es", "population": 8, "sigma": 0.01, "rank": 2}},
    # `jax.jit` methods (not `filter_jit`): compiled ahead through `gfo.optim.protocol.lower_step` too
    "zo_sgd_cons": {"optimizer": {"method": "zo_sgd_cons", "lr": 0.01, "eps": 1e-3}},
    "randopt": {"optimizer": {"method": "randopt", "population": 4, "sigma": 0.01, "top_k": 2}},
    "cma_es on subspace": {"space": {"kind": "subspace", "dim": 8}, "optimizer": {"method": "CMA_ES", "population": 6,
                                                                                 "sigma": 0.05}},
    "sep_cma_es on lora": {"space": {"kind": "lora", "rank": 1, "targets": ["q", "v"]},
                           "optimizer": {"method": "Sep_CMA_ES", "population": 6, "sigma": 0.05}},
    "policy_gradient": {"task": {"name": "countdown", "batch_size": 4, "eval_size": 4,
                                 "options": {"n_numbers": 2, "max_number": 4}},
                        "optimizer": {"method": "policy_gradient", "group_size": 2, "kl_coef": 0.01}},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_optimizer_family_runs_through_gfo_train(name, tmp_path, capsys):
    cfg = _config(tmp_path, **FAMILIES[name])
    result = train(cfg)
    # The step is compiled ahead and its XLA memory printed; the frozen base weights are among its arguments
    # (traced, not constants), so the arguments are at least the parameters' bytes for every space.
    line = re.search(r"compiled step in .* peak ([\d.]+) × params .*arguments ([\d.]+) ×", capsys.readouterr().out)
    assert line is not None
    peak, arguments = map(float, line.groups())
    assert arguments >= 1.0 and peak >= arguments
    run_dir = result["run_dir"]
    for f in ("config.yaml", "metrics.jsonl", "summary.md", "curves.png"):
        assert os.path.isfile(os.path.join(run_dir, f)), f
    assert os.listdir(os.path.join(run_dir, "tb"))
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")


def _interrupt_at(monkeypatch, n_calls):
    """Ctrl-C at the `n_calls`-th finiteness check of the loop (the host waiting on a step)."""
    import gfo.run.loop as loop_module

    real, calls = loop_module.fetch_finite, {"n": 0}

    def interrupting(flag):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise KeyboardInterrupt
        return real(flag)

    monkeypatch.setattr(loop_module, "fetch_finite", interrupting)


@pytest.mark.slow
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    # low-rank ES with Adam: parameters, optimizer moments, RNG (derived from the step) and data position
    sections = {**FAMILIES["lowrank_es"], "steps": 6}
    full = train(_config(tmp_path / "a", **sections))
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)  # dies waiting on step 4 (step 3 checked, after step 4's dispatch); checkpoint: step 2
        with pytest.raises(RunInterrupted, match=r"interrupted at step 3; checkpoint at step 2 in .*; rerun the "
                                                 r"same command to resume"):
            train(_config(tmp_path / "b", **sections))
    resumed = train(_config(tmp_path / "b", **sections))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 full["params"], resumed["params"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731 - wall time varies
    assert strip(full["records"]) == strip(resumed["records"])


@pytest.mark.slow
def test_the_loop_dispatches_step_t_plus_1_before_it_waits_on_step_t(tmp_path, monkeypatch):
    # nanodo's pipelining: the one device value the host waits on per step, its finiteness flag, is read
    # only once the next step is dispatched, so the device always has a step queued. A step whose state is
    # evaluated or saved is checked before that state is donated to the next step.
    from gfo.run import build

    from gfo import distributed
    dispatched, reads = [0], []
    real_build, real_to_host = build.build_optimizer_for, distributed.to_host

    def counting(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)
        real_step = optimizer.step

        def step(*a, **k):
            dispatched[0] += 1
            return real_step(*a, **k)

        optimizer.step = step
        return optimizer

    def reading(tree):
        leaves = jax.tree.leaves(tree)
        if len(leaves) == 1 and np.shape(leaves[0]) == () and np.asarray(leaves[0]).dtype == bool:  # a flag
            reads.append(dispatched[0])
        return real_to_host(tree)

    sections = {"steps": 6, "log_every": 1, "eval_every": 3}
    with monkeypatch.context() as m:
        m.setattr(build, "build_optimizer_for", counting)
        m.setattr(distributed, "to_host", reading)
        pipelined = train(_config(tmp_path, name="pipelined", checkpoint_every=6, **sections))
    # one read per step; step t's after step t+1's dispatch, except steps 3 (evaluated) and 6 (saved)
    assert reads == [2, 3, 3, 5, 6, 6]  # the loop that checked each step before the next: [1, 2, 3, 4, 5, 6]
    # every row is logged at its own step with the values of a run that checks every step at once
    synced = train(_config(tmp_path, name="synced", checkpoint_every=1, **sections))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731 - wall time varies
    assert strip(pipelined["records"]) == strip(synced["records"])
    assert [r["step"] for r in pipelined["records"] if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    times = [r["time_s"] for r in pipelined["records"] if r["split"] == "train"]
    assert times[0] == 0.0 and all(0 < a <= b for a, b in zip(times[1:], times[2:]))  # step 1: compilation


def test_unknown_key_wrong_type_and_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.sigmaa'; did you mean 'optimizer.sigma'"):
        load_config(None, ["optimizer.sigmaa=0.1"])
    with pytest.raises(ConfigError, match=r"'steps' = 'many' has type str; expected int"):
        load_config(None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"steps=0 is invalid"):
        load_config(None, ["steps=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"task.name='countdwn' is unknown"):
        train(_config(tmp_path, task={"name": "countdwn"}))
    with pytest.raises(ConfigError, match=r"Did you mean 'CMA_ES'"):
        train(_config(tmp_path, name="x", optimizer={"method": "cma-es2"}))


def _cli_error(capsys, argv, code=2) -> str:
    """The one line `gfo` prints for a failing command line (and its exit status is `code`)."""
    capsys.readouterr()  # only what this command prints
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_malformed_data_file_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "good", "label": 0}\n{"text": "bad", "label": 1,}\n')
    err = _cli_error(capsys, ["train", "--set", f"runs_dir={tmp_path}", "--set", "pretrain=null", "--set",
                              "task.name=prompt_classification", "--set", f"task.options={{data_path: {data}, k: 1}}",
                              "--set", "optimizer.method=spsa"])
    assert "data.jsonl:2: not valid JSON" in err
    assert not os.path.exists(tmp_path / "quickstart")  # a config that cannot run leaves no run directory


def test_user_errors_are_one_line_naming_the_value(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "scalar.yaml").write_text("3\n")
    ckpt = tmp_path / "garbage_ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    (tmp_path / "ckpt.yaml").write_text(f"model: {{path: {ckpt}}}\n")
    (tmp_path / "gpt3.yaml").write_text(f"model: {{path: {tmp_path}}}\n")
    (tmp_path / "config.json").write_text('{"model_type": "gpt3"}')
    (tmp_path / "nowhere.yaml").write_text("model: {path: /nonexistent}\n")
    runs = f"runs_dir={tmp_path / 'runs'}"
    cases = {
        (str(tmp_path / "list.yaml"),): "holds a list at its top level: expected a mapping",
        (str(tmp_path / "scalar.yaml"),): "holds an integer at its top level",
        (str(tmp_path),): "is a directory: expected a YAML file",
        (str(tmp_path / "ckpt.yaml"),): "garbage_ckpt/config.json: not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)",
        (str(tmp_path / "gpt3.yaml"),): "model_type='gpt3' is not supported",
        (str(tmp_path / "nowhere.yaml"),): "checkpoint '/nonexistent' does not exist: expected a Hugging Face checkpoint directory",
        ("--set", "task.batch_size=-3"): "'task.batch_size' = -3 is invalid: expected an integer >= 1",
        ("--set", "task.eval_size=0"): "'task.eval_size' = 0 is invalid: expected an integer >= 1",
        ("--set", "optimizer.transform=adamm"): "'optimizer.transform' = 'adamm' is not a valid choice (did you "
                                                 "mean 'adam'?): expected one of ['adam', 'adamw', 'adam_l2', 'sgd']",
        ("--set", "model.dtype=fp32"): "'model.dtype' = 'fp32' is not a valid choice",
        ("--set", "optimizer.n=2"): "optimizer.n does not apply to method 'lowrank_es'",
        ("--set", "optimizer.momentum=0.9"): "optimizer.momentum does not apply to transform 'adam'",
        ("--set", "pretrain.optimizer.sigma=0.1"): "pretrain.optimizer.sigma does not apply to method 'backprop'",
    }
    for args, expected in cases.items():
        err = _cli_error(capsys, ["train", *args, "--set", runs])
        assert err.startswith("gfo train: error: ") and expected in err, (args, err)
    assert not os.path.exists(tmp_path / "runs")
    assert _cli_error(capsys, ["trian"]).startswith("gfo: unknown command 'trian' (did you mean 'train'?)")


def test_switching_method_drops_the_fields_of_the_previous_one():
    cfg = load_config(None, ["optimizer.method=spsa", "optimizer.n=2"])  # the quickstart's ES fields go
    assert (cfg.optimizer.method, cfg.optimizer.n, type(cfg.optimizer).__name__) == ("spsa", 2, "SPSASection")
    assert not hasattr(cfg.optimizer, "population") and cfg.optimizer.eps == 1e-2  # SPSA's own section
    assert cfg.optimizer.lr == 0.002  # a field spsa reads too stays


def test_name_defaults_to_the_config_files_stem(tmp_path):
    (tmp_path / "my_run.yaml").write_text("steps: 3\n")
    assert load_config(str(tmp_path / "my_run.yaml")).name == "my_run"
    (tmp_path / "named.yaml").write_text("name: other\n")
    assert load_config(str(tmp_path / "named.yaml")).name == "other"


@pytest.mark.slow
def test_failed_start_does_not_block_its_fix_and_a_finished_run_is_not_shortened(tmp_path):
    bad = _config(tmp_path, task={"options": {"seq_len": 16, "no_such_option": 1}})
    with pytest.raises(ConfigError, match="no_such_option"):
        train(bad)
    assert not os.path.exists(tmp_path / "run")
    # a start that wrote its config but saved no checkpoint (e.g. killed during compilation)
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"name": "run", "seed": 7}))
    result = train(_config(tmp_path, steps=2))  # the corrected command starts the run
    with pytest.raises(ConfigError, match=r"steps=1 is shorter than the 2 steps .* has already run"):
        train(_config(tmp_path, steps=1))
    saved = yaml.safe_load(open(os.path.join(result["run_dir"], "config.yaml")))
    assert saved["steps"] == 2 and saved["seed"] == 0


def test_a_truncated_last_metrics_line_is_skipped_and_a_bad_middle_line_named(tmp_path, capsys):
    from gfo.run.report import read_metrics

    run = tmp_path / "run"
    run.mkdir()
    good = '{"step": 0, "split": "eval", "x": 1.0}\n{"step": 2, "split": "eval", "x": 0.5}\n'
    (run / "metrics.jsonl").write_text(good + '{"step": 4, "spl')  # killed mid-write
    assert [r["step"] for r in read_metrics(str(run))] == [0, 2]
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 2, "spl\n{"step": 4}\n')
    err = _cli_error(capsys, ["report", str(run)])
    assert "metrics.jsonl:2: not a JSON record" in err


def test_ctrl_c_and_divergence_are_one_line_with_their_exit_status(monkeypatch, capsys):
    def interrupted(argv):
        raise RunInterrupted("[es] interrupted at step 7; checkpoint at step 5 in runs/x/checkpoints; rerun the "
                             "same command to resume")

    def diverged(argv):
        raise DivergenceError("[es] parameters became non-finite at step 3 (loss nan); no checkpoint had been saved")

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert "interrupted at step 7; checkpoint at step 5" in _cli_error(capsys, ["train"], code=130)
    monkeypatch.setitem(cli.COMMANDS, "train", diverged)
    assert "non-finite at step 3" in _cli_error(capsys, ["train"], code=1)


def test_help_lists_every_command(capsys):
    for argv in (["--help"], ["help"]):
        cli.main(argv)  # returns: exit status 0
        out = capsys.readouterr().out
        assert all(f"\n  {name} " in out for name in cli.COMMANDS), out
    with pytest.raises(SystemExit):
        cli.main(["help", "demo"])
    out = capsys.readouterr().out
    assert "{gpt2,llama,opt}" in out and "nucleus sampling)." in out  # the whole description, every family


@pytest.mark.slow
def test_eval_and_report_and_checkpoint_errors(tmp_path, capsys):
    cfg = _config(tmp_path)
    result = train(cfg)
    cli.main(["eval", result["run_dir"]])
    assert "perplexity" in capsys.readouterr().out
    cli.main(["report", result["run_dir"], result["run_dir"], "--out", str(tmp_path / "report")])
    assert "| run | step |" in capsys.readouterr().out and os.path.isfile(tmp_path / "report" / "curves.png")
    assert "no config.yaml" in _cli_error(capsys, ["eval", str(tmp_path / "nothing")])
    missing = tmp_path / "fresh"
    os.makedirs(missing)
    (missing / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(open(os.path.join(result["run_dir"], "config.yaml")))))
    assert "no checkpoint directory" in _cli_error(capsys, ["eval", str(missing)])
    # corrupt the latest checkpoint: resuming must fail loudly, never restart from scratch
    ckpt = os.path.join(result["run_dir"], "checkpoints", "4")
    for root, _, files in os.walk(ckpt):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(RunCheckpointError, match="checkpoint step 4 in .* fails verification") as err:
        train(cfg, strict=True)  # without --strict it resumes from step 2 (tests/test_faults.py)
    assert len(str(err.value)) < 600 and "\n" not in str(err.value)  # no TensorStore spec dump
    with pytest.raises(ConfigError, match="different config"):
        train(_config(tmp_path, optimizer={"lr": 0.5}))


@pytest.mark.slow
def test_divergence_stops_the_run_at_its_step_and_never_saves_a_non_finite_state(tmp_path):
    from gfo.run.evaluate import restore_run

    sgd = {"method": "backprop", "transform": "sgd", "lr": 1e5}  # finite for a few steps, then overflows
    # every step checked before the next is dispatched (a checkpoint each step), and the pipelined loop
    # (step t checked after step t+1's dispatch; a checkpoint every 2) stop at the same step
    errors = {}
    for name, every in (("synced", 1), ("pipelined", 2)):
        with pytest.raises(DivergenceError, match="non-finite") as err:
            train(_config(tmp_path, name=name, steps=8, eval_every=8, checkpoint_every=every, optimizer=sgd))
        errors[name] = str(err.value)
    step = int(re.search(r"non-finite at step (\d+) \(loss", errors["synced"]).group(1))
    for name, every in (("synced", 1), ("pipelined", 2)):
        run_dir = os.path.join(tmp_path, name)
        last = (step - 1) // every * every  # the last checkpoint step before the non-finite one
        ckpts = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
        assert ckpts == list(range(every, last + 1, every))[-3:]  # the last `keep_checkpoints`, none past `last`
        kept = (f"the last good checkpoint is kept in {os.path.abspath(os.path.join(run_dir, 'checkpoints'))} "
                f"(step {last})" if last else "no checkpoint had been saved yet")
        assert errors[name].startswith(f"[backprop] parameters became non-finite at step {step} (loss ")
        assert errors[name].endswith(f"; {kept}. Lower the learning rate or the perturbation scale (sigma / eps).")
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, step))  # not the bad step's
        if last:  # the kept checkpoint is finite, and resumable
            _, run, state, restored = restore_run(run_dir)
            assert restored == last
            assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(run.optimizer.solution(state)))
    assert step >= 3, "choose an lr that diverges later: the pipelined case should keep a checkpoint"
    with pytest.raises(DivergenceError, match=r"at step \d+ .*no checkpoint had been saved yet") as err:
        train(_config(tmp_path, name="early", steps=6, checkpoint_every=6,
                      optimizer={"method": "backprop", "transform": "sgd", "lr": 1e30}))
    assert "None" not in str(err.value)


def test_embedded_quickstart_and_its_yaml_agree():
    embedded = load_config(None)
    on_disk = load_config(os.path.join(os.path.dirname(__file__), "..", "paper_configs", "quickstart.yaml"))
    assert embedded == on_disk
    assert embedded.pretrain is not None and embedded.optimizer.method == "lowrank_es"
