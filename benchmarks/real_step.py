"""The lean step on a real pretrained checkpoint: SmolLM2-135M-Instruct, full weights, on this machine.

    python -m benchmarks.real_step --model data/smollm2-135m-instruct --text data/moby_dick.txt --steps 3

1. **Blocked head**: `TransformerLM.token_logprobs` (the head a vocabulary block at a time) against the
   log-softmax of the full logits, on Moby-Dick windows tokenised by the checkpoint's own tokenizer.
2. **In-forward noise**: the loss of `x ± σε` with `ε` drawn inside the forward (`NoisyLeaf` leaves: rows
   of the embedding, one layer at a time, the tied head a block at a time) against the same loss on the
   materialised perturbed weights.
3. **The step**: XLA's peak memory of the `spsa` (MeZO), `es` (population 32, chunks of 8) and
   `lowrank_es` steps over all 134.5 M weights, as a multiple of the parameter bytes, and a few MeZO
   steps (SGD) on one batch, with the loss before and after.
Writes `real_step.json` and `real_step.md` to `--out`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gfo
import models
from benchmarks.common import describe, machine, write
from gfo.optim.noise import member_key, perturbed_leaf
from gfo.objectives import OnSpace
from gfo.spaces import Full


def windows(tokenizer, text_path: str, n: int, length: int) -> jax.Array:
    ids = tokenizer.encode(open(text_path, encoding="utf-8").read()[:200_000])
    starts = np.linspace(0, len(ids) - length - 1, n).astype(int)
    return jnp.asarray(np.stack([ids[s:s + length + 1] for s in starts]), jnp.int32)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_step", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="data/smollm2-135m-instruct", help="HF directory or GGUF file")
    p.add_argument("--text", default="data/moby_dick.txt")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    model, params = models.from_pretrained(args.model)
    tokenizer = models.load_tokenizer(args.model)
    seq = windows(tokenizer, args.text, 4, 64)
    tokens, targets = seq[:, :-1], seq[:, 1:]
    out = {"machine": machine(), "model": args.model, "params": int(model.num_params(params))}

    # 1. blocked head against the full logits
    blocked = jax.jit(model.token_logprobs)(params, tokens, targets)
    full = jnp.take_along_axis(jax.nn.log_softmax(model.apply(params, tokens)), targets[..., None], -1)[..., 0]
    out["head"] = {"nll_blocked": float(-blocked.mean()), "nll_full": float(-full.mean()),
                   "max_abs_diff": float(jnp.max(jnp.abs(blocked - full)))}
    print("[head]", out["head"], flush=True)

    # 2. in-forward noise against the materialised perturbed weights
    key, sigma = jax.random.key(0), 1e-3
    nll = jax.jit(lambda q: -model.token_logprobs(q, tokens, targets).mean())
    rows = []
    for sign in (1.0, -1.0):
        noisy = jax.tree_util.tree_map_with_path(lambda path, w: perturbed_leaf(key, path, w, sign * sigma), params)
        dense = jax.tree.map(lambda n: n.dense(), noisy, is_leaf=lambda n: isinstance(n, models.NoisyLeaf))
        rows.append({"sign": sign, "in_forward": float(nll(noisy)), "materialised": float(nll(dense))})
    out["noise"] = {"sigma": sigma, "base": float(nll(params)), "rows": rows}
    print("[noise]", out["noise"], flush=True)

    # 3. the steps: peak memory, and MeZO on one batch
    space = Full(params)
    x0 = space.init(None)
    del params
    loss = OnSpace(lambda q, batch, key: -model.token_logprobs(q, batch[:, :-1], batch[:, 1:]).mean(), space)
    param_bytes = sum(v.nbytes for v in jax.tree.leaves(x0))
    sgd = optax.sgd(1e-5)
    methods = {  # leafwise: each leaf's update made, applied and dropped before the next (as gfo train runs)
        "spsa": gfo.Optimizer(gfo.SPSA(eps=1e-3, n=1, factored=True), sgd, leafwise=True),
        "es": gfo.Optimizer(gfo.OpenES(population=32, sigma=1e-3, batch_size=8, factored=True), sgd, leafwise=True),
        "lowrank_es": gfo.Optimizer(gfo.LowRankES(population=32, sigma=1e-3, rank=1, batch_size=8), sgd,
                                    leafwise=True),
    }
    out["steps"] = {}
    for name, opt in methods.items():
        state = opt.init(jax.random.key(1), x0)
        t0 = time.perf_counter()
        exe = opt.lower(state, loss, seq, jax.random.key(2)).compile()
        m = exe.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        out["steps"][name] = {"compile_s": time.perf_counter() - t0, "peak_x_params": peak / param_bytes}
        print(f"[step] {name}: {out['steps'][name]}", flush=True)
        if name == "spsa":
            before = float(jax.jit(loss)(state.x, seq, jax.random.key(0)))
            for i in range(args.steps):
                state, metrics = opt.step(state, loss, seq, jax.random.key(10 + i))
            after = float(jax.jit(loss)(state.x, seq, jax.random.key(0)))
            out["mezo"] = {"steps": args.steps, "lr": 1e-5, "eps": 1e-3, "loss_before": before, "loss_after": after,
                           "last_loss_range": float(metrics["loss_range"])}
            print("[mezo]", out["mezo"], flush=True)
    text = markdown(out)
    print(text)
    write(args.out, "real_step", out, text)
    return out


def markdown(out: dict) -> str:
    h, nz = out["head"], out["noise"]
    lines = [f"# The lean step on a real checkpoint ({out['model']}, {out['params']:,} parameters)", "",
             describe(out["machine"]), "", "`python -m benchmarks.real_step` (see its docstring). 4 × 64 tokens of "
             "Moby-Dick, the checkpoint's tokenizer, float32.", "", "## Blocked head vs full logits", "",
             f"Mean NLL {h['nll_blocked']:.6f} (blocked) vs {h['nll_full']:.6f} (full logits); "
             f"max |Δ log p| {h['max_abs_diff']:.2e}.", "", f"## Noise drawn inside the forward (σ = {nz['sigma']})", "",
             f"Unperturbed NLL {nz['base']:.6f}.", "", "| sign | in-forward | materialised | difference |", "|---|---|---|---|"]
    lines += [f"| {r['sign']:+.0f} | {r['in_forward']:.6f} | {r['materialised']:.6f} | "
              f"{abs(r['in_forward'] - r['materialised']):.2e} |" for r in nz["rows"]]
    lines += ["", "## Steps over all weights (Full space)", "", "| method | compile s | peak × params |", "|---|---|---|"]
    lines += [f"| {k} | {v['compile_s']:.1f} | {v['peak_x_params']:.2f} |" for k, v in out["steps"].items()]
    if "mezo" in out:
        mz = out["mezo"]
        lines += ["", f"MeZO (SPSA n=1, ε {mz['eps']}, SGD lr {mz['lr']}), {mz['steps']} steps on the same batch: "
                      f"loss {mz['loss_before']:.4f} → {mz['loss_after']:.4f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
