"""Low-rank ES (EGGROLL) on a custom, non-differentiable reward computed in Python on generated text.

    python examples/es_custom_reward.py [--steps 10] [--population 16]

The reward is the fraction of digits in a greedy completion — any Python function of the decoded strings
works (`gfo.rollout.host_reward`); ES minimises its negation.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gfo
import models
from gfo.rollout import GenerationReward, host_reward

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=10), p.add_argument("--population", type=int, default=16)
args = p.parse_args()

model = models.TransformerLM(models.tiny("gpt2"))
tokenizer = models.ByteTokenizer()
space = gfo.spaces.Full(model.init(jax.random.key(0)))
prompt, mask = tokenizer.batch_encode(["Count: ", "Numbers: ", "Digits: ", "Say 7: "])
batch = {"prompt": jnp.asarray(prompt), "prompt_mask": jnp.asarray(mask)}


def digit_fraction(tokens, lengths, rows):  # NumPy on the host: [N, L] completions -> [N] rewards
    texts = [tokenizer.decode(t[:n].tolist()) for t, n in zip(tokens, lengths)]
    return np.array([sum(c.isdigit() for c in s) / max(len(s), 1) for s in texts], np.float32)


objective = GenerationReward(model, space.to_params, host_reward(digit_fraction), max_new_tokens=8,
                             group_size=1, temperature=0.0, leaf_descriptors=True)  # greedy completions
opt = gfo.Optimizer(gfo.LowRankES(population=args.population, sigma=0.05), optax.adam(3e-2))
state = opt.init(jax.random.key(1), space.init(jax.random.key(2)))
start = -float(objective(opt.solution(state), batch, jax.random.key(0)))
for t in range(args.steps):
    state, metrics = opt.step(state, objective, batch, jax.random.key(t))
    print(f"step {t + 1}: mean member reward {-float(metrics['loss']):.3f}")
print(f"reward {start:.3f} -> {-float(objective(opt.solution(state), batch, jax.random.key(0))):.3f}")
