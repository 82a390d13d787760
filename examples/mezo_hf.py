"""MeZO (Malladi et al. 2023, arXiv 2305.17333) on a Hugging Face checkpoint directory, as a script.

    python examples/mezo_hf.py CHECKPOINT_DIR [--text FILE] [--steps 20] [--lr 1e-4]

SPSA with `optax.sgd` is MeZO; `gfo.OnSpace(loss, Full(params))` tells the step that the loss reads the
parameters through the model, so `z` is drawn inside the forward and the update is made leaf by leaf.
"""
import argparse

import jax
import jax.numpy as jnp
import optax

import gfo
import models

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("checkpoint"), p.add_argument("--text"), p.add_argument("--steps", type=int, default=20)
p.add_argument("--lr", type=float, default=1e-4), p.add_argument("--eps", type=float, default=1e-3)
args = p.parse_args()

model, params = models.from_pretrained(args.checkpoint)
tokenizer = models.load_tokenizer(args.checkpoint)  # the checkpoint's own tokenizer
text = open(args.text).read() if args.text else "The quick brown fox jumps over the lazy dog. " * 40
ids = jnp.asarray(tokenizer.encode(text)[: 4 * 33], jnp.int32).reshape(4, 33)  # 4 rows × 33 tokens
batch = {"tokens": ids}

space = gfo.spaces.Full(params)
loss = lambda p, b, key: -model.token_logprobs(p, b["tokens"][:, :-1], b["tokens"][:, 1:]).mean()  # noqa: E731
objective = gfo.OnSpace(loss, space)
opt = gfo.Optimizer(gfo.SPSA(eps=args.eps), optax.sgd(args.lr))
state = opt.init(jax.random.key(0), space.init(jax.random.key(1)))
start = float(objective(opt.solution(state), batch, None))
for t in range(args.steps):
    state, metrics = opt.step(state, objective, batch, jax.random.key(t))
    print(f"step {t + 1}: loss at x ± εz {float(metrics['loss']):.4f}")
print(f"cross-entropy {start:.4f} -> {float(objective(opt.solution(state), batch, None)):.4f}")
