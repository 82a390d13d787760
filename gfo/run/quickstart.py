"""The embedded quickstart (`gfo train` with no arguments; also `paper_configs/quickstart.yaml`).

Pre-train a tiny byte-level GPT-2 with Adam on countdown reference solutions (cross-entropy, briefly:
it learns the answer format but rarely the arithmetic), then fine-tune it with low-rank ES
(EGGROLL-style) on the countdown *reward* of its own greedy completions; on 2 CPU cores the eval reward
rises from about 0.13 to about 0.3 (accuracy from ~3 % to ~20 %) in about two minutes.
"""

QUICKSTART = """\
name: quickstart
seed: 0
steps: 40
eval_every: 10
log_every: 5
checkpoint_every: 20
model: {family: gpt2, overrides: {d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 96}}
task: {name: countdown, batch_size: 16, eval_size: 32, options: {n_numbers: 2, max_number: 3}}
space: {kind: full}
optimizer: {method: lowrank_es, population: 32, sigma: 0.01, rank: 1, lr: 0.002, transform: adam, eval_chunk: 16}
pretrain:
  steps: 100
  task: {name: countdown, objective: cross_entropy, batch_size: 32, eval_size: 32, options: {n_numbers: 2, max_number: 3}}
  optimizer: {method: backprop, transform: adam, lr: 0.003}
"""
