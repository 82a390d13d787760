"""Nothing lost, nothing silent: one writer per run directory, metrics written once per step, verified
checkpoints, and config values refused by name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

from gfo.run import cli
from gfo.run.config import ConfigError, from_dict, load_config, RunConfig
from gfo.run.train import train
from tests.test_train import _cli_error  # the one line of a failing command line

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}


def _data(tmp_path, **top) -> dict:
    return {"name": "run", "runs_dir": str(tmp_path), "steps": 4, "eval_every": 2, "log_every": 1,
            "checkpoint_every": 2, "model": {"family": "gpt2", "overrides": TINY},
            "task": {"name": "grammar_lm", "batch_size": 4, "eval_size": 4, "options": {"seq_len": 16}},
            "space": {"kind": "full"}, "optimizer": {"method": "backprop", "lr": 0.01}, **top}


def _config(tmp_path, **top) -> RunConfig:
    return from_dict(RunConfig, _data(tmp_path, **top))


def _config_file(tmp_path, **top) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_data(tmp_path, **top)))
    return str(path)


def _run_error(capsys, argv, code=1) -> str:
    """The one `gfo train:` line a run that had started prints when it stops (after its progress bar, which
    shares stderr), with exit status `code` and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and sum("gfo train:" in line for line in lines) == 1
    return "gfo train:" + lines[-1].split("gfo train:")[-1]


def _steps(run_dir) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["split"]) for r in rows]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _first_fast(cases: list) -> list:
    """`cases` for a parametrized CLI test: the first in the fast tier, the others `slow` (each builds the
    model before the failing part, ~2 s on 2 cores); a fast test checks every case's message directly."""
    return [case if i == 0 else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)
            for i, case in enumerate(cases)]


# ----------------------------------------------------------------------------- 1. one writer per run directory
@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_a_second_train_on_a_locked_run_directory_exits_2_naming_the_holder(tmp_path, capsys):
    config = _config_file(tmp_path)
    cli.main(["train", config])  # a first run: 4 steps, checkpoints 2 and 4
    run_dir = tmp_path / "run"
    assert not (run_dir / ".lock").exists()  # released on exit
    before = (run_dir / "metrics.jsonl").read_text()
    host = socket.gethostname()
    (run_dir / ".lock").write_text(f"{host} {os.getpid()}\n")  # a live holder: this test's process
    err = _cli_error(capsys, ["train", config, "--set", "steps=6"])
    assert err.startswith("gfo train: error: run directory ") and "in use by another gfo train" in err
    assert f"host {host}, pid {os.getpid()}" in err and str(run_dir) in err
    assert (run_dir / ".lock").read_text() == f"{host} {os.getpid()}\n"  # the holder's lock stays
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing of the first run is touched
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
    # a stale lock (its pid is gone) is taken over, saying so, and released at the end
    dead = _dead_pid()
    (run_dir / ".lock").write_text(f"{host} {dead}\n")
    cli.main(["train", config, "--set", "steps=6"])
    out = capsys.readouterr().out
    assert f"taking over the stale lock {run_dir / '.lock'} of {host} pid {dead}" in out
    assert not (run_dir / ".lock").exists()
    assert [s for s, split in _steps(run_dir) if split == "train"] == [1, 2, 3, 4, 5, 6]


def test_the_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
    import gfo.run.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "run_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path))
    assert not (tmp_path / "run" / ".lock").exists()


# ----------------------------------------------------------------------------- 2. metrics.jsonl once per step
@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_a_metrics_line_cut_mid_record_is_dropped_and_every_step_logged_once(tmp_path, capsys):
    first = train(_config(tmp_path))
    run_dir = first["run_dir"]
    path = os.path.join(run_dir, "metrics.jsonl")
    text = open(path).read()
    last = json.loads(text.splitlines()[-1])
    assert (last["step"], last["split"]) == (4, "eval")
    with open(path, "w") as f:  # killed while writing step 4's evaluation
        f.write(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    resumed = train(_config(tmp_path, steps=6))
    steps = _steps(run_dir)
    assert sorted(steps) == sorted(set(steps))  # every (step, split) once
    assert [s for s, split in steps if split == "train"] == [1, 2, 3, 4, 5, 6]
    assert [s for s, split in steps if split == "eval"] == [0, 2, 4, 6]
    again = [r for r in resumed["records"] if (r["step"], r["split"]) == (4, "eval")]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in again] == [
        {k: v for k, v in last.items() if k != "time_s"}]  # the same state evaluated again
    assert "final (step 6)" in open(os.path.join(run_dir, "summary.md")).read()
    assert not os.path.exists(path + ".tmp")


