"""Throughput and memory of one optimisation step, against the inference ceiling, in one run.

    python -m benchmarks.throughput            # full: model sizes tiny..medium, populations 8..512
    python -m benchmarks.throughput --quick    # seconds: a 1-layer model, populations 8 and 16

For each model size and population `N` (every member evaluates the same `B × T` token batch):
- *inference ceiling*: one forward pass over `N·B` sequences with shared weights (tokens/s);
- `lowrank_es` (rank 1), `es` (seed-regenerated OpenAI-ES), evosax's `Open_ES` the plain way (population
  matrix `[N, dim]`, via `gfo.EvosaxStrategy`), `spsa` (n = 1) and `backprop` + Adam: time per step,
  evaluated tokens/s and the ratio to the ceiling;
- peak memory of the step (XLA compiled memory analysis: arguments + outputs + temporaries − aliases) as
  a multiple of the parameter bytes.
Members are evaluated in chunks of at most 64 (`eval_chunk`), so ES memory is set by the chunk.
Writes `throughput.json` and `throughput.md` (targets marked met / not met) to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import optax

import gfo
import models
from benchmarks.common import available_memory_bytes, compiled, describe, machine, mark, peak_bytes, seconds, write
from gfo.spaces import Full

SIZES = {"micro": dict(d_model=32, n_layers=1, n_heads=2), "tiny": dict(d_model=64, n_layers=2, n_heads=4), "small": dict(d_model=128, n_layers=4, n_heads=4),
         "medium": dict(d_model=256, n_layers=6, n_heads=8)}
TARGETS = ("low-rank ES at >= 0.9 of the inference ceiling for populations >= 64",
           "seed-regenerated ES memory independent of the population at a fixed chunk (peak at the largest N <= 1.1 × at the smallest)",
           "an SPSA step <= 2.5 forward passes of time",
           "es and lowrank_es faster per step than evosax's plain Open_ES wherever it fits")


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """Mean next-token cross-entropy of `tokens [B, T+1]` under `to_params(x)` (hashable: jit-static)."""

    model: models.TransformerLM
    space: Full

    def __call__(self, x, tokens, key):
        logits = self.model.apply(self.space.to_params(x), tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _step_fn(opt, objective):
    return lambda state, batch, key: opt.step(state, objective, batch, key)


def measure_size(name: str, overrides: dict, populations, batch: int, seq: int, repeats: int, chunk: int) -> dict:
    cfg = models.tiny("gpt2", max_seq_len=seq + 1, **overrides)
    model = models.TransformerLM(cfg)
    params = model.init(jax.random.key(0))
    space = Full(params)
    x0 = space.init(None)
    objective = NextTokenLoss(model, space)
    param_bytes = sum(v.nbytes for v in jax.tree.leaves(params))
    dim = sum(v.size for v in jax.tree.leaves(params))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
    key = jax.random.key(2)
    row = {"size": name, "params": int(dim), "param_bytes": int(param_bytes), "batch": batch, "seq": seq,
           "chunk": chunk, "populations": {}}

    forward, exe = compiled(lambda x, t: objective(x, t, key), x0, tokens)
    row["forward_s"] = seconds(forward, x0, tokens, repeats=repeats)

    def step_entry(opt, n_sequences):
        state = opt.init(key, x0)
        fn, exe = compiled(_step_fn(opt, objective), state, tokens, key)
        t = seconds(fn, state, tokens, key, repeats=repeats)
        return {"step_s": t, "tokens_per_s": n_sequences * seq / t, "peak_bytes": peak_bytes(exe),
                "peak_x_params": peak_bytes(exe) / param_bytes}

    row["spsa"] = step_entry(gfo.Optimizer(gfo.SPSA(eps=1e-3, n=1), optax.sgd(1e-4)), 2 * batch)
    row["spsa"]["forward_passes"] = row["spsa"]["step_s"] / row["forward_s"]
    row["backprop"] = step_entry(gfo.Optimizer(gfo.Backprop(), optax.adam(1e-3)), batch)
    available = available_memory_bytes()
    for n in populations:
        c = min(n, chunk)
        many = jnp.tile(tokens, (n, 1))
        ceiling, _ = compiled(lambda x, t: objective(x, t, key), x0, many)
        t_ceiling = seconds(ceiling, x0, many, repeats=repeats)
        entry = {"ceiling": {"step_s": t_ceiling, "tokens_per_s": n * batch * seq / t_ceiling}}
        optimizers = {
            "lowrank_es": gfo.Optimizer(gfo.LowRankES(population=n, sigma=0.01, rank=1, batch_size=c),
                                        optax.adam(1e-3)),
            "es": gfo.Optimizer(gfo.OpenES(population=n, sigma=0.01, batch_size=c), optax.adam(1e-3)),
        }
        for method, opt in optimizers.items():
            entry[method] = step_entry(opt, n * batch)
        # evosax's Open_ES holds the population matrix [n, dim]: compile first, run only if it fits.
        plain = gfo.EvosaxStrategy("Open_ES", n, x0, init_std=0.01, batch_size=c, memory_limit=2**62)
        state = plain.init(key, x0)
        fn, exe = compiled(_step_fn(plain, objective), state, tokens, key)
        need = peak_bytes(exe)
        entry["evosax_open_es"] = {"peak_bytes": need, "peak_x_params": need / param_bytes,
                                   "fits": need < 0.8 * available}
        if entry["evosax_open_es"]["fits"]:
            t = seconds(fn, state, tokens, key, repeats=repeats)
            entry["evosax_open_es"].update(step_s=t, tokens_per_s=n * batch * seq / t)
        for method in ("lowrank_es", "es", "evosax_open_es"):
            if "tokens_per_s" in entry[method]:
                entry[method]["ratio_to_ceiling"] = entry[method]["tokens_per_s"] / entry["ceiling"]["tokens_per_s"]
        row["populations"][n] = entry
        print(f"[{name}] N={n}: ceiling {entry['ceiling']['tokens_per_s']:.0f} tok/s; " + ", ".join(
            f"{m} {entry[m].get('ratio_to_ceiling', float('nan')):.2f}x" for m in ("lowrank_es", "es", "evosax_open_es")),
              flush=True)
    pops = sorted(row["populations"])
    plain = [row["populations"][n]["evosax_open_es"]["peak_bytes"] for n in pops]
    per_member = (plain[-1] - plain[0]) / max(pops[-1] - pops[0], 1)
    row["evosax_open_es_fits_up_to"] = int((0.8 * available - (plain[0] - per_member * pops[0])) / per_member) \
        if per_member > 0 else None
    return row


def payload_chunk(row) -> int:
    return row.get("chunk", 64)


def evaluate_targets(rows) -> list[dict]:
    lowrank = [r["populations"][n]["lowrank_es"]["ratio_to_ceiling"] for r in rows for n in r["populations"] if n >= 64]
    # At a fixed chunk (populations >= the chunk): memory may depend on the chunk, never on N.
    es_mem = []
    for r in rows:
        fixed = [n for n in r["populations"] if n >= payload_chunk(r)]
        if len(fixed) >= 2:  # growth from the smallest to the largest population
            es_mem.append(r["populations"][max(fixed)]["es"]["peak_bytes"] / r["populations"][min(fixed)]["es"]["peak_bytes"])
    spsa = [r["spsa"]["forward_passes"] for r in rows]
    ahead = [r["populations"][n][m]["step_s"] < r["populations"][n]["evosax_open_es"]["step_s"]
             for r in rows for n in r["populations"] if "step_s" in r["populations"][n]["evosax_open_es"]
             for m in ("es", "lowrank_es")]
    return [
        {"target": TARGETS[0], "met": (min(lowrank) >= 0.9) if lowrank else None,
         "measured": f"min ratio {min(lowrank):.2f}" if lowrank else "no population >= 64 measured"},
        {"target": TARGETS[1], "met": (max(es_mem) <= 1.1) if es_mem else None,
         "measured": f"max growth {max(es_mem):.3f} over populations >= the chunk" if es_mem else
         "fewer than two populations >= the chunk"},
        {"target": TARGETS[2], "met": max(spsa) <= 2.5, "measured": f"max {max(spsa):.2f} forward passes"},
        {"target": TARGETS[3], "met": all(ahead) if ahead else None,
         "measured": f"{sum(ahead)}/{len(ahead)} comparisons ahead"},
    ]


def markdown(payload) -> str:
    m = payload["machine"]
    lines = [f"# Throughput and memory of one step ({'quick' if payload['quick'] else 'full'} run)", "",
             f"{describe(m)} Batch {payload['rows'][0]['batch']} × {payload['rows'][0]['seq']} "
             f"tokens per member; members evaluated in chunks of ≤ {payload['chunk']}. A ratio above 1 means the "
             f"chunked step beats the single N·B-sequence forward pass (smaller working sets fit the CPU caches).",
             "", "## Targets", "",
             "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {mark(t['met'])} |" for t in payload["targets"]]
    for r in payload["rows"]:
        lines += ["", f"## {r['size']} ({r['params']:,} parameters, {r['param_bytes'] / 2**20:.2f} MiB)", "",
                  f"Forward pass over the batch: {r['forward_s'] * 1e3:.2f} ms. SPSA step: "
                  f"{r['spsa']['step_s'] * 1e3:.2f} ms = {r['spsa']['forward_passes']:.2f} forward passes, peak "
                  f"{r['spsa']['peak_x_params']:.1f}× params. Backprop + Adam step: {r['backprop']['step_s'] * 1e3:.2f} ms, "
                  f"peak {r['backprop']['peak_x_params']:.1f}× params. evosax Open_ES fits up to ≈ "
                  f"{r['evosax_open_es_fits_up_to'] if r['evosax_open_es_fits_up_to'] is not None else 'n/a'} members "
                  f"in this machine's memory.", "",
                  "| N | ceiling tok/s | method | step ms | tok/s | × ceiling | peak × params |",
                  "|---|---|---|---|---|---|---|"]
        for n, e in sorted(r["populations"].items(), key=lambda kv: int(kv[0])):
            for meth in ("lowrank_es", "es", "evosax_open_es"):
                v = e[meth]
                if "step_s" not in v:
                    lines.append(f"| {n} | {e['ceiling']['tokens_per_s']:,.0f} | {meth} | does not fit | | | "
                                 f"{v['peak_x_params']:.1f} |")
                    continue
                lines.append(f"| {n} | {e['ceiling']['tokens_per_s']:,.0f} | {meth} | {v['step_s'] * 1e3:.1f} | "
                             f"{v['tokens_per_s']:,.0f} | {v['ratio_to_ceiling']:.2f} | {v['peak_x_params']:.1f} |")
    return "\n".join(lines) + "\n"


def render(path: str) -> str:
    """Re-evaluate the targets and rewrite the Markdown of a saved `throughput*.json` (no measuring)."""
    import json

    with open(path) as f:
        payload = json.load(f)
    for r in payload["rows"]:
        r.setdefault("chunk", payload["chunk"])
        r["populations"] = {int(n): e for n, e in r["populations"].items()}
    payload["targets"] = evaluate_targets(payload["rows"])
    text = markdown(payload)
    write(os.path.dirname(path) or ".", os.path.basename(path)[:-5], payload, text)
    return text


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 1-layer model, populations 8 and 16, one repeat")
    p.add_argument("--out", default="benchmarks/results", help="directory for throughput.json / .md")
    p.add_argument("--sizes", nargs="*", default=None, help=f"model sizes among {list(SIZES)}")
    p.add_argument("--populations", nargs="*", type=int, default=None)
    p.add_argument("--render", metavar="JSON", default=None, help="only re-render a saved result file")
    args = p.parse_args(argv)
    if args.render:
        text = render(args.render)
        print(text)
        return {}
    sizes = args.sizes or (["micro"] if args.quick else [s for s in SIZES if s != "micro"])
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise SystemExit(f"unknown sizes {sorted(unknown)}: expected some of {list(SIZES)}")
    pops = args.populations or ([8, 16] if args.quick else [8, 64, 512])
    batch, seq, repeats, chunk = (2, 16, 1, 8) if args.quick else (4, 32, 3, 64)
    rows = [measure_size(s, SIZES[s], pops, batch, seq, repeats, chunk) for s in sizes]
    payload = {"quick": args.quick, "machine": machine(), "chunk": chunk, "rows": rows,
               "targets": evaluate_targets(rows)}
    text = markdown(payload)
    paths = write(args.out, "throughput" + ("_quick" if args.quick else ""), payload, text)
    print(text)
    print("wrote", *paths)
    return payload


if __name__ == "__main__":
    main()
