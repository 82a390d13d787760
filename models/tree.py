"""Path access on nested-dict parameter trees (paths are tuples of keys), and the stacked-layer layout.

The decoder's blocks live in ONE subtree named `LAYERS` whose every leaf has a leading layer axis
`[n_layers, ...]` (e.g. `layers/attn/q/kernel: [L, d_in, d_out]`); the decoder scans over it. Code that
must know whether a leaf is stacked tests whether its path starts with `LAYERS + "/"` (or, inside an
optimizer state, contains `"/" + LAYERS + "/"`).
"""

from __future__ import annotations

import re
from typing import Any

LAYERS = "layers"
_OLD_LAYER = re.compile(r"^layers_(\d+)$")


def path_name(path) -> str:
    """`"layers/attn/q/kernel"` for a `jax.tree_util` key path (stacked leaves: one name for all layers)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Set `tree[p0][p1]...[pn] = value`, creating intermediate dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def is_stacked(path: tuple[str, ...] | str) -> bool:
    """Whether the leaf at `path` (a key tuple or a "/"-joined name) carries the leading layer axis."""
    if isinstance(path, str):
        return path.startswith(LAYERS + "/")
    return len(path) > 0 and path[0] == LAYERS


def old_layer_keys(tree) -> list[str]:
    """The top-level keys of `tree` in the per-layer layout of gfo ≤ 0.x (`layers_0`, `layers_1`, ...)."""
    if not isinstance(tree, dict):
        return []
    return sorted((k for k in tree if isinstance(k, str) and _OLD_LAYER.match(k)),
                  key=lambda k: int(_OLD_LAYER.match(k).group(1)))