# ----------------------------------------------------------------------------- 3. checkpoint integrity
def _flip_largest_file(step_dir) -> str:
    files = [os.path.join(root, f) for root, _, fs in os.walk(step_dir) for f in fs if f != "gfo_manifest.json"]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        data = bytearray(f.read())
        for i in range(0, min(len(data), 64), 8):
            data[len(data) // 2 + i - 32 if len(data) > 64 else i] ^= 0xFF
        f.seek(0)
        f.write(bytes(data))
    return largest


@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys):
    full = train(_config(tmp_path / "a", steps=6))
    run_dir = train(_config(tmp_path / "b"))["run_dir"]  # checkpoints 2 and 4, each with its manifest
    for step in ("2", "4"):
        manifest = json.load(open(os.path.join(run_dir, "checkpoints", step, "gfo_manifest.json")))
        assert manifest["step"] == int(step) and manifest["files"] and manifest["config_fingerprint"]
    bad = _flip_largest_file(os.path.join(run_dir, "checkpoints", "4"))
    capsys.readouterr()
    resumed = train(_config(tmp_path / "b", steps=6))
    out = capsys.readouterr().out
    assert f"checkpoint step 4 fails verification ({bad} does not match its sha256" in out
    assert "skipped, resuming from step 2" in out and "resuming " + run_dir + " from step 2" in out
    kept = os.path.join(run_dir, "corrupt_checkpoints", "4")
    assert os.path.isfile(os.path.join(kept, os.path.relpath(bad, os.path.join(run_dir, "checkpoints", "4"))))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 full["params"], resumed["params"])
    assert [s for s, split in _steps(run_dir) if split == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_strict_refuses_a_corrupt_checkpoint_and_a_stray_directory_is_refused(tmp_path, capsys):
    config = _config_file(tmp_path)
    cli.main(["train", config])
    run_dir = tmp_path / "run"
    before = (run_dir / "metrics.jsonl").read_text()
    bad = _flip_largest_file(run_dir / "checkpoints" / "4")
    err = _cli_error(capsys, ["train", config, "--strict", "--set", "steps=6"])
    assert err.startswith("gfo train: error: checkpoint step 4 in ") and "fails verification" in err
    assert bad in err and "--strict refuses it" in err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]  # nothing removed or moved
    assert (run_dir / "metrics.jsonl").read_text() == before
    os.makedirs(run_dir / "checkpoints" / "999")
    err = _cli_error(capsys, ["train", config, "--set", "steps=6"])
    assert f"{run_dir / 'checkpoints' / '999'} holds no orbax checkpoint" in err
    os.rmdir(run_dir / "checkpoints" / "999")
    os.makedirs(run_dir / "checkpoints" / "old")
    err = _cli_error(capsys, ["train", config, "--set", "steps=6"])
    assert f"{run_dir / 'checkpoints' / 'old'} is not a checkpoint step" in err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4", "old"]
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_checkpoints_of_an_earlier_gfo_resume_unverified(tmp_path, capsys):
    run_dir = train(_config(tmp_path))["run_dir"]
    for step in ("2", "4"):
        os.remove(os.path.join(run_dir, "checkpoints", step, "gfo_manifest.json"))
    capsys.readouterr()
    train(_config(tmp_path, steps=6))
    out = capsys.readouterr().out
    assert out.count("have no gfo_manifest.json (written by an earlier gfo): resuming from step 4 unverified") == 1
    assert [s for s, split in _steps(run_dir) if split == "train"] == [1, 2, 3, 4, 5, 6]
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "6", "gfo_manifest.json"))


# ----------------------------------------------------------------------------- 4. config values refused by name
@pytest.mark.parametrize("override, expected", [
    ("name=a/b", "name='a/b' is invalid: a run name is one path component"),
    ("name=..", "name='..' is invalid"),
    ("name=''", "name='' is invalid"),
    ("name=/tmp/abs", "name='/tmp/abs' is invalid"),
    ("optimizer.lr=.inf", "config key 'optimizer.lr' = inf is invalid: expected a finite number"),
    ("optimizer.sigma=nan", "config key 'optimizer.sigma' = nan is invalid: expected a finite number"),
    ("eval.temperature=-.inf", "config key 'eval.temperature' = -inf is invalid"),
    ("seed=-1", "seed=-1 is out of range: expected an integer in [0, 2**32 - 1]"),
    ("seed=4294967296", "seed=4294967296 is out of range"),
])
def test_bad_config_values_are_named(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_duplicate_keys_and_an_empty_file_are_errors_naming_them(tmp_path, capsys):
    assert load_config(None, ["seed=4294967295"]).seed == 2**32 - 1
    dup = tmp_path / "dup.yaml"
    dup.write_text("steps: 3\noptimizer:\n  lr: 0.1\n  sigma: 0.01\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"config file '.*dup.yaml' gives key 'lr' twice \(line 5\)"):
        load_config(str(dup))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"config file '.*empty.yaml' is empty"):
        load_config(str(empty))
    runs = f"runs_dir={tmp_path / 'runs'}"
    err = _cli_error(capsys, ["train", str(dup), "--set", runs])
    assert err.startswith("gfo train: error: config file ") and "gives key 'lr' twice" in err
    err = _cli_error(capsys, ["train", "--set", "name=../escape", "--set", runs])
    assert "name='../escape' is invalid" in err
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "escape")


