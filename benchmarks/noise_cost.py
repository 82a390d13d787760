"""What drawing one full-rank perturbation costs, in forward passes of the model it perturbs, in one run.

    python -m benchmarks.noise_cost                  # GPT-2 124M shapes, batch 4 × 64 tokens
    python -m benchmarks.noise_cost --quick          # a small GPT-2, seconds

Full-rank ES and SPSA draw one noise tree per direction to evaluate it and once more to update; at short
sequences that is most of their step. This measures, on this backend, the time of drawing one noise tree
shaped like the model's parameters (leaf by leaf, each leaf from its own key, as `gfo.optim.noise` does) with:
- `hashed gaussian`: gfo's `gaussian` — each row's key expanded by a counter hash
  (`models.noise.hashed_bits`), through the inverse normal CDF;
- `threefry gaussian`: `jax.random.normal` on the default threefry keys (gfo's `gaussian_threefry`);
- `threefry rademacher (packed)`: 32 signs unpacked from each random word (gfo's `rademacher`);
- `threefry rademacher (jax)`: `jax.random.rademacher`, one word per sign;
- `rbg gaussian`, `unsafe_rbg gaussian`: the same normal draw on XLA's RngBitGenerator keys;
- `shared table`: OpenAI-ES's shared noise table — each leaf reads a slice of one pre-generated
  Gaussian table at an offset drawn from its key (the table itself is drawn once, outside the step);
and, for scale, one pass over the weights (`w · 1.5 + 1`), all as ratios to one forward pass over the
batch. Writes `noise_cost.json` / `.md` to `--out`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import models
from benchmarks.common import describe, machine, seconds, write
from gfo.optim.noise import leaf_key, path_name
from models.noise import standard_noise

TABLE_SIZE = 2**25  # floats (128 MiB): at least the largest leaf of the models measured


def _per_leaf(tree, draw):
    return jax.tree_util.tree_map_with_path(lambda p, w: draw(leaf_key(KEY, p), w.shape), tree)


KEY = jax.random.key(0)


def _drawers(table):
    def rekey(impl):
        return lambda k, shape: jax.random.normal(jax.random.key(jax.random.key_data(k)[-1], impl=impl), shape)

    def from_table(k, shape):
        n = 1
        for s in shape:
            n *= s
        offset = jax.random.randint(k, (), 0, table.shape[0] - n + 1)
        return jax.lax.dynamic_slice(table, (offset,), (n,)).reshape(shape)

    return {
        "hashed gaussian": lambda k, shape: standard_noise(k, shape, "gaussian"),
        "threefry gaussian": lambda k, shape: standard_noise(k, shape, "gaussian_threefry"),
        "threefry rademacher (packed)": lambda k, shape: standard_noise(k, shape, "rademacher"),
        "threefry rademacher (jax)": lambda k, shape: jax.random.rademacher(k, shape, jnp.float32),
        "rbg gaussian": rekey("rbg"),
        "unsafe_rbg gaussian": rekey("unsafe_rbg"),
        "shared table": from_table,
    }


def measure(cfg: models.ModelConfig, batch: int, seq: int, repeats: int) -> dict:
    model = models.TransformerLM(cfg)
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)

    @jax.jit
    def forward(p, t):
        logits = model.apply(p, t[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

    t_forward = seconds(forward, params, tokens, repeats=repeats)
    largest = max(v.size for v in jax.tree.leaves(params))
    table = jax.random.normal(jax.random.key(9), (max(TABLE_SIZE, largest),))
    rows = {}
    for name, draw in _drawers(table).items():
        fn = jax.jit(lambda p, tab, draw=draw: _per_leaf(p, draw))
        t = seconds(fn, params, table, repeats=repeats)
        rows[name] = {"seconds": t, "forward_passes": t / t_forward}
        print(f"{name:30s} {t * 1e3:9.1f} ms = {t / t_forward:6.2f} forward passes", flush=True)
    t_pass = seconds(jax.jit(lambda p: jax.tree.map(lambda w: w * 1.5 + 1.0, p)), params, repeats=repeats)
    rows["one pass over the weights"] = {"seconds": t_pass, "forward_passes": t_pass / t_forward}
    return {"params": int(sum(v.size for v in jax.tree.leaves(params))), "batch": batch, "seq": seq,
            "forward_s": t_forward, "draws": rows, "leaves": [path_name(p) for p, _ in
                                                                jax.tree_util.tree_flatten_with_path(params)[0]][:3]}


def markdown(payload: dict) -> str:
    r = payload["result"]
    lines = [f"# The cost of one full-rank noise draw ({'quick' if payload['quick'] else 'full'} run)", "",
             f"{describe(payload['machine'])} Model: {payload['model']} ({r['params']:,} parameters); one forward "
             f"pass over {r['batch']} × {r['seq']} tokens: {r['forward_s'] * 1e3:.1f} ms.", "",
             "| noise | one tree (ms) | × forward pass |", "|---|---|---|"]
    lines += [f"| {name} | {v['seconds'] * 1e3:.1f} | {v['forward_passes']:.2f} |" for name, v in r["draws"].items()]
    d = r["draws"]
    bound = lambda name: f"≈ {1 / (1 + d[name]['forward_passes']):.2f}"  # noqa: E731
    lines += ["", "Full-rank ES draws each direction's noise once to evaluate its antithetic pair (inside the "
              "forward) and once to update, so about one draw per member, and reaches at best ≈ 1 / (1 + one "
              f"draw) of the batched-inference ceiling: {bound('threefry gaussian')} with threefry Gaussians, "
              f"{bound('hashed gaussian')} with hashed Gaussians (gfo's `gaussian`), "
              f"{bound('threefry rademacher (packed)')} with packed Rademacher signs. SPSA draws twice per query."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.noise_cost", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small GPT-2 (d_model 128, 2 layers), one repeat")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.quick:
        name, cfg, repeats = "GPT-2 small-shaped (d_model 128, 2 layers)", models.tiny(
            "gpt2", d_model=128, n_layers=2, n_heads=4, vocab_size=4096, max_seq_len=65), 1
    else:
        name, cfg, repeats = "GPT-2 124M", models.gpt2(vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                                                         max_seq_len=1024), 3
    result = measure(cfg, 4, 64, repeats)
    payload = {"quick": args.quick, "machine": machine(), "model": name, "result": result}
    text = markdown(payload)
    paths = write(args.out, "noise_cost" + ("_quick" if args.quick else ""), payload, text)
    print(text)
    print("wrote", *paths)
    return payload


if __name__ == "__main__":
    main()
