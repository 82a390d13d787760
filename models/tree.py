"""Path access on nested-dict parameter trees (paths are tuples of keys)."""

from __future__ import annotations

from typing import Any


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Set `tree[p0][p1]...[pn] = value`, creating intermediate dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
