"""The first call of a step: trace and compile time, and the loops XLA compiles, against an earlier commit.

Issue 23's measure: a step's first call on a 16 M-parameter GPT-2-shaped model (d_model 768, 2 layers,
vocab 2048, batch 4 × 65 tokens, `-model.token_logprobs` over `gfo.spaces.Full` as `gfo.OnSpace`), for

    gfo.Optimizer(gfo.SPSA(eps=1e-3), optax.sgd(1e-3))
    gfo.Optimizer(gfo.OpenES(population=16, sigma=1e-3), optax.sgd(1e-3))
    gfo.Optimizer(gfo.LowRankES(population=16, sigma=1e-3), optax.sgd(1e-3))

each in a fresh process (no compilation cache), timing `optimizer.lower(...)` (trace) and `.compile()`,
and counting the `while` loops of the compiled program (on CPU every threefry call is one). With
`--before REV` the same measurement runs first on commit REV (a temporary `git worktree`), so the table's
ratios come from one run on one machine.

    python -m benchmarks.first_call --before 1af35d0      # the commit before the key tables
    python -m benchmarks.first_call --quick               # a tiny model (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

METHODS = ("spsa", "openes", "lowrank_es")

_MEASURE = r"""
import json, sys, time
import jax, jax.numpy as jnp, optax
import gfo, models
quick, name = sys.argv[1] == "1", sys.argv[2]
if quick:
    cfg = models.tiny("gpt2", d_model=32, n_layers=2, n_heads=2, vocab_size=256, max_seq_len=32)
    shape = (2, 9)
else:
    cfg = models.tiny("gpt2", d_model=768, n_layers=2, n_heads=12, vocab_size=2048, max_seq_len=128)
    shape = (4, 65)
model = models.TransformerLM(cfg)
params = model.init(jax.random.key(0))
space = gfo.spaces.Full(params)
loss = lambda p, batch, key: -model.token_logprobs(p, batch["tokens"][:, :-1], batch["tokens"][:, 1:]).mean()
objective = gfo.OnSpace(loss, space)
batch = {"tokens": jax.random.randint(jax.random.key(3), shape, 0, cfg.vocab_size, jnp.int32)}
estimator = {"spsa": lambda: gfo.SPSA(eps=1e-3), "openes": lambda: gfo.OpenES(population=16, sigma=1e-3),
             "lowrank_es": lambda: gfo.LowRankES(population=16, sigma=1e-3)}[name]()
opt = gfo.Optimizer(estimator, optax.sgd(1e-3))
state = opt.init(jax.random.key(1), space.init(jax.random.key(0)))
t0 = time.perf_counter(); lowered = opt.lower(state, objective, batch, jax.random.key(2))
t1 = time.perf_counter(); compiled = lowered.compile(); t2 = time.perf_counter()
state, metrics = opt.step(state, objective, batch, jax.random.key(2)); jax.block_until_ready(metrics["loss"])
t3 = time.perf_counter()
print(json.dumps({"params": sum(v.size for v in jax.tree.leaves(params)), "trace_s": t1 - t0, "compile_s": t2 - t1,
                  "first_step_s": t3 - t2, "loops": compiled.as_text().count(" while("), "loss": float(metrics["loss"])}))
"""


def measure(root: str, quick: bool) -> dict:
    """Each method's first call, run from source tree `root` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": root, "GFO_COMPILATION_CACHE": "0", "JAX_PLATFORMS": "cpu"}
    out = {}
    for name in METHODS:
        done = subprocess.run([sys.executable, "-c", _MEASURE, "1" if quick else "0", name], cwd=root, env=env,
                              capture_output=True, text=True, check=True)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def run(before: str | None = None, quick: bool = False, out_dir: str = "benchmarks/results") -> dict:
    from benchmarks.common import describe, machine, write

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = {}
    if before:
        with tempfile.TemporaryDirectory() as tmp:
            tree = os.path.join(tmp, "before")
            subprocess.run(["git", "-C", here, "worktree", "add", "--detach", tree, before], check=True,
                           capture_output=True)
            try:
                rows["before"] = measure(tree, quick)
            finally:
                subprocess.run(["git", "-C", here, "worktree", "remove", "--force", tree], capture_output=True)
    rows["now"] = measure(here, quick)
    m = machine()
    payload = {"machine": m, "quick": quick, "before": before, "rows": rows}
    now = rows["now"]
    lines = ["# The first call of a step (trace + compile)", "", describe(m), "",
             f"`python -m benchmarks.first_call{' --before ' + before if before else ''}`: GPT-2 layout, "
             f"{now['spsa']['params']:,} parameters, batch 4 × 65, `gfo.Optimizer(estimator, optax.sgd(1e-3))` "
             "as a script builds it; each in a fresh process without the compilation cache. `loops`: the "
             "compiled program's `while` loops (on CPU every threefry call is one). Seconds on this machine.",
             ""]
    head = "| step | trace s | compile s | loops | first step s | loss |"
    if before:
        head = ("| step | trace s (before → now) | compile s (before → now) | compile ratio | loops (before → now) | "
                "loss (before = now) |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name in METHODS:
        r = now[name]
        if before:
            b = rows["before"][name]
            lines.append(f"| {name} | {b['trace_s']:.1f} → {r['trace_s']:.1f} | {b['compile_s']:.1f} → "
                         f"{r['compile_s']:.1f} | {r['compile_s'] / b['compile_s']:.2f} | {b['loops']} → {r['loops']} | "
                         f"{b['loss']:.6f} {'=' if b['loss'] == r['loss'] else '≠'} {r['loss']:.6f} |")
        else:
            lines.append(f"| {name} | {r['trace_s']:.1f} | {r['compile_s']:.1f} | {r['loops']} | "
                         f"{r['first_step_s']:.2f} | {r['loss']:.6f} |")
    write(out_dir, "first_call_quick" if quick else "first_call", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", default=None, help="a commit to measure first, for ratios in one run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    run(args.before, args.quick, args.out)


if __name__ == "__main__":
    main()
