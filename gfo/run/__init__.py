"""Config → results: the run axis of gfo, one job per module.

`config` (the typed, validated YAML + `--set` config), `build` (the four axes from a config, and a `Run`:
one stage's parts, built once for `gfo train`, `gfo eval` and `gfo decode`), `stepplan`
(the step compiled ahead, its memory refused when it cannot fit, the compilation cache), `checkpoint`
(orbax state on disk, restore, resume checks), `evaluation` (eval rows, dev selection, the best point),
`metrics_log` (metrics.jsonl, TensorBoard), `loop` (the pipelined step loop), `train` (`gfo train`),
`evaluate` (`gfo eval`, `gfo decode`), `export` (`gfo export`: Hugging Face, PEFT, GGUF), `sweep` (`gfo sweep`),
`report` (`gfo report`), `demo`, `quickstart` and `cli`.
Nothing outside `gfo.run` imports it, and none of its modules imports `train` but `cli` and `sweep`."""
