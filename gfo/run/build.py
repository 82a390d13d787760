"""From a validated config to the four axes (model, space, optimizer, task and its objective) and to a
`Run`: one stage's parts, built once, for `gfo train`, `gfo eval` and `gfo decode` alike.

`build_run(cfg, run_dir, model, params, mesh, stage)` builds the stage `main` or `pretrain` of `cfg`
(tokenizer, task, space, start point, optimizer, objective, evaluations, key streams); `build_runs`
builds the model and both stages. A `Run` holds no optimizer state: whoever runs it creates
(`Run.init_state`) or restores that state, and `Run.step` advances it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
import warnings
from typing import Any

import jax

import models
from gfo import distributed, spaces
from gfo.run import stepplan
from gfo.run.config import (ConfigError, EvalSection, ModelSection, MethodSection, RunConfig, SpaceSection,
                            TaskSection, coerce)
from gfo.run.evaluation import Evaluation
from gfo.streams import stream
from gfo.optim import registry as methods
from gfo.optim.noise import check_noise_map
from gfo.objectives import OnSpace, check_kind
from gfo.rollout import GenerationReward
from gfo.tasks import TASKS


def build_model(section: ModelSection, key: jax.Array):
    """`(model, params)` from a checkpoint path or a random `models.tiny(family, **overrides)`."""
    if section.path is not None:
        if section.overrides:
            raise ConfigError(f"model.overrides={section.overrides} cannot change a checkpoint's architecture "
                              f"(model.path={section.path!r})")
        return models.from_pretrained(section.path, dtype=section.dtype)
    fields = {f.name for f in dataclasses.fields(models.ModelConfig)}
    unknown = set(section.overrides) - fields
    if unknown:
        raise ConfigError(f"model.overrides has unknown fields {sorted(unknown)}; ModelConfig fields are {sorted(fields)}")
    hints = typing.get_type_hints(models.ModelConfig)
    overrides = {k: coerce(hints[k], v, f"model.overrides.{k}") for k, v in section.overrides.items()}
    try:
        cfg = models.tiny(section.family, dtype=section.dtype, param_dtype=section.dtype, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    model = models.TransformerLM(cfg)
    return model, model.init(key)


def build_tokenizer(section: ModelSection, vocab_size: int):
    """The tokenizer of the run: `model.tokenizer` (a path, or `byte` for the built-in byte tokenizer, e.g.
    for a tiny model saved as a checkpoint), else the checkpoint's own (`model.path`), else the byte
    tokenizer of the tiny models. Its ids must fit the model's vocabulary."""
    from models.tokenizer import TokenizerError, check_fits

    source = None if section.tokenizer == "byte" else section.tokenizer or section.path
    try:
        tok = _load_tokenizer(source)
        check_fits(tok, vocab_size, f"model.tokenizer={source!r}" if section.tokenizer else f"model.path={source!r}")
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    return tok


@functools.lru_cache(maxsize=4)
def _load_tokenizer(source):
    return models.load_tokenizer(source)


def build_task(section: TaskSection, seed: int, tokenizer=None):
    """The task of `section`, encoding through `tokenizer` (default: the byte tokenizer)."""
    if section.name not in TASKS:
        raise ConfigError(f"task.name={section.name!r} is unknown: expected one of {sorted(TASKS)}")
    try:
        return TASKS[section.name](seed=seed, batch_size=section.batch_size, eval_size=section.eval_size,
                                   tokenizer=tokenizer, chat_template=section.chat_template,
                                   system_prompt=section.system_prompt, **section.options)
    except TypeError as e:
        raise ConfigError(f"task.options for {section.name!r}: {e}") from None
    except ValueError as e:  # DataError, ChatTemplateError and option checks are ValueErrors
        raise ConfigError(f"task {section.name!r}: {e}") from None