# ----------------------------------------------------------------------------- 5. storage faults
def _disk_full_at_step_4(monkeypatch, name: str):
    """`gfo.run.checkpoint.<name>(…, step, …)` fails with ENOSPC at step 4 (its second argument); returns the
    original function (to put back for the resume)."""
    from gfo.run import checkpoint

    original = getattr(checkpoint, name)

    def full_disk(first, step, *rest):
        if step == 4:
            raise OSError(28, "No space left on device")
        return original(first, step, *rest)

    monkeypatch.setattr(checkpoint, name, full_disk)
    return original


@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_a_failed_checkpoint_save_stops_the_run_naming_the_safe_checkpoint(tmp_path, capsys, monkeypatch):
    from gfo.run import checkpoint

    original = _disk_full_at_step_4(monkeypatch, "save")
    config = _config_file(tmp_path, steps=6)
    err = _run_error(capsys, ["train", config])
    run_dir = tmp_path / "run"
    assert err.startswith("gfo train: saving checkpoint step 4 in ") and "No space left on device" in err
    assert "the run stopped at step 4" in err and "the last safe checkpoint is step 2" in err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2"]
    assert checkpoint.verify(str(run_dir / "checkpoints" / "2"), None) is None
    assert not (run_dir / ".lock").exists()
    monkeypatch.setattr(checkpoint, "save", original)
    capsys.readouterr()
    cli.main(["train", config])
    assert f"resuming {run_dir} from step 2" in capsys.readouterr().out
    assert [s for s, split in _steps(run_dir) if split == "train"] == [1, 2, 3, 4, 5, 6]
    assert "6" in os.listdir(run_dir / "checkpoints")


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(28, "No space left on device")])
def test_a_run_directory_that_cannot_be_created_is_one_line_before_anything_is_written(tmp_path, capsys,
                                                                                       monkeypatch, error):
    makedirs = os.makedirs

    def refused(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise type(error)(error.errno, error.strerror, str(path))
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refused)
    err = _cli_error(capsys, ["train", _config_file(tmp_path)])
    assert err.startswith(f"gfo train: error: run directory {tmp_path / 'run'} cannot be written ({error.strerror}")
    assert os.listdir(tmp_path) == ["run.yaml"]


@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_config_yaml_is_written_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    import builtins

    import gfo.run.train as train_module

    config = _config_file(tmp_path)
    run_dir = tmp_path / "run"
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(run_dir)) and any(c in mode for c in "wa"):
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    err = _cli_error(capsys, ["train", config])
    assert err.startswith(f"gfo train: error: run directory {run_dir} cannot be written (No space left on device")
    assert os.listdir(run_dir) == []  # no config.yaml, no temporary, the lock released
    monkeypatch.setattr(builtins, "open", real_open)
    cli.main(["train", config])
    before = (run_dir / "config.yaml").read_text()
    assert yaml.safe_load(before)["steps"] == 4

    def cut(data, stream, **kwargs):  # the disk fills while config.yaml is written
        stream.write("steps: ")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module.yaml, "safe_dump", cut)
    err = _cli_error(capsys, ["train", config, "--set", "steps=6"])
    assert "cannot be written (No space left on device)" in err
    assert (run_dir / "config.yaml").read_text() == before  # the previous one stands, never a cut one
    assert not (run_dir / "config.yaml.tmp").exists() and not (run_dir / ".lock").exists()


