"""Shared helpers of the benchmarks: timing, XLA memory analysis, the machine, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {"platform": device.platform, "device": getattr(device, "device_kind", str(device)),
            "devices": jax.device_count(), "cpu_count": os.cpu_count(), "processor": _cpu_model(), "jax": jax.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def describe(m: dict) -> str:
    """One line naming the machine of `machine()` for a result file's header."""
    return (f"Machine: {m['processor']} ({m['platform']}, {m.get('devices', 1)} device(s)), {m['cpu_count']} CPU "
            f"cores, JAX {m['jax']}, {m['date']}.")


def compiled(fn, *args):
    """`(jitted fn, compiled executable)` for `args` (compiling once, outside any timing)."""
    jitted = jax.jit(fn)
    return jitted, jitted.lower(*args).compile()


def peak_bytes(executable) -> int:
    """Arguments + outputs + temporaries − aliased buffers, from XLA's compiled memory analysis."""
    m = executable.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def seconds(fn, *args, repeats: int = 3) -> float:
    """Median wall time of `fn(*args)` (results blocked on), after one untimed warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def available_memory_bytes() -> int:
    """Memory a step may use: the accelerator's, or the host's physical memory on CPU."""
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def write(out_dir: str, name: str, payload: dict, markdown: str) -> tuple[str, str]:
    """`out_dir/name.json` and `out_dir/name.md`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    js, md = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(js, "w") as f:
        json.dump(payload, f, indent=1)
    with open(md, "w") as f:
        f.write(markdown)
    return js, md


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")