def build_space(section: SpaceSection, params, key: jax.Array) -> spaces.Space:
    def simple(kind):
        if kind == "full":
            try:
                return spaces.Full(params, section.filter)
            except ValueError as e:
                raise ConfigError(f"space.{e}" if str(e).startswith("filter=") else f"space: {e}") from None
        if kind == "lora":
            try:
                return spaces.LoRA(params, section.rank, tuple(section.targets), section.alpha)
            except ValueError as e:
                raise ConfigError(f"space.{e}" if str(e).startswith("targets=") else f"space: {e}") from None
        if kind == "prompt":
            return spaces.Prompt(params, section.n_tokens)
        if kind == "hard_prompt":
            try:
                return spaces.HardPrompt(params, section.n_tokens, section.vocab, section.initial)
            except ValueError as e:
                raise ConfigError(f"space: {e}") from None
        raise ConfigError(f"space.kind={kind!r} is unknown: expected one of ['full', 'lora', 'prompt', "
                          f"'hard_prompt', 'subspace']")

    if section.kind == "subspace":
        if section.inner in ("subspace", "hard_prompt"):
            raise ConfigError(f"space.inner={section.inner!r} is not allowed: expected full, lora or prompt")
        space = spaces.Subspace(simple(section.inner), section.dim, key)
    else:
        space = simple(section.kind)
    try:
        space.noise_map = check_noise_map(getattr(section, "noise_map", None) or {})
    except ValueError as e:
        raise ConfigError(f"space.{e}") from None
    return space


def build_optimizer(section: MethodSection, x0, pop_sharding=None, vocab=None, noise_map=()):
    """The optimizer of `section` (from the registry `gfo.optim.registry`); `pop_sharding` splits population
    members over the mesh's `pop` axis.

    `vocab` is a token-domain space's token set (hard prompts): token-domain methods need it, no other
    method takes it. `noise_map` is the space's per-leaf noise kinds (pairs regex → lowrank | full | frozen).
    """
    s = section
    try:
        spec = methods.lookup(s.method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if (spec.domain == "tokens") != (vocab is not None):
        raise ConfigError(f"optimizer.method={s.method!r} " + (
            "searches token ids: it needs space.kind='hard_prompt'" if vocab is None else
            f"cannot search a hard_prompt space (token ids): use one of {list(methods.discrete_methods())}"))
    if pop_sharding is not None and spec.splits_population and spec.domain != "tokens":
        size = pop_sharding.mesh.shape["pop"]
        uneven = {f"optimizer.{k}": getattr(s, k) for k in ("population", "eval_chunk")
                  if getattr(s, k, None) is not None and getattr(s, k) % size}
        if uneven:
            warnings.warn(f"{uneven} not a multiple of mesh.pop={size}: members are padded over the devices "
                          f"(correct, but some devices idle); choose multiples of {size} or set mesh.pop",
                          stacklevel=2)
    if noise_map and not spec.reads_noise_map:
        readers = sorted(m.name for m in methods.METHODS.values() if m.reads_noise_map)
        raise ConfigError(f"space.noise_map is set but optimizer.method={s.method!r} does not read it: only "
                          f"{', '.join(readers)} perturb per leaf kind")
    if noise_map:
        from gfo.optim.noise import path_name, unmatched_patterns

        unmatched = unmatched_patterns(noise_map, x0)
        if unmatched:
            names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(x0)[0]]
            raise ConfigError(f"space.noise_map patterns {unmatched} match no searched leaf; paths look like "
                              f"{names[:6]}")
    ctx = methods.Context(x0=x0, pop_sharding=pop_sharding, vocab=vocab,
                          noise_map=tuple(noise_map or ()))
    try:
        return spec.build(s, ctx)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer ({spec.name}): {e}") from None


def build_optimizer_for(section: MethodSection, space: spaces.Space, x0, pop_sharding=None):
    """`build_optimizer` for a space: its domain (token ids or vectors) and noise map."""
    vocab = space.vocab if getattr(space, "domain", "continuous") == "tokens" else None
    return build_optimizer(section, x0, pop_sharding, vocab, noise_map=space.noise_map)


