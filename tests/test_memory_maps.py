"""Compiled programs are released before a process reaches the kernel's memory-map limit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from gfo import jitting as stepplan  # the process's compiled programs


def _maps() -> int:
    return stepplan.memory_maps()[0]


@pytest.mark.skipif(stepplan.memory_maps() is None, reason="needs Linux /proc")
def test_programs_are_released_past_the_fraction_of_the_map_limit(monkeypatch):
    used, limit = stepplan.memory_maps()
    assert 0 < used < limit
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16))).block_until_ready()  # thread pools started
    fns = [jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum()) for i in range(16)]
    before = _maps()
    for f in fns:
        f(jnp.ones((16, 16))).block_until_ready()
    held = _maps() - before
    del fns, f  # nothing of ours holds them: only JAX's caches do
    assert held >= 16  # each CPU executable keeps memory maps of its own while JAX caches it
    notes = []
    assert not stepplan.release_compiled_programs(fraction=1.0, note=notes.append) and notes == []
    assert stepplan.release_compiled_programs(fraction=0.0, note=notes.append)
    assert _maps() <= before + held // 2  # the executables' maps are gone
    assert len(notes) == 1 and f"of the kernel's limit {limit} (vm.max_map_count)" in notes[0]