# ----------------------------------------------------------------------------- 6. config errors at the dry build
@pytest.mark.parametrize("space, expected", [
    ({"kind": "full", "filter": "attn/(q"}, "space.filter='attn/(q' is not a valid regular expression: missing ), "),
    ({"kind": "full", "filter": "no_such_leaf"}, "space.filter='no_such_leaf' selects no parameter; the "),
    ({"kind": "lora", "targets": ["q_proj"]}, "LoRA targets ['q_proj'] are not projections"),
    ({"kind": "lora", "targets": ["gate"]}, "space.targets=['gate'] match no kernel of this model; its kernel paths "
                                            "include ['"),
    ({"kind": "lora", "targets": ["q", 1]}, "space.targets=['q', 1] is invalid: expected a list of projection names"),
])
def test_space_filter_and_targets_errors_are_one_line_before_any_run_directory(tmp_path, capsys, space, expected):
    err = _cli_error(capsys, ["train", _config_file(tmp_path, space=space)])
    assert err.startswith("gfo train: error: ") and expected in err, err
    if "selects no parameter" in expected:
        assert "'" + "layers/" in err or "wte" in err or "embed" in err  # a few real parameter paths are listed
    assert os.listdir(tmp_path) == ["run.yaml"]


def test_lora_targets_matching_no_kernel_list_real_paths(tmp_path, capsys):
    from gfo import spaces
    import models

    params = {"embed": {"wte": np.zeros((4, 2))}, "mlp": {"fc": {"kernel": np.zeros((2, 2))}}}
    with pytest.raises(ValueError, match=r"targets=\['q', 'v'\] match no kernel of this model; its kernel paths "
                                         r"include \['mlp/fc/kernel'\]"):
        spaces.LoRA(params)
    assert models.lora.PROJECTIONS


# ----------------------------------------------------------------------------- 7. an unreadable model checkpoint
@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_a_truncated_or_random_model_safetensors_is_one_line_naming_it(tmp_path, capsys, damage):
    import models

    model = models.TransformerLM(models.tiny("gpt2"))
    params = model.init(jax.random.key(0))
    ckpt = tmp_path / "ckpt"
    models.save_pretrained(model, params, str(ckpt))
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(models.CheckpointError, match="is not a readable safetensors file"):
        models.from_pretrained(str(ckpt))
    runs = tmp_path / "runs"
    runs.mkdir()
    err = _cli_error(capsys, ["train", _config_file(runs, model={"path": str(ckpt)})])
    assert err.startswith(f"gfo train: error: {weights} is not a readable safetensors file (")
    assert "truncated or corrupt" in err
    assert os.listdir(runs) == ["run.yaml"]


@pytest.mark.slow  # an end-to-end run (over ~6 s on 2 cores)
def test_a_manifest_that_cannot_be_written_stops_the_run_naming_it(tmp_path, capsys, monkeypatch):
    from gfo.run import checkpoint

    original = _disk_full_at_step_4(monkeypatch, "write_manifest")
    config = _config_file(tmp_path, steps=6)
    err = _run_error(capsys, ["train", config])
    run_dir = tmp_path / "run"
    assert err.startswith(f"gfo train: writing the manifest of checkpoint step 4 in {run_dir / 'checkpoints'} "
                          f"failed (OSError: [Errno 28] No space left on device)")
    assert "the run stopped at step 6" in err and "the last safe checkpoint is step 2" in err
    assert checkpoint.verify(str(run_dir / "checkpoints" / "2"), None) is None
    monkeypatch.setattr(checkpoint, "write_manifest", original)
    capsys.readouterr()
    cli.main(["train", config])
    out = capsys.readouterr().out
    assert "checkpoint step 4 fails verification (no gfo_manifest.json)" in out
    assert f"resuming {run_dir} from step 2" in out
    assert [s for s, split in _steps(run_dir) if split == "train"] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- 8. every command: one line, or a log
COMMANDS = ["train", "eval", "decode", "report", "sweep", "export"]  # export: any command added later


def _raising(error, run_dir=None):
    def command(argv):
        if run_dir is not None:
            from gfo import errors

            errors.note_run_dir(run_dir)
        raise error

    return command


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("error, expected", [
    (FileNotFoundError(2, "No such file or directory", "/data/train.jsonl"), "/data/train.jsonl: No such file or directory"),
    (PermissionError(13, "Permission denied", "/runs/x/metrics.jsonl"), "/runs/x/metrics.jsonl: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/data/dir"), "/data/dir: Is a directory"),
    (OSError(28, "No space left on device", "/runs/x/decode.md"), "/runs/x/decode.md: No space left on device"),
    (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), "byte 0xff at offset 2 (invalid start byte)"),
    (yaml.YAMLError("mapping values are not allowed here"), "mapping values are not allowed here"),
])
def test_every_command_turns_an_anticipated_error_into_one_line_exit_2(monkeypatch, capsys, command, error, expected):
    monkeypatch.setitem(cli.COMMANDS, command, _raising(error))
    err = _cli_error(capsys, [command, "x"])
    assert err == f"gfo {command}: error: {expected}" if "byte" not in expected else expected in err, err


