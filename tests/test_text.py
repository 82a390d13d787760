"""Checkpoint tokenizers, chat templates and stop strings against `transformers` and brute force."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.chat_template import ChatTemplateError, render_chat
from models.generate import stop_string_table
from models.tokenizer import TokenizerError, check_fits

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A template in the Llama style: BOS variable, raise_exception, whitespace control, loop.last.
LLAMA_LIKE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', "
              "'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}\n"
              "  {%- if message['role'] == 'system' %}[SYS]{{ message['content'] | trim }}[/SYS]\n"
              "  {%- elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
              "{% else %} {{ message['content'] }}{% if not loop.last %}{{ eos_token }}{% endif %}{% endif %}\n"
              "{% endfor %}{% if add_generation_prompt %}{{ ' ' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("tok")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Using the numbers [44 19 35], create an equation that equals 98.", "<answer> (1 + 2) / 3 </answer>",
              "the cat sat on the mat", "héllo wörld ☃"] * 30
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                                                              tok.token_to_id("<|endoftext|>")]}))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


TEXTS = ["the cat sat on the mat", "Using the numbers [44 19 35]", "héllo wörld ☃ <|im_end|> x", " (1 + 2) / 3 "]


def test_checkpoint_tokenizer_matches_transformers(tokenizer_dir, hf_tokenizer):
    tok = models.load_tokenizer(str(tokenizer_dir))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id,
                                                     hf_tokenizer.pad_token_id)
    assert tok.eos_ids == (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)  # generation_config lists both
    assert tok.vocab_size == len(hf_tokenizer)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == hf_tokenizer(text)["input_ids"]
        assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        # Token bytes concatenate to the text (special tokens stand for no text).
        assert b"".join(tok.token_bytes()[i] for i in ids) == text.replace("<|im_end|>", "").encode()


@pytest.mark.parametrize("template", [CHATML, LLAMA_LIKE])
def test_chat_template_renders_as_transformers(hf_tokenizer, template):
    convs = [[{"role": "user", "content": "Hi there"}],
             [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "2+2?"}],
             [{"role": "user", "content": "Solve"}, {"role": "assistant", "content": "Let me think.\n<think>"}]]
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    for messages in convs:
        for gen in (True, False):
            ours = render_chat(template, messages, add_generation_prompt=gen, special_tokens=special)
            ref = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                   add_generation_prompt=gen)
            assert ours == ref
        if messages[-1]["role"] == "assistant":
            ours = render_chat(template, messages, add_generation_prompt=False, continue_final_message=True,
                               special_tokens=special)
            ref = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                   continue_final_message=True)
            assert ours == ref and ours.endswith("<think>")


def test_chat_template_errors_name_the_problem():
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        render_chat(LLAMA_LIKE, [{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="expected a dict"):
        render_chat(CHATML, [{"role": "user"}])


def test_tokenizer_errors(tmp_path, tokenizer_dir):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        models.load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        models.load_tokenizer(str(tmp_path))
    tok = models.load_tokenizer(str(tokenizer_dir))
    with pytest.raises(TokenizerError, match=f"has {tok.vocab_size} ids but the model's vocabulary has 259 rows"):
        check_fits(tok, 259, "model.tokenizer")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    (bad / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(TokenizerError, match="eos_token='</s>' is not a token"):
        models.load_tokenizer(str(bad))


def test_stop_string_automaton_finds_strings_split_across_tokens(tokenizer_dir):
    tok = models.load_tokenizer(str(tokenizer_dir))
    table = stop_string_table(tok.token_bytes(), ["</answer>", "98."])
    rng = np.random.default_rng(0)
    for _ in range(50):  # random token streams: the automaton agrees with searching the decoded bytes
        ids = rng.integers(0, tok.vocab_size, size=30)
        state = np.zeros(2, np.int64)
        text = b""
        for t in ids:
            state = np.asarray(table.table)[np.arange(2), state, t]
            text += tok.token_bytes()[t]
            for s, pattern in enumerate([b"</answer>", b"98."]):
                assert (state[s] == table.accept[s]) == (pattern in text)
    ids = tok.encode("x <answer> (1 + 2) / 3 </answer> tail")
    text = b""
    for n, t in enumerate(ids):
        text += tok.token_bytes()[t]
        if b"</answer>" in text:
            break
    assert n < len(ids) - 1  # found before the end


def test_generation_stops_right_after_a_stop_string(tiny_model):
    model, params = tiny_model
    tok = models.ByteTokenizer()
    ids, mask = tok.batch_encode(["The quick brown fox", "Hi", "jumps over the"])
    free = models.generate(model, params, ids, mask, jax.random.key(0), 24)
    rows = np.asarray(free.tokens)
    first = bytes(int(t) for t in rows[0] if t < 256)
    at = next(i for i in range(len(first) - 1) if first[i:i + 2].isascii())  # a pair row 0 generates
    stop = first[at:at + 2].decode()
    out = models.generate(model, params, ids, mask, jax.random.key(0), 24,
                          stop_strings=stop_string_table(tok.token_bytes(), [stop]))
    for row in range(rows.shape[0]):
        text, expected = b"", 24
        for n, t in enumerate(rows[row]):  # brute force: the first token after which the text holds it
            text += tok.token_bytes()[t]
            if stop.encode() in text:
                expected = n + 1
                break
        assert int(out.lengths[row]) == expected
        np.testing.assert_array_equal(out.tokens[row, :expected], rows[row, :expected])
        assert np.all(np.asarray(out.tokens[row, expected:]) == model.config.pad_token_id)
    assert int(out.lengths[0]) < 24


def _dot_operand_shapes(jaxpr) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Operand shapes of every dot_general in `jaxpr` and the jaxprs nested in it (loops, jits)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _dot_operand_shapes(inner)
    return out


@pytest.mark.slow
def test_population_generation_runs_one_shared_matmul_per_kernel(tiny_model):
    """Members × prompts are generated together: under `vmap` over members whose kernels are low-rank
    perturbations `W + s·A_i B_iᵀ`, the base `W` enters every matmul unbatched (one big matmul)."""
    model, params = tiny_model
    path = (models.LAYERS, "mlp", "up" if "up" in params[models.LAYERS]["mlp"] else "fc", "kernel")
    W = params[path[0]][path[1]][path[2]][path[3]]  # stacked [L, d_in, d_out]; the scan slices one layer
    L, members, rank = W.shape[0], 3, 1
    A = jax.random.normal(jax.random.key(1), (members, L, W.shape[1], rank))
    B = jax.random.normal(jax.random.key(2), (members, L, W.shape[2], rank))
    tok = models.ByteTokenizer()
    ids, mask = tok.batch_encode(["abc", "de"])

    def member(a, b):
        p = jax.tree.map(lambda x: x, params)
        p[path[0]][path[1]][path[2]][path[3]] = models.LowRankKernel(W, a, b, jnp.full((L,), 0.01))
        return models.generate(model, p, ids, mask, jax.random.key(0), 4).tokens

    jaxpr = jax.make_jaxpr(jax.vmap(member))(A, B).jaxpr
    shapes = [s for pair in _dot_operand_shapes(jaxpr) for s in pair]
    assert W.shape[1:] in shapes  # one layer's base kernel, shared by all members
    assert (members,) + W.shape[1:] not in shapes and (members,) + W.shape not in shapes  # never per member
    tokens = jax.vmap(member)(A, B)
    for i in range(members):  # and each member generates exactly what it would alone
        np.testing.assert_array_equal(tokens[i], member(A[i], B[i]))
