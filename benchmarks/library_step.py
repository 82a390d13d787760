"""The library door: the step a research script gets with no extra arguments, in XLA's memory analysis.

Issue 23's script: the GPT-2 layout (d 256, 8 layers, vocab 50257), a batch of 4 × 65 tokens, a
next-token loss written with the README's blocked `model.token_logprobs`, searched over `gfo.spaces.Full`
and handed to the optimizer as `gfo.OnSpace(loss, space)` — then

    gfo.Optimizer(gfo.SPSA(eps=1e-3), optax.sgd(1e-3))                 # MeZO
    gfo.Optimizer(gfo.OpenES(population=16, sigma=1e-3), optax.sgd(1e-3))

compiled exactly as a script calls them (`opt.step(state, objective, batch, key)`), and the peak of
each compiled step (arguments + outputs − donated + temporaries) as a multiple of the parameter bytes.
Targets (issue 23): SPSA ≤ 1.5 ×, OpenES (population 16) ≤ 2.5 ×. Also the first call (trace +
compile + run) of each step, in seconds on this machine.

    python -m benchmarks.library_step            # the issue's sizes
    python -m benchmarks.library_step --quick    # a tiny model (what the tests run)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import gfo
import models
from benchmarks.common import describe, machine, mark, write

TARGETS = {"spsa": 1.5, "openes": 2.5}
# The same script on the commit before the library got the lean step (2cf7ad7, this benchmark run there on
# the same machine, 2026-12-01): dense perturbed copies, the whole-tree update, an unchunked population.
BEFORE = {"spsa": 4.37, "openes": 25.26}


def script_objective(model, params):
    """What a research script writes: a loss over model parameters on a space, as the README shows."""
    space = gfo.spaces.Full(params)

    def loss(p, batch, key):
        del key
        tokens = batch["tokens"]
        return -model.token_logprobs(p, tokens[:, :-1], tokens[:, 1:]).mean()

    return space, gfo.OnSpace(loss, space)


def measure(name: str, optimizer, space, objective, batch, param_bytes: int) -> dict:
    x0 = space.init(jax.random.key(0))
    state = optimizer.init(jax.random.key(1), x0)
    key = jax.random.key(2)
    t0 = time.perf_counter()
    compiled = optimizer.lower(state, objective, batch, key).compile()
    compile_s = time.perf_counter() - t0
    a = compiled.memory_analysis()
    peak = (a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes)
    t0 = time.perf_counter()
    state, metrics = optimizer.step(state, objective, batch, key)
    jax.block_until_ready(metrics["loss"])
    step_s = time.perf_counter() - t0
    planned = optimizer.prepare(objective, state.x, batch, key)
    return {"method": name, "optimizer": repr(optimizer), "as_run": repr(planned), "peak_x_params": peak / param_bytes,
            "temporaries_x_params": a.temp_size_in_bytes / param_bytes, "compile_s": compile_s,
            "first_step_s": step_s, "loss": float(metrics["loss"])}


def run(quick: bool = False, out_dir: str = "benchmarks/results") -> dict:
    if quick:
        cfg = models.tiny("gpt2", d_model=64, n_layers=2, n_heads=4)
        batch_shape = (2, 17)
    else:
        cfg = models.tiny("gpt2", d_model=256, n_layers=8, n_heads=8, vocab_size=50257, max_seq_len=128)
        batch_shape = (4, 65)
    model = models.TransformerLM(cfg)
    params = model.init(jax.random.key(0))
    param_bytes = sum(v.nbytes for v in jax.tree.leaves(params))
    batch = {"tokens": jax.random.randint(jax.random.key(3), batch_shape, 0, cfg.vocab_size, jnp.int32)}
    space, objective = script_objective(model, params)
    rows = [measure("spsa", gfo.Optimizer(gfo.SPSA(eps=1e-3), optax.sgd(1e-3)), space, objective, batch,
                    param_bytes),
            measure("openes", gfo.Optimizer(gfo.OpenES(population=16, sigma=1e-3), optax.sgd(1e-3)), space,
                    objective, batch, param_bytes)]
    for r in rows:
        r["target_x_params"] = TARGETS[r["method"]]
        r["met"] = None if quick else r["peak_x_params"] <= TARGETS[r["method"]]
    m = machine()
    payload = {"machine": m, "quick": quick, "params": param_bytes // 4, "batch": list(batch_shape), "rows": rows}
    lines = ["# The library's step, as a script gets it (no extra arguments)", "", describe(m), "",
             "`python -m benchmarks.library_step`: XLA's compiled memory analysis of the step a script gets from "
             "`gfo.Optimizer(estimator, optax.sgd(1e-3))` with no other argument; peak = arguments + outputs − "
             "donated + temporaries (unused arguments are pruned), in multiples of the parameter bytes. 'As run' "
             "is the estimator the step resolved (descriptors from the objective, the chunk from the budget).", "",
             f"GPT-2 layout, {param_bytes // 4:,} parameters (float32), batch {batch_shape[0]} × {batch_shape[1]} "
             f"tokens, loss `-model.token_logprobs(...)` over `gfo.spaces.Full` as `gfo.OnSpace(loss, space)`."
             + (" Quick run: checks the benchmark, not the targets." if quick else ""), "",
             "| step | peak / params | before (2cf7ad7) | temporaries / params | target | compile s | first step s |",
             "|---|---|---|---|---|---|---|"]
    as_run = [f"- as run: `{r['as_run']}`" for r in rows]
    for r in rows:
        before = "—" if quick else f"{BEFORE[r['method']]:.2f}"
        lines.append(f"| `{r['optimizer']}` | {r['peak_x_params']:.2f} | {before} | {r['temporaries_x_params']:.2f} | "
                     f"≤ {r['target_x_params']} {mark(r['met'])} | {r['compile_s']:.1f} | {r['first_step_s']:.2f} |")
    lines += [""] + as_run
    write(out_dir, "library_step_quick" if quick else "library_step", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    run(args.quick, args.out)


if __name__ == "__main__":
    main()
