"""LoRA as a separate parameter tree, merged functionally through the low-rank linear.

    lora = init_lora(key, params, rank=8, targets=("q", "v"))
    logits = model.apply(merge_lora(params, lora, alpha=16), tokens)

`lora` mirrors the paths of the targeted kernels, each leaf `{"a": [d_in, r], "b": [d_out, r]}` — or, for
a kernel of the stacked `layers` subtree (`W: [L, d_in, d_out]`), `{"a": [L, d_in, r], "b": [L, d_out, r]}`,
one independent pair per layer; the merged kernel is `LowRankKernel(W, a, b, alpha / r)` (scale
broadcast to `[L]` for a stacked kernel), i.e. `W + (α/r)·a bᵀ`, applied factored. `a`
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
from models.tree import get_path, is_stacked, set_path

# Names of the projections a LoRA may target (module names in the parameter tree).
PROJECTIONS = ("q", "k", "v", "o", "fc", "proj", "gate", "up", "down", "lm_head")


def lora_target_paths(params, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Paths of the kernels whose module name is in `targets` (e.g. ("q", "v")): 2-D, or 3-D `[L, d_in, d_out]`
    under the stacked `layers` subtree."""
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not projections: expected names from {PROJECTIONS}")
    paths = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(k.key for k in path)
        module = names[-1] if names[-1] == "lm_head" else (names[-2] if len(names) >= 2 else "")
        ndim = 3 if is_stacked(names) else 2
        if module in targets and (names[-1] == "kernel" or names[-1] == "lm_head") and jnp.ndim(leaf) == ndim:
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
        *lead, d_in, d_out = jnp.shape(get_path(params, path))
        lead = tuple(lead)
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=√5) on a [r, d_in] weight, as PEFT does
        leaf = {"a": jax.random.uniform(sub, lead + (d_in, rank), dtype, -bound, bound),
                "b": jnp.zeros(lead + (d_out, rank), dtype)}
        set_path(lora, path, leaf)
    return lora


def merge_lora(params, lora: dict, alpha: float, dense: bool = False):
    """`params` with each LoRA-targeted kernel replaced by `W + (α/r) a bᵀ` (factored unless `dense`)."""
    merged = jax.tree.map(lambda x: x, params)  # fresh containers; leaves shared
    for path, leaf in lora_leaves(lora):
        w = get_path(params, path)
        a, b = leaf["a"], leaf["b"]
        lead = w.shape[:-2]
        if a.shape[:-1] != w.shape[:-1] or b.shape[:-1] != lead + w.shape[-1:] or a.shape[-1] != b.shape[-1]:
            raise ValueError(f"LoRA factors at {'/'.join(path)}: a {a.shape}, b {b.shape} do not fit the kernel "
                             f"{w.shape}: expected a {w.shape[:-1] + ('r',)}, b {lead + w.shape[-1:] + ('r',)}")
        scale = alpha / a.shape[-1]
        kernel = LowRankKernel(w, a, b, jnp.full(lead, scale, jnp.float32) if lead else scale)
        set_path(merged, path, kernel.dense() if dense else kernel)
    return merged


def lora_leaves(lora: dict, prefix: tuple[str, ...] = ()):
    """`(path, {"a", "b"})` for every LoRA factor pair of a nested LoRA tree."""
    if set(lora) == {"a", "b"}:
        yield prefix, lora
        return
    for name, sub in lora.items():
        yield from lora_leaves(sub, prefix + (name,))

