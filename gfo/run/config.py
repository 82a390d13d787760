"""Typed, validated run configuration: YAML files plus `--set a.b=value` overrides.

    cfg = load_config("paper_configs/quickstart.yaml", ["optimizer.sigma=0.01", "steps=50"])

Every section is a dataclass; loading checks each key and type before anything runs. An unknown key
is an error naming the key and the closest valid one; a wrong type or an impossible value names the
key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Optional

import yaml


from gfo.errors import ConfigError, not_utf8  # noqa: E402,F401 - defined apart so that gfo.optim.registry needs no gfo.run.config


@dataclasses.dataclass
class ModelSection:
    """The model: a random one (`family` + `overrides` of `models.tiny`) or a checkpoint (`path`)."""

    family: Literal["gpt2", "llama", "opt", "qwen2", "qwen3", "gemma3"] = "gpt2"  # for a random model (models.tiny)
    path: Optional[str] = None  # a local Hugging Face checkpoint directory or a .gguf file
    tokenizer: Optional[str] = None  # a path or `byte`; default: the checkpoint's own (path), else byte
    adapter: Optional[str] = None  # a PEFT LoRA adapter directory: the start point of a `lora` space
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields, e.g. {d_model: 128}
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclasses.dataclass
class SpaceSection:
    kind: Literal["full", "lora", "prompt", "hard_prompt", "subspace"] = "full"
    filter: Optional[str] = None  # full: regex over parameter paths
    rank: int = 4  # lora
    targets: list = dataclasses.field(default_factory=lambda: ["q", "v"])  # lora
    alpha: Optional[float] = None  # lora (default 2 * rank)
    n_tokens: int = 8  # prompt, hard_prompt
    vocab: list = dataclasses.field(default_factory=list)  # hard_prompt: allowed token ids ([] = all)
    initial: Optional[list] = None  # hard_prompt: starting token ids (default: random from vocab)
    dim: int = 64  # subspace
    inner: Literal["full", "lora", "prompt"] = "full"  # subspace: the space it projects into
    noise_map: dict = dataclasses.field(default_factory=dict)  # regex on leaf paths -> lowrank | full | frozen

    def __post_init__(self):
        if self.filter is not None:
            if not isinstance(self.filter, str):
                raise ConfigError(f"space.filter={self.filter!r} is invalid: expected a regular expression (a string)")
            try:
                re.compile(self.filter)
            except re.error as e:
                raise ConfigError(f"space.filter={self.filter!r} is not a valid regular expression: {e}") from None
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets or ()):
            raise ConfigError(f"space.targets={self.targets!r} is invalid: expected a list of projection names, "
                              f"e.g. [q, v]")


def OptimizerSection(method: str = "lowrank_es", **fields) -> MethodSection:
    """The typed `optimizer` section of `method` (its class is the method's own: `gfo.optim.sections`,
    registered with it) with `fields` set, each checked as a config file's would be."""
    return read_optimizer_section({"method": method, **fields}, "optimizer")


@dataclasses.dataclass
class TaskSection:
    name: str = "countdown"
    objective: Optional[str] = None  # default: the task's own
    batch_size: int = 16
    eval_size: int = 64
    options: dict = dataclasses.field(default_factory=dict)  # task-specific, e.g. {digits: 3}
    chat_template: Optional[str] = None  # auto (the tokenizer's, if any) | none | a .jinja path; None: the task's
    # default (auto for instruction tasks: countdown, gsm8k; none for LM, classification, sequence tasks)
    system_prompt: Optional[str] = None  # default: the task's own (countdown: the reference's)


@dataclasses.dataclass
class StageSection:
    """A preceding stage (e.g. Adam pre-training) whose final parameters the run starts from."""

    steps: int = 200
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    optimizer: MethodSection = dataclasses.field(default_factory=lambda: OptimizerSection(
        method="backprop", lr=3e-3, transform="adam"))