def build_objective(task, section: TaskSection, optimizer: MethodSection, model, space, x0):
    """The objective of the kind the method takes (`gfo.optim.registry`: loss or reward) over the space.

    A loss is the task's objective over model parameters composed with the space (`OnSpace`: a pytree,
    so the space's frozen weights reach the jitted step as arguments); a reward objective is the task's
    reward on generated text (`GenerationReward`, with `x0` as the KL reference).
    """
    spec = methods.lookup(optimizer.method)
    if spec.objective == "reward":
        if not hasattr(task, "completion_rewards"):
            raise ConfigError(f"optimizer.method={optimizer.method!r} needs a task with a reward on generated "
                              f"text (countdown); task.name={section.name!r} has none")
        objective = GenerationReward(model, space.to_params, task.completion_rewards, task.max_answer_tokens,
                                     group_size=getattr(optimizer, "group_size", 1), temperature=1.0,
                                     stop_tokens=task.stop_tokens, stop_strings=getattr(task, "stop_matcher", None),
                                     reference=x0, leaf_descriptors=space.lowrank_ok)
    else:
        objective = OnSpace(task.objective(section.objective, model, _identity), space)
    check_kind(objective, spec.objective, f"optimizer.method={optimizer.method!r}")
    return objective


def _identity(params):
    return params


def adapter_start(path: str, space, section: SpaceSection, model_cfg):
    """The start point of a `lora` space read from the PEFT LoRA adapter directory `path`
    (`models.peft.read_lora_adapter`), its rank, alpha and targets checked against the space's."""
    from models.hf_config import CheckpointError
    from models.peft import lora_targets, read_lora_adapter

    if section.kind != "lora":
        raise ConfigError(f"model.adapter={path!r} is a LoRA adapter, the start of a space.kind='lora' run; "
                          f"space.kind={section.kind!r}")
    try:
        lora, rank, alpha = read_lora_adapter(path, model_cfg, space.base)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    targets = lora_targets(lora)
    for key, theirs, ours in (("rank", rank, space.rank), ("alpha", alpha, space.alpha),
                              ("targets", list(targets), sorted(space.targets))):
        if theirs != ours:
            raise ConfigError(f"model.adapter={path!r} has {key} {theirs!r} but space.{key}={ours!r}: set "
                              f"space.{key}={theirs!r} (the adapter's r={rank}, lora_alpha={alpha:g}, targets "
                              f"{list(targets)})")
    return lora


def build_mesh(cfg: RunConfig):
    """Start multi-process JAX if `cfg.distributed` (or the environment) asks for it; the run's mesh."""
    d = cfg.distributed
    try:
        distributed.initialize(d.coordinator_address, d.num_processes, d.process_id, d.initialization_timeout)
        return distributed.make_mesh(cfg.mesh.pop, cfg.mesh.data, cfg.mesh.model)
    except distributed.DistributedTimeout:
        raise  # the process must end at once (`abandon_process`): not a config error to wrap
    except distributed.DistributedError as e:
        raise ConfigError(str(e)) from None


def model_of(cfg: RunConfig):
    """`(model, params)` of the run: `build_model` with the run's model key, a checkpoint that cannot be
    read named (its JSON files name themselves: `models.jsonfile.read_json_object`)."""
    try:
        return build_model(cfg.model, stream(cfg.seed, "run", "model"))
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise ConfigError(f"model.path={cfg.model.path!r}: cannot read the checkpoint: {e}") from None


