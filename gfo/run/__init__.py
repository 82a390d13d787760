"""The pieces of a `gfo train` run, one job per module: `checkpoint` (orbax state on disk, restore,
resume checks), `evaluation` (eval rows, dev selection, the best point), `metrics_log` (metrics.jsonl,
TensorBoard) and `loop` (the pipelined step loop). `gfo.train` composes them; none imports it."""
