"""The foundation demo: build a tiny LM, fit it briefly, round-trip it through the Hugging Face
format, and generate from it with the KV cache (greedy and nucleus sampling).

    python -m gfo.run.demo            # or: gfo demo
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models

FAMILIES = ("gpt2", "llama", "opt")
CORPUS = "the cat sat on the mat. the dog sat on the log. the bird sat on the branch. "


def _batches(tok: models.ByteTokenizer, seq_len: int, batch: int, key: jax.Array):
    data = np.asarray(tok.encode(CORPUS * 4), np.int32)
    while True:
        key, sub = jax.random.split(key)
        starts = np.asarray(jax.random.randint(sub, (batch,), 0, len(data) - seq_len - 1))
        yield np.stack([data[s:s + seq_len + 1] for s in starts])


def run(steps: int = 150, family: str = "gpt2", seed: int = 0) -> list[dict]:
    """Fit a tiny model to a toy corpus with Adam; return rows of the results table."""
    tok = models.ByteTokenizer()
    model = models.TransformerLM(models.tiny(family))
    key_init, key_data, key_sample = jax.random.split(jax.random.key(seed), 3)
    params = model.init(key_init)
    print(f"model: {family}, {model.num_params(params):,} parameters, devices: {jax.devices()}")
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(p, seq_BxT1):
        logits = model.apply(p, seq_BxT1[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, seq_BxT1[:, 1:]).mean()

    @jax.jit
    def step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    batches = _batches(tok, 48, 16, key_data)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, next(batches))
        if i % 25 == 0 or i == 1:
            rate = i / (time.perf_counter() - start)
            print(f"step {i:4d}/{steps}  loss {float(loss):.3f}  ({rate:.1f} steps/s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        models.save_pretrained(model, params, tmp)
        model, params = models.from_pretrained(tmp)
    print("saved and reloaded through the Hugging Face format (config.json + model.safetensors)")

    prompts = ["the cat", "the dog sat", "the bird"]
    ids, mask = tok.batch_encode(prompts)
    rows = []
    for name, kw in (("greedy", dict(temperature=0.0)), ("top-p 0.9", dict(temperature=0.8, top_p=0.9))):
        out = models.generate(model, params, ids, mask, key_sample, max_new_tokens=24, **kw)
        for prompt, toks, n in zip(prompts, np.asarray(out.tokens), np.asarray(out.lengths)):
            rows.append(dict(decoding=name, prompt=prompt, completion=tok.decode(toks[:n])))
    rows.append(dict(decoding="final loss", prompt="", completion=f"{float(loss):.3f}"))
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| decoding | prompt | completion |\n|---|---|---|")
    for r in rows:
        print(f"| {r['decoding']} | {r['prompt']} | {r['completion']!r} |")


def main(argv: list[str] | None = None) -> None:
    description = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog="gfo demo", description=description)
    parser.add_argument("--steps", type=int, default=150, help="Adam steps on the toy corpus (default 150)")
    parser.add_argument("--family", choices=FAMILIES, default="gpt2", help="model family (default gpt2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: expected an integer >= 1")
    print_table(run(args.steps, args.family, args.seed))


if __name__ == "__main__":
    main()