@dataclasses.dataclass
class MeshSection:
    """Device mesh axis sizes (one may be -1: the devices left); see `gfo.distributed`."""

    pop: int = -1  # population members split over devices
    data: int = 1  # each member's batch split over devices
    model: int = 1  # weights split over devices (Megatron-style rules)


@dataclasses.dataclass
class DistributedSection:
    """An explicit multi-process start (otherwise TPU pods / SLURM are detected; one process: nothing)."""

    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    initialization_timeout: float = 120.0  # seconds every process waits for all to join (and at gfo's barriers)


@dataclasses.dataclass
class DecodeSection:
    """Decoders compared on the eval prompts after a run and by `gfo decode` (completion tasks):
    greedy, beam search, and refinement of greedy by log-probability and by the task's reward."""

    beam_width: int = 4
    sweeps: int = 2  # refinement passes over the output positions
    top_k: int = 8  # candidate tokens per position
    proposals: Literal["model", "gradient", "both"] = "both"
    length_penalty: float = 0.0

    def __post_init__(self):
        if self.beam_width < 1 or self.sweeps < 1 or self.top_k < 1:
            raise ConfigError(f"decode: beam_width={self.beam_width}, sweeps={self.sweeps}, top_k={self.top_k} "
                              f"must all be >= 1")
        if self.proposals not in ("model", "gradient", "both"):
            raise ConfigError(f"decode.proposals={self.proposals!r}: expected model, gradient or both")


@dataclasses.dataclass
class EvalSection:
    """Model selection and research diagnostics (see `gfo.run.train`).

    `select_by: dev_<metric>` evaluates a dev split of `dev_size` examples at every evaluation and keeps the
    point with the best dev metric; the run reports that point's test (eval) metrics (MeZO's protocol).
    `kl_prompts` > 0 logs the KL divergence of the current model from the starting one on that many held-out
    prompts' next-token distributions. `samples`/`temperature`: pass@k with n samples on generation tasks.
    """

    select_by: Optional[str] = None  # e.g. dev_accuracy, dev_cross_entropy (lower is better for losses)
    dev_size: int = 0  # examples in the dev split (needed by select_by)
    kl_prompts: int = 0  # held-out batches' prompts for the KL drift (0: off)
    samples: int = 0  # pass@k: completions sampled per prompt (0: off)
    temperature: float = 1.0  # pass@k sampling temperature

    def __post_init__(self):
        if self.select_by is not None and not self.select_by.startswith("dev_"):
            raise ConfigError(f"eval.select_by={self.select_by!r}: expected 'dev_<metric>', e.g. dev_accuracy")
        if self.select_by is not None and self.dev_size < 1:
            raise ConfigError(f"eval.select_by={self.select_by!r} needs eval.dev_size >= 1 (got {self.dev_size})")
        if self.dev_size < 0 or self.kl_prompts < 0 or self.samples < 0 or self.temperature < 0:
            raise ConfigError(f"eval: dev_size={self.dev_size}, kl_prompts={self.kl_prompts}, samples={self.samples}, "
                              f"temperature={self.temperature} must be >= 0")


# Sections that do not change what a run optimises: a run may resume under other values.
POSTHOC_KEYS = ("decode",)
# Sections that say where a run executes, not what it computes: a run may resume under other values.
PLACEMENT_KEYS = ("mesh", "distributed")


@dataclasses.dataclass
class RunConfig:
    name: str = "quickstart"
    seed: int = 0
    steps: int = 100
    eval_every: int = 25
    log_every: int = 5
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    runs_dir: str = "runs"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    space: SpaceSection = dataclasses.field(default_factory=SpaceSection)
    optimizer: MethodSection = dataclasses.field(default_factory=OptimizerSection)  # the method's own section
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    pretrain: Optional[StageSection] = None
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    decode: Optional[DecodeSection] = None  # compare decoders on the eval prompts at the end
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)  # model selection, diagnostics
    reference: dict = dataclasses.field(default_factory=dict)  # paper configs: citation, table, paths (metadata)
    plugins: list = dataclasses.field(default_factory=list)  # modules or .py files imported first (they register methods)

    def __post_init__(self):
        name = self.name
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
                or os.path.isabs(name)):
            raise ConfigError(f"name={name!r} is invalid: a run name is one path component (the run directory "
                              f"runs_dir/name), without '/', not empty, '.' or '..'")
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"seed={self.seed} is out of range: expected an integer in [0, 2**32 - 1]")
        for key in ("steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} is invalid: expected an integer >= 1")


