"""The pieces of a `gfo train` run, one job per module: `checkpoint` (orbax state on disk, restore and
resume checks), `evaluation` (eval rows, dev selection, the best point) and `loop` (the pipelined step
loop). `gfo.train` composes them; none of them imports it."""