def test_a_safetensors_error_is_one_line_exit_2(monkeypatch, capsys):
    from safetensors.numpy import load

    try:
        load(b"garbage")
    except Exception as e:  # noqa: BLE001 - the reader's own error type
        error = e
    monkeypatch.setitem(cli.COMMANDS, "export", _raising(error))
    assert "header too small" in _cli_error(capsys, ["export", "x"])


def _internal_error(capsys, argv) -> tuple[str, str]:
    """The two lines of an unanticipated error (exit 1) and the log file they name."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in "\n".join(lines), lines
    log = lines[1].split("the full traceback is in ")[1].split(" (rerun with --debug")[0]
    return "\n".join(lines), log


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unanticipated_error_is_two_lines_naming_the_log_of_its_traceback(monkeypatch, capsys, tmp_path, command):
    monkeypatch.setitem(cli.COMMANDS, command, _raising(ZeroDivisionError("float division by zero")))
    text, log = _internal_error(capsys, [command, "x"])
    assert text.startswith(f"gfo {command}: internal error: ZeroDivisionError: float division by zero\n")
    assert "GFO_DEBUG=1" in text
    written = open(log).read()
    assert "Traceback (most recent call last)" in written and "ZeroDivisionError: float division by zero" in written
    assert f"gfo {command} x" in written
    os.remove(log)
    # once the command knows its run directory, the traceback goes to RUN/error.log (appended)
    monkeypatch.setitem(cli.COMMANDS, command, _raising(KeyError("step"), run_dir=str(tmp_path)))
    for _ in range(2):
        text, log = _internal_error(capsys, [command, "x"])
        assert log == str(tmp_path / "error.log") and "internal error: KeyError: 'step'" in text
    assert open(log).read().count("KeyError: 'step'") == 2


def test_debug_flag_and_env_reraise(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "export", _raising(ZeroDivisionError("boom")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["export", "x", "--debug"])
    with pytest.raises(FileNotFoundError):  # a user error too: the developer sees where it was raised
        monkeypatch.setitem(cli.COMMANDS, "export", _raising(FileNotFoundError(2, "No such file", "/x")))
        cli.main(["--debug", "export", "x"])
    monkeypatch.setenv("GFO_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["export", "x"])
    monkeypatch.setenv("GFO_DEBUG", "0")
    assert _cli_error(capsys, ["export", "x"]) == "gfo export: error: /x: No such file"


def test_the_debug_flag_is_not_passed_to_the_command(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "export", seen.append)
    cli.main(["export", "--debug", "a"])
    assert seen == [["a"]]


# ----------------------------------------------------------------------------- 9. a garbage config.yaml in a run directory
GARBAGE = {
    "random bytes": (bytes(range(128, 256)) * 3, "is not UTF-8 text (byte 0x80 at offset 0 (line 1))"),
    "not YAML": (b"name: [run\nsteps: 4\n", "is not valid YAML ("),
    "a list": (b"- name\n- steps\n", "holds a list at its top level"),
    "empty": (b"", "is empty"),
}


@pytest.mark.parametrize("command", ["train", "eval", "decode", "report"])
@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_a_garbage_run_config_is_one_line_naming_it(tmp_path, capsys, command, garbage):
    from gfo.run import checkpoint

    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "checkpoints" / "2")  # a run with progress: `gfo train` resumes it, reading config.yaml
    (run_dir / "checkpoints" / "2" / checkpoint._ORBAX_DATA).write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "split": "eval", "cross_entropy": 1.0}\n')
    content, expected = GARBAGE[garbage]
    (run_dir / "config.yaml").write_bytes(content)
    argv = ["train", _config_file(tmp_path)] if command == "train" else [command, str(run_dir)]
    err = _cli_error(capsys, argv)
    assert err.startswith(f"gfo {command}: error: run config '{run_dir / 'config.yaml'}' {expected}"), err
    assert "expected the mapping of the run's resolved config that gfo train writes there" in err
    if command == "train":
        assert err.endswith("restore it, or start afresh under another name (--set name=...)")
    assert (run_dir / "config.yaml").read_bytes() == content  # nothing rewritten


def test_a_non_utf8_metrics_file_is_one_line_naming_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    (run_dir / "metrics.jsonl").write_bytes(b'{"step": 0, "split": "eval"}\n{"step": 1\xff}\n')
    err = _cli_error(capsys, ["report", str(run_dir)])
    assert err == (f"gfo report: error: {run_dir / 'metrics.jsonl'} is not UTF-8 text (byte 0xff at offset 39 "
                   f"(line 2)): expected one JSON record per line")


# ----------------------------------------------------------------------------- 10. data files: not UTF-8, a directory
LATIN1 = "caf\xe9 au lait\n".encode("latin-1")  # 0xe9 at offset 3 of the line


def _data_case(tmp_path, case):
    """(task section, the file it names, what the line says) of one unreadable data file."""
    good = '{"text": "a b", "label": 0}\n'
    if case == "text_lm not UTF-8":
        path = tmp_path / "corpus.txt"
        path.write_bytes(b"plain line\n" * 3 + LATIN1)
        return {"name": "text_lm", "options": {"data_path": str(path), "seq_len": 8}}, path, \
            "is not UTF-8 text (byte 0xe9 at offset 36 (line 4))"
    if case == "text_lm a directory":
        return {"name": "text_lm", "options": {"data_path": str(tmp_path), "seq_len": 8}}, tmp_path, \
            "text file '{}' is a directory: expected a text file"
    if case == "classification JSONL not UTF-8":
        path = tmp_path / "train.jsonl"
        path.write_bytes(good.encode() + b'{"text": "caf\xe9", "label": 1}\n')
        return {"name": "prompt_classification", "options": {"data_path": str(path), "k": 1}}, path, \
            f"JSONL file '{path}' is not UTF-8 text (byte 0xe9 at offset {len(good) + 13} (line 2))"
    if case == "classification CSV not UTF-8":
        path = tmp_path / "train.csv"
        path.write_bytes(b"text,label\n" + LATIN1.rstrip() + b",1\n")
        return {"name": "prompt_classification", "options": {"data_path": str(path), "k": 1}}, path, \
            "table file '{}' is not UTF-8 text (byte 0xe9 at offset 14 (line 2))"
    if case == "countdown JSON not UTF-8":
        path = tmp_path / "countdown.json"
        data = b'[{"numbers": [1, 2], "target": 3, "solution": "1+2\xe9"}]'
        path.write_bytes(data)
        return {"name": "countdown", "objective": "cross_entropy", "options": {"data_path": str(path)}}, path, \
            "JSON file '{}' is not UTF-8 text (byte 0xe9 at offset %d (line 1))" % data.index(b"\xe9")
    if case == "countdown a directory":
        return {"name": "countdown", "objective": "cross_entropy", "options": {"data_path": str(tmp_path)}}, \
            tmp_path, "data file '{}' is a directory, and not a `datasets` directory"
    if case == "chat template not UTF-8":
        path = tmp_path / "template.jinja"
        path.write_bytes(b"{{ messages[0]['content'] }} \xe9")
        return {"name": "countdown", "chat_template": str(path)}, path, \
            "chat_template file '{}' is not UTF-8 text (byte 0xe9 at offset 29"
    raise AssertionError(case)


DATA_CASES = ["text_lm not UTF-8", "text_lm a directory", "classification JSONL not UTF-8",
              "classification CSV not UTF-8", "countdown JSON not UTF-8", "countdown a directory",
              "chat template not UTF-8"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_a_data_file_that_is_not_utf8_or_is_a_directory_is_named_by_the_task(tmp_path, case):
    from gfo.run.build import build_task
    from gfo.run.config import TaskSection

    task, path, expected = _data_case(tmp_path, case)
    with pytest.raises(ConfigError) as err:
        build_task(from_dict(TaskSection, {"batch_size": 2, "eval_size": 2, **task}), 0)
    assert str(err.value).startswith(f"task '{task['name']}': ") and expected.format(path) in str(err.value)


@pytest.mark.parametrize("case", _first_fast(DATA_CASES))
def test_a_data_file_that_is_not_utf8_or_is_a_directory_is_one_line_naming_it(tmp_path, capsys, case):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    task, path, expected = _data_case(data_dir, case)
    task = {"batch_size": 2, "eval_size": 2, **task}
    err = _cli_error(capsys, ["train", _config_file(tmp_path, task=task)])
    assert err.startswith(f"gfo train: error: task '{task['name']}': ") and expected.format(path) in err, err
    assert str(path) in err
    assert sorted(os.listdir(tmp_path)) == ["data", "run.yaml"]  # no run directory


# ----------------------------------------------------------------------------- 11. countdown ranges
COUNTDOWN_OPTIONS = [
    ({"max_number": float("inf")}, "task.options.max_number=inf is invalid: expected an integer in [1, 16777216] "
                                   "(2**24 = 16777216: the reward compares with the target as float32"),
    ({"max_number": 10**30}, "task.options.max_number=1000000000000000000000000000000 is invalid: expected an "
                             "integer in [1, 16777216]"),
    ({"max_number": 0}, "task.options.max_number=0 is invalid"),
    ({"max_number": 9.5}, "task.options.max_number=9.5 is invalid"),
    ({"n_numbers": float("inf")}, "task.options.n_numbers=inf is invalid: expected an integer in [2, 6] (or [min, max] "
                                  "within it)"),
    ({"n_numbers": [2, float("nan")]}, "task.options.n_numbers=nan is invalid: expected an integer in [2, 6]"),
    ({"n_numbers": [5, 3]}, "task.options.n_numbers=[5, 3] is invalid: expected [min, max] with min <= max"),
    ({"max_new_tokens": float("inf")}, "task.options.max_new_tokens=inf is invalid: expected an integer >= 1"),
]


@pytest.mark.parametrize("options, expected", COUNTDOWN_OPTIONS)
def test_countdown_options_out_of_range_name_the_option_and_range(options, expected):
    from gfo.run.build import build_task
    from gfo.run.config import TaskSection

    with pytest.raises(ConfigError) as err:
        build_task(TaskSection(name="countdown", batch_size=2, eval_size=2, options=options), 0)
    assert str(err.value).startswith("task 'countdown': ") and expected in str(err.value), err.value


@pytest.mark.parametrize("options, expected", _first_fast(COUNTDOWN_OPTIONS))
def test_countdown_options_out_of_range_are_config_errors_naming_the_option(tmp_path, capsys, options, expected):
    task = {"name": "countdown", "batch_size": 2, "eval_size": 2, "options": options}
    err = _cli_error(capsys, ["train", _config_file(tmp_path, task=task)])
    assert err.startswith("gfo train: error: task 'countdown': ") and expected in err, err
    assert os.listdir(tmp_path) == ["run.yaml"]


COUNTDOWN_RECORDS = [
    ('{"numbers": [1, 2], "target": Infinity}', "record 1 has target inf; expected a finite number in "
                                                "[-16777216, 16777216]"),
    ('{"numbers": [1, 2], "target": 1e999}', "record 1 has target inf"),
    ('{"numbers": [1, 2], "target": "nan"}', "record 1 has target 'nan'"),
    ('{"numbers": [1, 2], "target": 99999999999}', "record 1 has target 99999999999"),
    ('{"numbers": [1, 99999999999], "target": 3}', "record 1 has numbers [1, 99999999999]; expected a list of "
                                                   "integers in [0, 16777216]"),
]


@pytest.mark.parametrize("record, expected", COUNTDOWN_RECORDS)
def test_countdown_records_out_of_range_name_the_file_and_record_directly(tmp_path, record, expected):
    from gfo.tasks.loaders import DataError
    from gfo.tasks import TASKS

    data = tmp_path / "countdown.jsonl"
    data.write_text('{"numbers": [1, 2], "target": 3}\n' + record + "\n")
    with pytest.raises(DataError) as err:
        TASKS["countdown"](data_path=str(data), batch_size=2, eval_size=1)
    assert str(err.value).startswith(f"{data}: {expected}"), err.value


@pytest.mark.parametrize("record, expected", _first_fast(COUNTDOWN_RECORDS))
def test_countdown_records_out_of_range_name_the_file_and_record(tmp_path, capsys, record, expected):
    data = tmp_path / "data" / "countdown.jsonl"
    data.parent.mkdir()
    data.write_text('{"numbers": [1, 2], "target": 3}\n' + record + "\n")
    task = {"name": "countdown", "objective": "cross_entropy", "batch_size": 2, "eval_size": 1,
            "options": {"data_path": str(data)}}
    err = _cli_error(capsys, ["train", _config_file(tmp_path, task=task)])
    assert err.startswith(f"gfo train: error: task 'countdown': {data}: {expected}"), err


# ----------------------------------------------------------------------------- 12. multi-process: peers that never come
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gfo(*argv) -> subprocess.Popen:
    """`gfo ARGV...` as its own process on one CPU device (stdout, stderr piped as text)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, "-m", "gfo.run.cli", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(procs, timeout=180) -> list[tuple[int, str, str]]:
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:  # a hung process never outlives the test (it holds its port)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err.strip()) for p, (out, err) in zip(procs, outputs)]