# ----------------------------------------------------------------------------- value checks
# Which optimizer fields each method reads (besides `method`): its section class's fields, registered with
# the method (`gfo.optim.registry`); setting any other one is an error, so a field never silently does nothing.
from gfo.optim import registry as _registry  # noqa: E402
from gfo.optim.sections import LEGACY_DEFAULTS, TRANSFORM_ONLY, MethodSection  # noqa: E402,F401


def optimizer_fields(method: str) -> tuple[str, ...]:
    """The optimizer fields `method` reads (() for a name that is no method: reading it names the error)."""
    try:
        return _registry.lookup(str(method)).fields
    except ValueError:
        return ()


class _RegisteredFields(Mapping):
    """method → the optimizer fields it reads, read live from the registry (plugins register more)."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return _registry.METHODS[name].fields

    def __iter__(self):
        return iter(_registry.METHODS)

    def __len__(self) -> int:
        return len(_registry.METHODS)


OPTIMIZER_FIELDS: Mapping[str, tuple[str, ...]] = _RegisteredFields()


def read_optimizer_section(data: Any, where: str = "optimizer") -> MethodSection:
    """An `optimizer:` mapping read into its method's section class: every key one the method declares
    (a config.yaml written before the typed sections may also hold the old flat section's other fields at
    their defaults: they changed nothing), each value coerced and checked against its range."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    method = data.get("method", MethodSection.method)
    try:
        cls = _registry.lookup(method).section
    except ValueError as e:
        raise ConfigError(str(e)) from None
    declared = cls.field_names()
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key in declared:
            values[key] = coerce(hints[key], value, f"{where}.{key}")
        elif key in LEGACY_DEFAULTS and value == LEGACY_DEFAULTS[key]:
            continue
        else:
            raise ConfigError(_not_declared(where, key, value, method, declared))
    try:
        section = cls(method=method, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    section.check_ranges(where)
    for key, transforms in TRANSFORM_ONLY.items():
        if key in values and values[key] != getattr(cls(method=method), key) and section.transform not in transforms:
            raise ConfigError(f"{where}.{key} does not apply to transform {section.transform!r}: only to "
                              f"{' / '.join(transforms)}; remove {key} or change {where}.transform")
    return section


def _not_declared(where: str, key, value, method: str, declared: tuple[str, ...]) -> str:
    """The error for optimizer field `key` that `method`'s section does not declare."""
    if key == "sigma" and "eps" in declared:
        return (f"{where}.sigma does not apply to method {method!r}: sigma is the noise scale σ of ES / evosax / "
                f"RandOpt; {method} perturbs by {where}.eps (ε) — rename sigma to eps")
    if key == "options" and isinstance(value, dict):
        known = [k for k in value if k in declared]
        return (f"{where}.options is not a field: set the method's fields directly"
                + (f" ({', '.join(f'{where}.{k}' for k in known)})" if known else "")
                + f"; method {method!r} has {sorted(declared)}")
    anywhere = {f for m in _registry.METHODS.values() for f in m.fields}
    close = difflib.get_close_matches(str(key), list(declared), n=1)
    if close or key not in anywhere:  # a typo, or a key no method has
        hint = f"; did you mean '{where}.{close[0]}'?" if close else ""
        return f"unknown config key '{where}.{key}'{hint} Method {method!r} reads {sorted(declared)}"
    return f"{where}.{key} does not apply to method {method!r}: it reads only {sorted(declared)}; remove {key}"


# (section, field) -> (test, expected): numeric ranges, checked when a section is read.
_AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")
_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
RANGES: dict[str, dict[str, tuple]] = {
    "TaskSection": {"batch_size": _AT_LEAST_ONE, "eval_size": _AT_LEAST_ONE},
    "SpaceSection": {"rank": _AT_LEAST_ONE, "n_tokens": _AT_LEAST_ONE, "dim": _AT_LEAST_ONE, "alpha": _POSITIVE},
    "StageSection": {"steps": _AT_LEAST_ONE},
    "DistributedSection": {"initialization_timeout": _POSITIVE},
}


def _check_ranges(obj, where: str) -> None:
    for key, (ok, expected) in RANGES.get(type(obj).__name__, {}).items():
        value = getattr(obj, key, None)
        if value is not None and not ok(value):
            raise ConfigError(f"config key '{where + '.' if where else ''}{key}' = {value!r} is invalid: "
                              f"expected {expected}")


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a (YAML) dict, checking every key, type, choice and range."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{(where + '.' if where else '') + close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint} Valid keys here: {sorted(fields)}")
        values[key] = coerce(hints[key], value, path)
    try:
        obj = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None
    _check_ranges(obj, where)
    return obj