KEY_STREAMS = ("space", "init", "optimizer", "step", "eval", "dev", "pass_at_k")


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One stage of a run, built once from its config sections (`build_run`); no optimizer state.

    `stage`: `main` or `pretrain` (it names the key streams `keys`, `gfo.streams`: stages never share a
    key); `run_dir`: the stage's directory (`name/` or `name/pretrain/`); `steps`: its length;
    `param_bytes`: the model parameters' bytes (placed on `mesh`); `planned_chunk`: the `eval_chunk`
    chosen from the memory budget (None when the config sets it, or the whole population fits at once;
    `optimizer_section` carries the choice); `eval_section`: model selection and diagnostics (the main
    stage's `eval`, None for pretraining)."""

    stage: str
    run_dir: str
    steps: int
    model: Any
    tokenizer: Any
    task: Any
    space: spaces.Space
    x0: Any
    optimizer: Any
    objective: Any
    evaluation: Evaluation
    keys: dict
    mesh: Any
    param_bytes: int
    planned_chunk: int | None
    task_section: TaskSection
    optimizer_section: MethodSection
    space_section: SpaceSection
    eval_section: EvalSection | None

    @property
    def label(self) -> str:
        """The name of the stage in printed lines and progress bars: `pretrain`, or the method's."""
        return "pretrain" if self.stage == "pretrain" else self.optimizer_section.method

    def init_state(self):
        """A fresh optimizer state at `x0`, placed as the optimizer shards it (parameter-shaped leaves by
        the model-axis path rules; populations replicated)."""
        state = self.optimizer.init(self.keys["optimizer"], self.x0)
        return distributed.place_as(state, self.optimizer.state_sharding(state, self.mesh))

    def step(self, state, t: int):
        """Step `t` (dispatched, not waited for): its data and key are functions of the seed and `t`."""
        batch = distributed.place_batch(self.task.train_batch(t), self.mesh)
        return self.optimizer.step(state, self.objective, batch, jax.random.fold_in(self.keys["step"], t))

    def params(self, state):
        """The model parameters of `state`'s solution."""
        return self.space.to_params(self.optimizer.solution(state))


def build_run(cfg: RunConfig, run_dir: str, model, params, mesh, stage: str = "main") -> Run:
    """The stage `stage` (`main` | `pretrain`) of `cfg` in the run directory `run_dir`, on `model` with
    `params` (the main stage of a run with pretraining starts from the pretrained parameters): every part
    a config can get wrong is built here, so a config that builds can run."""
    if stage == "pretrain":
        p = cfg.pretrain
        directory, steps, task_section, optimizer_section, space_section, eval_section = (
            os.path.join(run_dir, "pretrain"), p.steps, p.task, p.optimizer, SpaceSection(kind="full"), None)
    elif stage == "main":
        directory, steps, task_section, optimizer_section, space_section, eval_section = (
            run_dir, cfg.steps, cfg.task, cfg.optimizer, cfg.space, cfg.eval)
    else:
        raise ValueError(f"stage={stage!r}: expected 'main' or 'pretrain'")
    keys = {k: stream(cfg.seed, stage, k) for k in KEY_STREAMS}
    tokenizer = build_tokenizer(cfg.model, model.config.vocab_size)
    task = build_task(task_section, cfg.seed, tokenizer)
    params = distributed.place(params, mesh)  # frozen weights too are split over `model`
    param_bytes = stepplan.tree_bytes(params)
    space = build_space(space_section, params, keys["space"])
    x0 = space.init(keys["init"])
    if stage == "main" and cfg.model.adapter is not None:
        x0 = adapter_start(cfg.model.adapter, space, space_section, model.config)
    # A population method that leaves `eval_chunk` unset gets one from the memory budget.
    planned_chunk = stepplan.plan_eval_chunk(optimizer_section, task.train_batch(0), model.config, x0,
                                             param_bytes, mesh)
    if planned_chunk is not None:
        optimizer_section = dataclasses.replace(optimizer_section, eval_chunk=planned_chunk)
    optimizer = build_optimizer_for(optimizer_section, space, x0, distributed.pop_sharding(mesh))
    objective = build_objective(task, task_section, optimizer_section, model, space, x0)
    evaluation = Evaluation(task, model, space, x0, optimizer, mesh, keys, eval_section, directory)
    return Run(stage, directory, steps, model, tokenizer, task, space, x0, optimizer, objective, evaluation, keys,
               mesh, param_bytes, planned_chunk, task_section, optimizer_section, space_section, eval_section)


def build_runs(cfg: RunConfig, run_dir: str, mesh) -> tuple[Run | None, Run]:
    """The model of `cfg`, then its pretrain stage (or None) and its main stage, both on the initial
    parameters (with a pretrain stage, the main one is rebuilt on the pretrained parameters to run)."""
    model, params = model_of(cfg)
    pre = None if cfg.pretrain is None else build_run(cfg, run_dir, model, params, mesh, "pretrain")
    return pre, build_run(cfg, run_dir, model, params, mesh)
