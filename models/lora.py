"""LoRA as a separate parameter tree, merged functionally through the low-rank linear.

    lora = init_lora(key, params, rank=8, targets=("q", "v"))
    logits = model.apply(merge_lora(params, lora, alpha=16), tokens)

`lora` mirrors the paths of the targeted kernels, each leaf `{"a": [d_in, r], "b": [d_out, r]}`; the
merged kernel is `LowRankKernel(W, a, b, alpha / r)`, i.e. `W + (α/r)·a bᵀ`, applied factored. `a`
is drawn like PEFT's default (Kaiming-uniform, here in our `[d_in, r]` layout) and `b` starts at zero,
so a fresh LoRA leaves the model unchanged. `merge_lora(..., dense=True)` folds it into plain kernels
(for export with `save_pretrained`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from models.linear import LowRankKernel
from models.tree import get_path, set_path

# Names of the projections a LoRA may target (module names in the parameter tree).
PROJECTIONS = ("q", "k", "v", "o", "fc", "proj", "gate", "up", "down", "lm_head")


def lora_target_paths(params, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Paths of the 2-D kernels whose module name is in `targets` (e.g. ("q", "v"))."""
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not projections: expected names from {PROJECTIONS}")
    paths = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(k.key for k in path)
        module = names[-1] if names[-1] == "lm_head" else (names[-2] if len(names) >= 2 else "")
        if module in targets and (names[-1] == "kernel" or names[-1] == "lm_head") and leaf.ndim == 2:
            paths.append(names)
    if not paths:
        raise ValueError(f"LoRA targets {tuple(targets)} match no kernel of this model")
    return paths


def init_lora(key: jax.Array, params, rank: int, targets: Sequence[str] = ("q", "v"),
              dtype=jnp.float32) -> dict:
    """LoRA factors for every targeted kernel; `b` is zero so the merged model equals the base."""
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be >= 1")
    lora: dict = {}
    paths = lora_target_paths(params, targets)
    for path, sub in zip(paths, jax.random.split(key, len(paths))):
        d_in, d_out = get_path(params, path).shape
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=√5) on a [r, d_in] weight, as PEFT does
        leaf = {"a": jax.random.uniform(sub, (d_in, rank), dtype, -bound, bound),
                "b": jnp.zeros((d_out, rank), dtype)}
        set_path(lora, path, leaf)
    return lora


def merge_lora(params, lora: dict, alpha: float, dense: bool = False):
    """`params` with each LoRA-targeted kernel replaced by `W + (α/r) a bᵀ` (factored unless `dense`)."""
    merged = jax.tree.map(lambda x: x, params)  # fresh containers; leaves shared
    for path, leaf in _lora_leaves(lora):
        w = get_path(params, path)
        if w.shape[0] != leaf["a"].shape[0] or w.shape[1] != leaf["b"].shape[0]:
            raise ValueError(f"LoRA factors at {'/'.join(path)}: a {leaf['a'].shape}, b {leaf['b'].shape} "
                             f"do not fit the kernel {w.shape}")
        kernel = LowRankKernel(w, leaf["a"], leaf["b"], alpha / leaf["a"].shape[-1])
        set_path(merged, path, kernel.dense() if dense else kernel)
    return merged


def _lora_leaves(lora: dict, prefix: tuple[str, ...] = ()):
    if set(lora) == {"a", "b"}:
        yield prefix, lora
        return
    for name, sub in lora.items():
        yield from _lora_leaves(sub, prefix + (name,))