def coerce(kind, value, path):
    """`value` checked against the type `kind` (a dataclass is read with `from_dict`; a float accepts an int or a
    numeric string, as YAML reads "1e-3"; a tuple a list, or a mapping as its pairs); a ConfigError naming `path`
    otherwise."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return coerce(options[0], value, path)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key '{path}' = {value!r} is not a valid choice{hint}: expected one of "
                              f"{list(choices)}")
        return value
    if kind is MethodSection:
        return read_optimizer_section(value, path)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, path)
    if kind is float:
        value = _float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{path}' = {value!r} is invalid: expected a finite number (not inf or nan)")
    if origin is tuple and isinstance(value, (list, dict)):  # a mapping: its (key, value) pairs
        value = tuple(value.items()) if isinstance(value, dict) else tuple(value)
    expected = origin or kind
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{path}' = {value!r} has type {type(value).__name__}; expected "
                          f"{getattr(expected, '__name__', expected)}")
    return value


def _float(value):
    """An int or a numeric string (YAML reads "1e-3" as a string) as a float; anything else unchanged."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optimizer.sigma=0.01")
    dotted, raw = assignment.split("=", 1)
    set_dotted(data, dotted.strip(), yaml.safe_load(raw))


def set_dotted(data: dict, dotted: str, value) -> None:
    """`data[a][b][c] = value` for `dotted = "a.b.c"`, creating sections as needed."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:  # an absent or null optional section (pretrain, decode) is created
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{k}' is not a section")
    if keys[-1] == "method" and keys[-2:-1] == ["optimizer"] and node.get("method") != value:
        # Switching method (`--set optimizer.method=spsa`, a sweep's choice): the fields the file set for the
        # previous method and that the new one does not read go with it.
        uses = optimizer_fields(str(value))
        for field in [f for f in node if f != "method" and f not in uses]:
            del node[field]
    node[keys[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    """`update` deep-merged into a copy of `base` (nested mappings merge, anything else replaces)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_A = {"list": "a list", "int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (not the last one wins)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: construct_mapping reports it
                break
            if duplicate:
                raise ConfigError(f"config file {getattr(self, 'gfo_path', '?')!r} gives key {key!r} twice (line "
                                  f"{key_node.start_mark.line + 1}): remove one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_MAPPING = "a mapping of keys to values (name: ..., model: {...}, optimizer: {...})"


def read_yaml(path: str, what: str = "config file", expected: str = _MAPPING) -> dict:
    """The mapping at the top of YAML file `path`; every way it can fail is a `ConfigError` naming it as
    `what` and saying what was `expected`."""
    if os.path.isdir(path):
        raise ConfigError(f"config {path!r} is a directory: expected a YAML file (e.g. paper_configs/quickstart.yaml)"
                          if what == "config file" else f"{what} {path!r} is a directory: expected {expected}")
    try:
        with open(path, encoding="utf-8") as f:
            loader = _UniqueKeyLoader(f)
            loader.gfo_path = path
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path!r} does not exist") from None
    except PermissionError as e:
        raise ConfigError(f"{what} {path!r} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path!r} is not UTF-8 text ({not_utf8(path)}): expected {expected}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path!r} is not valid YAML ({' '.join(str(e).split())}): expected "
                          f"{expected}") from None
    if data is None:
        raise ConfigError(f"{what} {path!r} is empty: expected {expected}")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path!r} holds {_A.get(type(data).__name__, type(data).__name__)} at its top "
                          f"level: expected {expected}")
    return data


