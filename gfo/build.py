"""From a validated config to the four axes: model, space, optimizer, task (and its objective)."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import optax

import models
from gfo import spaces
from gfo.config import ConfigError, ModelSection, OptimizerSection, SpaceSection, TaskSection
from gfo.discrete import METHODS as DISCRETE_METHODS, DiscreteSearch
from gfo.estimators import ESTIMATORS, SPSA, RandOpt, ZOSGDCons
from gfo.noise import check_noise_map
from gfo.optimizer import Optimizer
from gfo.rollout import GenerationReward
from gfo.strategies import EvosaxStrategy, resolve_name
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
    try:
        cfg = models.tiny(section.family, dtype=section.dtype, param_dtype=section.dtype, **section.overrides)
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
            return spaces.Full(params, section.filter)
        if kind == "lora":
            return spaces.LoRA(params, section.rank, tuple(section.targets), section.alpha)
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


def _transform(section: OptimizerSection) -> optax.GradientTransformation:
    if section.transform == "adam":
        return optax.adam(section.lr)
    if section.transform == "adamw":
        return optax.adamw(section.lr, weight_decay=section.weight_decay)
    if section.transform == "adam_l2":  # OpenAI-ES: Adam on g + l2·x (coupled L2, not AdamW's decoupled decay)
        return optax.chain(optax.add_decayed_weights(section.weight_decay), optax.adam(section.lr))
    if section.transform == "sgd":
        return optax.sgd(section.lr, momentum=section.momentum or None)
    raise ConfigError(f"optimizer.transform={section.transform!r} is unknown: expected adam, adamw, adam_l2 or sgd")


def build_optimizer(section: OptimizerSection, x0, lowrank_ok: bool, pop_sharding=None, vocab=None,
                    noise_map=()):
    """The optimizer of `section`; `pop_sharding` splits population members over the mesh's `pop` axis.

    `vocab` is the hard-prompt space's token set: the discrete searches need it, nothing else takes it.
    `noise_map` is the space's per-leaf noise kinds (`Space.noise_map`: pairs regex → lowrank | full | frozen).
    """
    s = section
    if (s.method in DISCRETE_METHODS) != (vocab is not None):
        raise ConfigError(f"optimizer.method={s.method!r} " + (
            "searches token ids: it needs space.kind='hard_prompt'" if vocab is None else
            f"cannot search a hard_prompt space (token ids): use one of {list(DISCRETE_METHODS)}"))
    if s.method in DISCRETE_METHODS:
        try:
            return DiscreteSearch(s.method, vocab, population=s.population, batch_size=s.eval_chunk,
                                  pop_sharding=pop_sharding, **s.options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimizer ({s.method}): {e}") from None
    if pop_sharding is not None and s.method not in ("backprop", "spsa", "forward_grad", "policy_gradient", "lozo",
                                                     "hizoo", "mezo_svrg", "zo_sgd_cons", *DISCRETE_METHODS):
        size = pop_sharding.mesh.shape["pop"]
        uneven = {k: v for k, v in (("optimizer.population", s.population), ("optimizer.eval_chunk", s.eval_chunk))
                  if v is not None and v % size}
        if uneven:
            warnings.warn(f"{uneven} not a multiple of mesh.pop={size}: members are padded over the devices "
                          f"(correct, but some devices idle); choose multiples of {size} or set mesh.pop",
                          stacklevel=2)
    if noise_map and s.method not in ("es", "lowrank_es"):
        raise ConfigError(f"space.noise_map is set but optimizer.method={s.method!r} does not read it: only "
                          f"es and lowrank_es perturb per leaf kind")
    if s.groups != 1 and s.method not in ("es", "lowrank_es"):
        raise ConfigError(f"optimizer.groups={s.groups} applies to es / lowrank_es, not {s.method!r}")
    if noise_map:
        from gfo.noise import unmatched_patterns

        unmatched = unmatched_patterns(noise_map, x0)
        if unmatched:
            from gfo.noise import path_name

            names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(x0)[0]]
            raise ConfigError(f"space.noise_map patterns {unmatched} match no searched leaf; paths look like "
                              f"{names[:6]}")
    if s.method == "zo_sgd_cons":
        try:
            return ZOSGDCons(SPSA(**{"eps": s.sigma, "n": s.n, **s.options}), s.lr)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimizer (zo_sgd_cons): {e}") from None
    if s.method == "randopt":
        try:
            return RandOpt(**{"population": s.population, "sigma": s.sigma, "batch_size": s.eval_chunk,
                              "pop_sharding": pop_sharding, **s.options})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimizer (randopt): {e}") from None
    if s.method in ESTIMATORS:
        common = dict(population=s.population, sigma=s.sigma, antithetic=s.antithetic, shaping=s.shaping,
                      batch_size=s.eval_chunk, pop_sharding=pop_sharding, groups=s.groups,
                      noise_map=tuple(noise_map or ()))
        kwargs = {"backprop": {}, "spsa": dict(eps=s.sigma, n=s.n), "forward_grad": dict(n=s.n),
                  "es": common, "lowrank_es": dict(common, rank=s.rank, factored=lowrank_ok),
                  "policy_gradient": dict(kl_coef=s.kl_coef), "lozo": dict(eps=s.sigma, n=s.n, rank=s.rank),
                  "hizoo": dict(eps=s.sigma), "mezo_svrg": dict(eps=s.sigma)}[s.method]
        try:
            estimator = ESTIMATORS[s.method](**{**kwargs, **s.options})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimizer ({s.method}): {e}") from None
        return Optimizer(estimator, _transform(s))
    try:
        name = resolve_name(s.method)
    except ValueError as e:
        raise ConfigError(f"optimizer.method={s.method!r}: not an estimator ({sorted(ESTIMATORS)}) nor an "
                          f"evosax strategy. {e}") from None
    try:
        return EvosaxStrategy(name, s.population, x0, options=s.options, params=s.params, init_std=s.sigma,
                              batch_size=s.eval_chunk, pop_sharding=pop_sharding)
    except ValueError as e:
        raise ConfigError(f"optimizer ({name}): {e}") from None


def build_objective(task, section: TaskSection, optimizer: OptimizerSection, model, space, x0):
    """The task's objective over the space; policy gradient gets the task's generation reward."""
    if optimizer.method == "policy_gradient":
        if not hasattr(task, "completion_rewards"):
            raise ConfigError(f"optimizer.method='policy_gradient' needs a task with a reward on generated "
                              f"text (countdown); task.name={section.name!r} has none")
        return GenerationReward(model, space.to_params, task.completion_rewards, task.max_answer_tokens,
                                group_size=optimizer.group_size, temperature=1.0,
                                stop_tokens=task.stop_tokens, stop_strings=getattr(task, "stop_matcher", None),
                                reference=x0)
    return task.objective(section.objective, model, space.to_params)
