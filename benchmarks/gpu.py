"""Everything an accelerator should measure, in one run and one results file: parity in float32 and bfloat16,
the rollout benchmark, the step's throughput, and the first steps of ES at scale's countdown config — on a
Qwen2.5-0.5B-Instruct-shaped model.

    python -m benchmarks.gpu                # on a GPU or TPU: real sizes; writes results/gpu_<device>.{json,md}
    python -m benchmarks.gpu --toy          # tiny shapes on any backend, seconds (tests/test_benchmarks.py runs it)
    python -m benchmarks.gpu --only parity,rollouts   # a subset of the four parts (each saved as it ends)
    python -m benchmarks.gpu --only rollouts --rollout-grid small --name gpu_rollouts   # one part in a short slot

Parts (each a section of the one JSON file, with the Markdown rendering of it next to it):
1. `parity`: a Qwen2-family model with random weights written by `transformers` (torch, float32, on the CPU:
   the reference) and loaded by gfo onto the device three ways — float32 at XLA's default matmul precision
   (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs), float32 at `highest` precision (the exact
   reference), and bfloat16 weights and activations. For each: max |Δlogit| / max |logit| on the real
   tokens of a left-padded batch, the fraction of positions whose argmax agrees, the first 16 greedy tokens
   of every row against `transformers`' `generate`, and `models.generate` (KV cache) against
   `models.generate.greedy_without_cache` (the whole sequence re-run per token) on the device.
2. `rollouts`: generated tokens/s of `models.generate` at rows 1/8/32/128 × 64/256/1024 new tokens, greedy and
   sampled (temperature 0.7, top-p 0.9), float32 and bfloat16, against the ceiling measured here
   (`benchmarks.rollouts.ceiling`: max(one read of the weights, 2·params·rows FLOPs) per decode step), and a
   low-rank ES generation step against plain generation of as many rows (EGGROLL: 0.69). The CPU engines of
   `benchmarks/rollouts.py` are not run here: on an accelerator they would measure the host.
3. `throughput`: `benchmarks.throughput.measure_model` (es, lowrank_es, spsa steps: compile time, XLA's peak
   memory × params, step time against the batched-inference ceiling) on the Qwen2.5-0.5B shape, in float32.
4. `es_countdown`: `paper_configs/es_countdown.yaml` itself (N 30, σ 1e-3, z-scored, up to 1,024 new tokens,
   greedy), its model replaced by the Qwen2.5-0.5B shape (random weights, bfloat16, byte tokenizer) and its
   1,000 questions per step by `--countdown-batch` generated problems, for `--countdown-steps` steps through
   `gfo.run.train.train`: seconds per step, rollouts/s and generated tokens/s per device.
Every timing is the best of `--repeats` calls after an untimed one (compilation excluded) unless it says
otherwise. A part that fails is recorded with its error and the other parts still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import models
from benchmarks import rollouts, throughput
from benchmarks.common import describe, machine, write
from models.generate import greedy_without_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_SHAPE = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 tie_embeddings=True, rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=512)
# relative logit error bounds: float32 at highest precision is the exact reference (the parity tests' bound);
# TF32 / bfloat16-pass matmuls keep ~10 mantissa bits, bfloat16 weights and activations 8
BOUNDS = {"float32 highest": 1e-4, "float32 default": 2e-2, "bfloat16": 6e-2}


def shape(toy: bool) -> dict:
    return dict(TOY_SHAPE) if toy else dict(rollouts.QWEN_SHAPE)


def _batch(vocab: int, rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`rows` random prompts of `length` tokens, the odd rows left-padded by a quarter of it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, : length // 4] = 0
    ids[mask == 0] = 0
    return ids, mask


# ----------------------------------------------------------------------------- 1. parity
def parity(toy: bool, new_tokens: int = 16) -> dict:
    import torch

    s = shape(toy)
    hf = rollouts.hf_qwen2(s)
    ids, mask = _batch(s["vocab_size"], 4, 24)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()
        hf_greedy = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                                use_cache=True)[:, ids.shape[1]:].numpy()
    real = mask.astype(bool)
    out = {"shape": s, "rows": ids.shape[0], "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "modes": {}}
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        loaded = {dtype: models.from_pretrained(d, dtype=dtype) for dtype in ("float32", "bfloat16")}
    for mode, dtype, precision in (("float32 highest", "float32", "highest"), ("float32 default", "float32", None),
                                   ("bfloat16", "bfloat16", None)):
        model, params = loaded[dtype]
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
            cached = np.asarray(models.generate(model, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                                                new_tokens).tokens)
            uncached = greedy_without_cache(model, params, ids, mask, new_tokens)
        err = float(np.max(np.abs(logits[real] - ref[real])) / np.max(np.abs(ref[real])))
        out["modes"][mode] = {
            "rel_logit_error": err, "bound": BOUNDS[mode], "within_bound": err <= BOUNDS[mode],
            "argmax_agreement": float(np.mean(np.argmax(logits[real], -1) == np.argmax(ref[real], -1))),
            "greedy_rows_equal_transformers": float(np.mean(np.all(cached == hf_greedy, 1))),
            "greedy_tokens_equal_transformers": float(np.mean(cached == hf_greedy)),
            "cache_equals_no_cache": bool(np.array_equal(cached, uncached))}
        print(f"[parity] {mode}: {out['modes'][mode]}", flush=True)
    return out


# ----------------------------------------------------------------------------- 2. rollouts
def rollout_grid(toy: bool, kind: str = "full"):
    if toy:
        return [(2, 8, False), (4, 8, True)]
    if kind == "small":  # one decode length: fits a 10-minute slot with both dtypes
        return [(r, 256, smp) for r in (8, 32, 128) for smp in (False, True)]
    return [(r, n, smp) for r in (1, 8, 32, 128) for n in (64, 256, 1024) for smp in (False, True)]


def rollout_part(toy: bool, repeats: int, kind: str = "full") -> dict:
    mach = rollouts.measure_machine(repeats, matmul_size=512 if toy else 8192)
    s = shape(toy)
    out = {"ceiling_inputs": mach, "rows": [], "es": [], "cache_memory": []}
    for dtype in ("float32", "bfloat16"):  # compile only: XLA's temporaries against the cache's bytes
        model = models.TransformerLM(models.tiny("qwen2", dtype=dtype, param_dtype=dtype, **s))
        params = jax.eval_shape(model.init, jax.random.key(0))
        out["cache_memory"].append({"dtype": dtype, **rollouts.cache_memory(model, params, 8 if toy else 32,
                                                                           16 if toy else 48, 256)})
    for dtype in ("bfloat16",) if toy else ("float32", "bfloat16"):  # (toy: the narrower path only, fewer compiles)
        model = models.TransformerLM(models.tiny("qwen2", dtype=dtype, param_dtype=dtype, **s))
        params = model.init(jax.random.key(0))
        n_params = model.num_params(params)
        bytes_per = jnp.dtype(dtype).itemsize
        for rows, n, sampled in rollout_grid(toy, kind):
            batch = rollouts.prompts(rows, s["vocab_size"])
            fn = rollouts.Gfo(model, params).run(batch, n, sampled, 0)
            secs = rollouts.best_time(fn, repeats)
            row = {"dtype": dtype, "params": n_params, "rows": rows, "new_tokens": n,
                   "decoding": "sampled (T 0.7, top-p 0.9)" if sampled else "greedy", "gfo_tok_s": rows * n / secs,
                   **rollouts.ceiling(n_params, rows, mach, bytes_per_param=bytes_per)}
            row["gfo_vs_ceiling"] = row["gfo_tok_s"] / row["ceiling_tok_s"]
            out["rows"].append(row)
            print(f"[rollouts] {row}", flush=True)
        members, per, n = (4, 2, 8) if toy else (32, 8, 256)
        es = rollouts.es_step(model, params, members, per, n, repeats, 0)
        out["es"].append({"dtype": dtype, **es})
        print(f"[rollouts] ES step {out['es'][-1]}", flush=True)
    return out


# ----------------------------------------------------------------------------- 3. throughput
def throughput_part(toy: bool, repeats: int) -> dict:
    s = shape(toy)
    cfg = models.tiny("qwen2", **s)
    populations, chunk = ((4,), 2) if toy else ((32, 128), 8)
    batch, seq = (2, 16) if toy else (4, 64)
    methods = ("lowrank_es",) if toy else ("spsa", "es", "lowrank_es")  # (toy: one compile, not five)
    row = throughput.measure_model("Qwen2.5-0.5B-shaped" if not toy else "toy Qwen2", cfg, populations, chunk,
                                   batch, seq, repeats, "gaussian", methods)
    return {"batch": batch, "seq": seq, "chunk": chunk, "row": row}


# ----------------------------------------------------------------------------- 4. es_countdown
def countdown_part(toy: bool, steps: int, batch: int, work: str, *, config: str = "paper_configs/es_countdown.yaml",
                   population: int | None = None, new_tokens: int | None = None, dtype: str | None = None,
                   extra: tuple[str, ...] = ()) -> dict:
    """The first `steps` steps of a countdown paper config on the Qwen2.5-0.5B shape (`extra`: more
    `--set`-style overrides, e.g. `optimizer.method=lowrank_es`)."""
    from gfo.run.config import load_config
    from gfo.run.train import train

    s = shape(toy)
    dtype = dtype or ("float32" if toy else "bfloat16")
    population = population or (4 if toy else 30)
    new_tokens = new_tokens or (16 if toy else 1024)
    overrides = [f"runs_dir={work}", f"steps={steps}", f"eval_every={steps}", "log_every=1",
                 f"checkpoint_every={steps}", "name=es_countdown_first_steps", "model.path=null", "model.family=qwen2",
                 f"model.dtype={dtype}", "model.tokenizer=byte", f"model.overrides={json.dumps(s)}",
                 f"optimizer.population={population}", f"optimizer.eval_chunk={population}",
                 f"task.batch_size={batch}", f"task.eval_size={batch}", "task.options.data_path=null",
                 "task.options.train_size=null", f"task.options.max_new_tokens={new_tokens}",
                 "task.options.n_numbers=[3,4]", "task.options.max_number=99", *extra]
    path = config if os.path.isabs(config) else os.path.join(ROOT, config)
    cfg = load_config(path, overrides)
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    train_rows = [r for r in result["records"] if r.get("split") == "train"]
    times = [r["time_s"] for r in train_rows]
    step_s = [b - a for a, b in zip(times, times[1:])]  # step 1 reports at time 0: steps 2.. are timed
    per = float(np.median(step_s)) if step_s else float("nan")
    rollouts_per_step = population * batch
    return {"config": os.path.relpath(path, ROOT), "overrides": overrides, "extra": list(extra), "steps": steps,
            "population": population, "questions_per_step": batch, "max_new_tokens": new_tokens, "dtype": dtype,
            "step_s": per, "rollouts_per_s_per_device": rollouts_per_step / per / jax.device_count(),
            "generated_tokens_per_s_upper": rollouts_per_step * new_tokens / per, "wall_s": wall,
            "losses": [r.get("loss") for r in train_rows]}


# ----------------------------------------------------------------------------- report
PARTS = ("parity", "rollouts", "throughput", "es_countdown")


def run(args, save=lambda payload: None) -> dict:
    """The parts of `args.only` (all by default), `save(payload)` after each one (a run cut short by a time
    limit keeps the parts it finished)."""
    payload = {"machine": machine(), "toy": args.toy, "shape": shape(args.toy), "failed": {}}
    work = args.work or tempfile.mkdtemp(prefix="gfo-gpu-")
    only = args.only.split(",") if args.only else PARTS
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        raise SystemExit(f"--only {','.join(unknown)}: expected a subset of {','.join(PARTS)}")
    calls = {"parity": lambda: parity(args.toy),
             "rollouts": lambda: rollout_part(args.toy, args.repeats, args.rollout_grid),
             "throughput": lambda: throughput_part(args.toy, args.repeats),
             "es_countdown": lambda: countdown_part(args.toy, args.countdown_steps, args.countdown_batch, work,
                                                    config=args.countdown_config, population=args.countdown_population,
                                                    new_tokens=args.countdown_new_tokens, dtype=args.countdown_dtype,
                                                    extra=tuple(args.countdown_set))}
    for part in only:
        started = time.perf_counter()
        try:
            payload[part] = calls[part]()
        except Exception as e:  # noqa: BLE001 — one part's failure is recorded; the others still run
            payload["failed"][part] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        payload.setdefault("part_s", {})[part] = time.perf_counter() - started
        save(payload)
        jax.clear_caches()
    return payload


def markdown(p: dict) -> str:
    f = lambda v, fmt="{:.0f}": "—" if v is None else fmt.format(v)  # noqa: E731
    s = p["shape"]
    lines = [f"# gfo on an accelerator: parity, rollouts, throughput and ES at scale's first steps"
             f"{' (toy shapes)' if p['toy'] else ''}", "", describe(p["machine"]), "",
             f"Model: Qwen2 family, d {s['d_model']}, {s['n_layers']} layers, {s['n_heads']}/{s['n_kv_heads']} heads, "
             f"d_ff {s['d_ff']}, vocabulary {s['vocab_size']:,}" + (" (toy)" if p["toy"] else
                                                                 " (Qwen2.5-0.5B-Instruct's shape), random weights") + ".", ""]
    if "parity" in p:
        q = p["parity"]
        lines += ["## 1. Parity against transformers (float32, CPU)", "",
                  f"{q['rows']} rows × {q['prompt_tokens']} prompt tokens (odd rows left-padded), {q['new_tokens']} "
                  "greedy tokens.", "",
                  "| mode | max \\|Δlogit\\| / max \\|logit\\| | bound | argmax agreement | greedy rows = transformers "
                  "| greedy tokens = transformers | cache = no cache |", "|---|---|---|---|---|---|---|"]
        for mode, m in q["modes"].items():
            lines.append(f"| {mode} | {m['rel_logit_error']:.2e} | {m['bound']:.0e} "
                         f"({'within' if m['within_bound'] else '**beyond**'}) | {m['argmax_agreement']:.3f} | "
                         f"{m['greedy_rows_equal_transformers']:.2f} | {m['greedy_tokens_equal_transformers']:.2f} | "
                         f"{'yes' if m['cache_equals_no_cache'] else '**no**'} |")
        lines.append("")
    if "rollouts" in p:
        r = p["rollouts"]
        c = r["ceiling_inputs"]
        lines += ["## 2. Rollouts", "", f"Measured here: read bandwidth {c['read_bytes_per_s'] / 1e9:.0f} GB/s, "
                  f"float32 matmul {c['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s (`--repeats` best). Ceiling per decode "
                  "step: max(one read of the weights in their dtype, 2·params·rows FLOPs at the float32 rate).", "",
                  "| dtype | rows | new | decoding | tok/s | ceiling (bound) | / ceiling |", "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['dtype']} | {row['rows']} | {row['new_tokens']} | {row['decoding']} | "
                         f"{f(row['gfo_tok_s'])} | {f(row['ceiling_tok_s'])} ({row['bound']}) | {row['gfo_vs_ceiling']:.2f} |")
        lines += ["", "KV cache in one compiled generation (≈ 1: held once, updated in place): " + ", ".join(
            f"{c['dtype']} {c['rows']} rows × {c['new_tokens']} new: temporaries {c['temp_x_cache']:.2f} × the cache's "
            f"{c['cache_bytes'] / 2**20:.1f} MiB" for c in r.get("cache_memory", [])) + "."]
        lines += ["", "Low-rank ES generation step (rank 1, EGGROLL's noise map, perturbations in the forward, "
                  "sampled) against plain generation of as many rows; EGGROLL: 0.69.", "",
                  "| dtype | members × prompts | new | ES tok/s | inference tok/s | fraction | vmap alone | low-rank on top |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in r["es"]:
            lines.append(f"| {e['dtype']} | {e['members']} × {e['prompts']} | {e['new_tokens']} | {f(e['es_tok_s'])} | "
                         f"{f(e['inference_tok_s'])} | {e['fraction']:.2f} | {e['vmap_shared_fraction']:.2f} | "
                         f"{e['lowrank_fraction']:.2f} |")
        lines.append("")
    if "throughput" in p:
        t = p["throughput"]
        row = t["row"]
        lines += ["## 3. Throughput of a step (float32)", "",
                  f"Batch {t['batch']} × {t['seq']} tokens per member, members in chunks of {t['chunk']}; forward "
                  f"pass {row['forward_s'] * 1e3:.1f} ms; {row['params']:,} parameters.", "",
                  "| method | N | compile s | step s | × ceiling | forward passes | peak × params |", "|---|---|---|---|---|---|---|"]
        for m, entries in row["methods"].items():
            for e in entries:
                g = lambda k, fmt="{:.2f}": fmt.format(e[k]) if k in e else ""  # noqa: E731
                lines.append(f"| {m} | {e['population']} | {e['compile_s']:.1f} | {g('step_s', '{:.3f}')} | "
                             f"{g('ratio_to_ceiling')} | {g('forward_passes')} | {e['peak_x_params']:.2f} |")
        lines.append("")
    if "es_countdown" in p:
        e = p["es_countdown"]
        lines += ["## 4. ES at scale's countdown config, first steps", "",
                  f"`{e['config']}`{' with `' + ' '.join(e['extra']) + '`' if e.get('extra') else ''}, N {e['population']}, {e['questions_per_step']} generated questions per step "
                  f"(the paper: 1,000), up to {e['max_new_tokens']} new tokens, {e['dtype']}; {e['steps']} steps "
                  "(the first one compiles; the median of the others).", "",
                  "| s / step | rollouts/s per device | generated tokens/s (upper bound) | wall s |", "|---|---|---|---|",
                  f"| {e['step_s']:.2f} | {e['rollouts_per_s_per_device']:.1f} | {e['generated_tokens_per_s_upper']:,.0f} "
                  f"| {e['wall_s']:.0f} |", "",
                  "EGGROLL's Countdown run works out to ≈ 22 rollouts/s per H200 (derived from its paper).", ""]
    if p["failed"]:
        lines += ["## Failed parts", ""] + [f"- {k}: `{v}`" for k, v in p["failed"].items()] + [""]
    lines.append("Part wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in p.get("part_s", {}).items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true", help="tiny shapes (any backend, seconds)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rollout-grid", default="full", choices=("full", "small"),
                    help="full: rows 1/8/32/128 x 64/256/1024; small: rows 8/32/128 x 256 (a 10-minute slot)")
    ap.add_argument("--countdown-steps", type=int, default=3)
    ap.add_argument("--countdown-batch", type=int, default=None, help="questions per step (default 2 toy, 32)")
    ap.add_argument("--countdown-config", default="paper_configs/es_countdown.yaml")
    ap.add_argument("--countdown-population", type=int, help="default 4 toy, 30 (the paper's N)")
    ap.add_argument("--countdown-new-tokens", type=int, help="default 16 toy, 1024 (the paper's)")
    ap.add_argument("--countdown-dtype", help="default float32 toy, bfloat16")
    ap.add_argument("--countdown-set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides of the countdown run, e.g. optimizer.method=lowrank_es")
    ap.add_argument("--name", help="the results file's name (default gpu_<platform>_<device>, gpu_toy)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--work", help="the countdown run's directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.countdown_batch is None:
        args.countdown_batch = 2 if args.toy else 32
    if args.toy:
        args.repeats = min(args.repeats, 1)
    m = machine()
    device = m["device"].replace(" ", "_").replace("/", "_")
    name = args.name or ("gpu_toy" if args.toy else f"gpu_{m['platform']}_{device}")
    payload = run(args, save=lambda p: write(args.out, name, p, markdown(p)))
    print(*write(args.out, name, payload, markdown(payload)))
    if payload["failed"]:
        print("failed parts:", json.dumps(payload["failed"], indent=1))
    return payload


if __name__ == "__main__":
    main()
