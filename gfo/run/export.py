"""`gfo export RUN_DIR OUT`: a run's checkpoint as a Hugging Face model, a PEFT adapter or a GGUF file.

    export_run("runs/mezo", "out/mezo-hf")                                   # merged weights, config, tokenizer
    export_run("runs/mezo", "out/mezo-lora", format="peft", checkpoint="best")
    export_run("runs/mezo", "out/mezo.gguf", format="gguf", dtype="bfloat16")

The run is rebuilt from its `config.yaml` (`gfo.run.evaluate.restore_run`, as `gfo eval` does) and its
point read at the chosen checkpoint: `latest`, `best` (the dev-selected point of `RUN/best/`) or a step.
The point becomes what the format can hold: model weights (`hf`, `gguf`: a LoRA merged, a subspace point
mapped into its inner space), LoRA factors or a soft prompt (`peft`). What a format cannot hold is refused
before anything is read. Everything is written into a temporary sibling of OUT and renamed into place at
the end, so an interrupted export leaves no half-written OUT; an existing OUT is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import jax
import jax.numpy as jnp

from gfo import spaces
from gfo.errors import ConfigError
from gfo.run.config import read_run_config

FORMATS = ("hf", "peft", "gguf")
DTYPES = ("float32", "bfloat16", "float16")
SHARD_MB = 2048  # safetensors shard size of an `hf` export (MiB)


def export_run(run_dir: str, out: str, format: str = "hf", checkpoint: str = "latest", dtype: str = "float32",
               force: bool = False) -> dict:
    """Export `run_dir`'s point at `checkpoint` (`latest` | `best` | a step) to `out` in `format`, tensors in
    `dtype`; returns `{"out", "format", "step", "what"}`. Every bad argument is a one-line `ConfigError`."""
    which = _checkpoint_arg(checkpoint)
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is unknown: expected one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is unknown: expected one of {list(DTYPES)}")
    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir!r} does not exist")
    if not os.path.isfile(config_file):
        raise ConfigError(f"{run_dir!r} is not a gfo run directory: it has no config.yaml")
    if os.path.lexists(out) and not force:
        raise ConfigError(f"{out!r} exists: choose another OUT, or pass --force to replace it")
    saved = read_run_config(run_dir)
    kind = _kind(saved.get("space") or {})
    _check_format(format, kind, saved)

    cfg, run, x, step = restore_point(run_dir, which)
    space = run.space
    if getattr(space, "inner", None) is not None:  # a subspace point: its point in the inner space
        x, space = space.inner_point(x), space.inner
    with staged(out, force) as tmp:
        what = _write(format, cfg, run, space, x, tmp, dtype)
    print(f"exported {run_dir} @ step {step} ({what}) to {out}")
    return {"out": out, "format": format, "step": step, "what": what}


def _checkpoint_arg(checkpoint) -> str | int:
    text = str(checkpoint)
    if text in ("latest", "best"):
        return text
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--checkpoint {checkpoint!r} is unknown: expected latest, best or a step number")


def _kind(space: dict) -> str:
    """The space kind a point ends up in: a subspace's inner one."""
    kind = space.get("kind", "full")
    return space.get("inner", "full") if kind == "subspace" else kind


def _check_format(format: str, kind: str, saved: dict) -> None:
    model = saved.get("model") or {}
    if format in ("hf", "gguf") and kind in ("prompt", "hard_prompt"):
        what = {"prompt": "soft prompt", "hard_prompt": "hard prompt (token ids)"}[kind]
        raise ConfigError(f"--format {format}: a {what} (space.kind={kind}) is not model weights, "
                          f"which a {'Hugging Face model' if format == 'hf' else 'GGUF file'} holds: use --format peft "
                          f"(a PEFT prompt-tuning adapter)")
    if format == "peft":
        if kind not in ("lora", "prompt", "hard_prompt"):
            raise ConfigError(f"--format peft holds a LoRA or a soft prompt; space.kind={kind!r} changes the "
                              f"weights themselves: use --format hf or gguf")
        if saved.get("pretrain") is not None:
            raise ConfigError("--format peft: the run's base model is its pretrain stage's result, which is not "
                              "a checkpoint on disk for the adapter to apply to: use --format hf (merged)")
        if model.get("path") is None:
            raise ConfigError("--format peft: the run's base model is a random tiny model (no model.path), not a "
                              "checkpoint the adapter could name: use --format hf (merged)")