def _start_flags(port, process_id, timeout):
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id),
            "--set", f"distributed.initialization_timeout={timeout}"]


@pytest.mark.slow  # three processes starting JAX (about 10 s on 2 cores)
def test_a_peer_that_never_joins_ends_each_process_in_one_line_and_ctrl_c_works_while_waiting(tmp_path):
    import signal
    import time

    config = _config_file(tmp_path)
    ports = [_free_port() for _ in range(3)]
    alone_0 = _gfo("train", config, *_start_flags(ports[0], 0, 3))  # process 1 never starts
    alone_1 = _gfo("train", config, *_start_flags(ports[1], 1, 3))  # nor process 0, the coordinator
    waiting = _gfo("train", config, *_start_flags(ports[2], 0, 600))
    assert "waiting for all 2 at coordinator" in waiting.stdout.readline()
    started = time.monotonic()
    # Once in about six full-suite runs on 2 loaded cores, one SIGINT did not end the wait, and once (2026-12-03)
    # two did not (cause not found; never seen alone): a user's repeated Ctrl-C is what this repeats, every 15 s
    for _ in range(3):
        waiting.send_signal(signal.SIGINT)
        try:
            waiting.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            pass
    (rc0, _, err0), (rc1, _, err1), (rc2, _, err2) = _finish([alone_0, alone_1, waiting])
    assert time.monotonic() - started < 60  # Ctrl-C ended the wait, not its 600 s
    assert (rc0, rc1, rc2) == (2, 2, 130)
    for err in (err0, err1, err2):
        assert len(err.splitlines()) == 1 and "Traceback" not in err and "Check failure" not in err, err
    assert err0 == (f"gfo train: error: multi-process start timed out after 3 s at coordinator 127.0.0.1:{ports[0]}: "
                    f"joined: process 0 (this one, the coordinator); did not join: process 1; start every process "
                    f"within 3 s of each other with the same coordinator address and num_processes (each its own "
                    f"process_id), or raise distributed.initialization_timeout")
    assert err1.startswith(f"gfo train: error: multi-process start timed out after 3 s at coordinator "
                           f"127.0.0.1:{ports[1]}: process 1 of 2 (this one) could not complete joining: process 0 "
                           f"is not running there or not reachable")
    assert err2 == f"gfo train: interrupted while waiting for the other processes to join coordinator 127.0.0.1:{ports[2]}"
    assert os.listdir(tmp_path) == ["run.yaml"]  # no run directory