def read_run_config(run_dir: str, fix: str = "") -> dict:
    """The resolved config `gfo train` wrote to `run_dir/config.yaml` (what `gfo train` resumes under and
    `gfo eval`/`decode`/`report` rebuild the run from); garbage there (random bytes, text that is not YAML,
    YAML that is not a mapping) is one `ConfigError` naming the file and what was expected, plus `fix`."""
    try:
        return read_yaml(os.path.join(run_dir, "config.yaml"), "run config",
                         "the mapping of the run's resolved config that gfo train writes there")
    except ConfigError as e:
        raise ConfigError(f"{e}{fix}") from None


def load_config(path: str | None = None, overrides: list[str] = (), variant: str | None = None) -> RunConfig:
    """The run config of a YAML file (or the embedded quickstart when `path` is None) plus overrides.

    A file may hold named `variants:` (e.g. `smoke`, the CPU-sized version of a paper config): nested
    overrides merged over the file when `variant` names one, and dropped otherwise. A file without a
    `name` is named after itself (`configs/foo.yaml` runs in `runs/foo`).
    """
    if path is None:
        from gfo.run.quickstart import QUICKSTART

        data = yaml.safe_load(QUICKSTART)
    else:
        data = read_yaml(path)
        data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    variants = data.pop("variants", None) or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"'variants' in {path!r} must map variant names to mappings of overrides")
    if variant is not None:
        if variant not in variants:
            raise ConfigError(f"variant {variant!r} is not in {path or 'the quickstart'}: it has {sorted(variants)}")
        data = _merge(data, variants[variant])
    for assignment in overrides:
        apply_override(data, assignment)
    import_plugins(data.get("plugins") or [], base=os.path.dirname(path) if path else None)
    return from_dict(RunConfig, data)


def import_plugins(plugins, base: str | None = None) -> list:
    """Import each entry of `plugins` — a module name (`mylab.methods`) or a `.py` file (relative to the
    working directory, else to the config file's directory `base`) — before the config is checked, so the
    methods they register (`gfo.optim.registry.register`) are known. Returns the modules."""
    import importlib
    import importlib.util
    import sys

    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins={plugins!r}: expected a list of module names or .py paths")
    modules = []
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = plugin if os.path.isfile(plugin) or base is None else os.path.join(base, plugin)
            if not os.path.isfile(path):
                raise ConfigError(f"plugins: {plugin!r} is not a file (looked in the working directory"
                                  + (f" and {base!r})" if base else ")"))
            name = "gfo_plugin_" + os.path.splitext(os.path.basename(path))[0]
            if name in sys.modules and getattr(sys.modules[name], "__file__", None) == os.path.abspath(path):
                modules.append(sys.modules[name])  # imported already (a resumed run, a sweep's next trial)
                continue
            spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - any failure of a user's file is a config error naming it
                del sys.modules[name]
                raise ConfigError(f"plugins: importing {path!r} failed: {type(e).__name__}: {e}") from None
        else:
            try:
                module = _import_from_path_or_cwd(plugin)
            except ImportError as e:
                raise ConfigError(f"plugins: cannot import module {plugin!r}: {e} (looked on sys.path and in the "
                                  f"working directory {os.getcwd()!r})") from None
        modules.append(module)
    return modules


def _import_from_path_or_cwd(name: str):
    """`importlib.import_module(name)`, else from the working directory as `python -m` would find it (the
    `gfo` console script does not put the working directory on `sys.path`; it is appended, not prepended,
    so it shadows no installed package)."""
    import importlib
    import sys

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)