def restore_point(run_dir: str, which: str | int) -> tuple:
    """`(cfg, run, x, step)`: the rebuilt run and its point `x` (the optimizer's solution, in the run's
    space) at checkpoint `which`: `latest`, `best` or a step."""
    from gfo.run import checkpoint
    from gfo.run.evaluate import restore_run

    if isinstance(which, int):
        steps = checkpoint.saved_steps(run_dir)
        if which not in steps:
            raise ConfigError(f"--checkpoint {which}: {run_dir} has no checkpoint at step {which}; its steps are "
                              f"{steps} (or use latest / best)")
    cfg, run, state, step = restore_run(run_dir, step=which if isinstance(which, int) else None)
    x = run.optimizer.solution(state)
    if which == "best":
        best_dir = os.path.join(run.run_dir, "best")
        steps = sorted(int(d) for d in os.listdir(best_dir) if d.isdigit()) if os.path.isdir(best_dir) else []
        if not steps:
            raise ConfigError(f"--checkpoint best: {run_dir} has no selected point in {best_dir} (a run keeps one "
                              f"only with eval.select_by set): use latest or a step")
        x, step = checkpoint.restore_best(run.run_dir, x), steps[-1]
    return cfg, run, x, step


@contextlib.contextmanager
def staged(out: str, force: bool):
    """A temporary path next to `out` to write into; renamed to `out` when the block ends without error
    (an existing `out` replaced only then), removed when it fails."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.export-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if os.path.lexists(out):
            if not force:
                raise ConfigError(f"{out!r} appeared during the export: choose another OUT, or pass --force")
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def merged_params(space, x, dtype: str) -> dict:
    """The model parameters of point `x` of `space` as plain arrays of `dtype` (a LoRA merged densely)."""
    from models.linear import LowRankKernel, NoisyLeaf, materialize

    params = space.to_params(x)
    params = jax.tree.map(materialize, params, is_leaf=lambda v: isinstance(v, (LowRankKernel, NoisyLeaf)))
    return jax.tree.map(lambda v: jnp.asarray(v).astype(dtype), params)


def _write(format: str, cfg, run, space, x, tmp: str, dtype: str) -> str:
    import numpy as np

    from models import peft
    from models.export_tokenizer import BYTE_NOTE, gguf_source, write_hf_tokenizer

    model_cfg = run.model.config.replace(dtype=dtype, param_dtype=dtype)
    base = None if cfg.model.path is None else os.path.abspath(cfg.model.path)
    if format == "peft":
        np_dtype = np.dtype(jnp.dtype(dtype))
        if isinstance(space, spaces.LoRA):
            try:
                peft.write_lora_adapter(tmp, model_cfg, x, space.alpha, base, np_dtype)
            except ValueError as e:
                raise ConfigError(f"--format peft: {e}") from None
            return f"PEFT LoRA adapter, r={space.rank}, alpha={space.alpha:g}, targets {list(space.targets)}"
        prompt = space.to_params(x)["soft_prompt"]
        peft.write_prompt_adapter(tmp, model_cfg, prompt, base, np_dtype)
        return f"PEFT prompt-tuning adapter, {prompt.shape[0]} virtual tokens"
    from models.decoder import TransformerLM

    params = merged_params(space, x, dtype)
    model = TransformerLM(model_cfg)
    source = _tokenizer_source(cfg.model)
    if format == "gguf":
        from models.export_gguf import save_gguf

        try:
            save_gguf(model, params, tmp, run.tokenizer, source)
        except ValueError as e:
            raise ConfigError(f"--format gguf: {e}") from None
        byte = not hasattr(run.tokenizer, "backend") and gguf_source(source) is None
        return f"GGUF {model_cfg.family}, {dtype}" + (f"; {BYTE_NOTE}" if byte else "")
    from models.hf import save_pretrained

    try:
        save_pretrained(model, params, tmp, shard_size_mb=SHARD_MB)
    except ValueError as e:
        raise ConfigError(f"--format hf: {e}") from None
    note = write_hf_tokenizer(tmp, run.tokenizer, source, model_cfg)
    return f"Hugging Face {model_cfg.family}, {dtype}" + (f"; {note}" if note else "")


def _tokenizer_source(section) -> str | None:
    """The path the run's tokenizer was read from (as `gfo.run.build.build_tokenizer`), None for bytes."""
    return None if section.tokenizer == "byte" else section.tokenizer or section.path