def test_initialization_timeout_must_be_positive():
    for bad in ("0", "-3", ".inf"):
        with pytest.raises(ConfigError, match=r"distributed.initialization_timeout' = .* is invalid"):
            load_config(None, [f"distributed.initialization_timeout={bad}"])
    assert load_config(None, []).distributed.initialization_timeout == 120


@pytest.mark.slow  # two processes start JAX and check the config (about 20 s on 2 cores)
def test_a_refusal_on_process_0_stops_every_process_at_the_next_barrier(tmp_path):
    config = _config_file(tmp_path)
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    (run_dir / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # only process 0 takes the lock
    port = _free_port()
    results = _finish([_gfo("train", config, *_start_flags(port, i, 60)) for i in range(2)])
    (rc0, _, err0), (rc1, _, err1) = results
    assert (rc0, rc1) == (2, 2), results
    for err in (err0, err1):
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err0.startswith(f"gfo train: error: run directory {run_dir} is in use by another gfo train (host "), err0
    assert err1.startswith("gfo train: error: process 0 stopped before 'the run directory', so every process "
                           "stops: ") and "in use by another gfo train" in err1, err1
    assert sorted(os.listdir(run_dir)) == [".lock"]


class _Client:
    """The two calls of JAX's distributed client `distributed.checked` uses; the peer (process 1) posts
    `peer` (None: it never arrives)."""

    def __init__(self, peer: str | None):
        self.store, self.peer = {}, peer

    def key_value_set(self, key, value):
        self.store[key] = value
        if self.peer is not None:
            self.store[key.rsplit("/", 1)[0] + "/1"] = self.peer

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


def test_checked_barrier_names_the_process_that_failed_or_never_came(monkeypatch):
    from jax._src import distributed as jax_distributed

    from gfo import distributed

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(jax_distributed.global_state, "client", _Client("failed: data file 'x' does not exist"))
    with pytest.raises(distributed.DistributedError, match=r"^process 1 stopped before 'the config check', so "
                                                           r"every process stops: data file 'x' does not exist$"):
        with distributed.checked("the config check"):
            pass
    monkeypatch.setattr(jax_distributed.global_state, "client", _Client("ok"))
    with distributed.checked("the config check"):  # both arrived, neither failed
        pass
    with pytest.raises(ConfigError, match="bad"):  # this process's own error, after telling the others
        with distributed.checked("the config check"):
            raise ConfigError("bad")
    assert any(v == "failed: bad" for v in jax_distributed.global_state.client.store.values())
    monkeypatch.setattr(jax_distributed.global_state, "client", _Client(None))
    monkeypatch.setattr(distributed, "_timeout_s", 0.3)
    with pytest.raises(distributed.DistributedError, match=r"^process\(es\) \[1\] did not reach 'the run directory' "
                                                           r"within 0.3 s \(distributed.initialization_timeout; "
                                                           r"arrived: \[0\]\)"):
        with distributed.checked("the run directory"):
            pass
