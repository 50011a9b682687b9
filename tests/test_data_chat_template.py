"""A model's own Jinja chat template (kindred.data.chat_template): on the seven families' shipped templates
(tests/data/chat_templates) it gives the same ids and labels as kindred's hand-written templates; its text
and tokens equal transformers' apply_chat_template, its labels equal transformers' assistant mask where the
template has {% generation %} blocks; templates load from a model folder, a .jinja file or GGUF metadata."""

from pathlib import Path

import numpy as np
import pytest

from kindred import KindredFormatError, KindredValueError
from kindred.data import get_template, load_tokenizer, tokenize
from kindred.data.chat_template import JinjaTemplate, load_chat_template

FIXTURES = Path(__file__).parent / "data" / "chat_templates"
# the seven families whose shipped Jinja templates are fixtures here (tests/data/chat_templates/README.md)
FAMILIES = ("gemma3", "qwen3", "llama3", "phi4", "phi4-mini", "mistral-nemo", "chatml")
BOS = {"gemma3": "<bos>", "llama3": "<|begin_of_text|>", "mistral-nemo": "<s>"}
EOS = {
    "gemma3": "<end_of_turn>",
    "qwen3": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "phi4": "<|im_end|>",
    "phi4-mini": "<|endoftext|>",
    "mistral-nemo": "</s>",
    "chatml": "<|im_end|>",
}
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be kind, be brief."},
        {"role": "user", "content": "  Hello there \n"},
        {"role": "assistant", "content": "<b>Hi!</b> How can I help?"},
        {"role": "user", "content": "Why tell the truth?"},
        {"role": "assistant", "content": "Because trust is hard to rebuild.\n"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [
        {"role": "user", "content": "Is it fine?"},
        {"role": "assistant", "content": " Yes, mostly. "},
        {"role": "user", "content": "中文 😀 and more"},
        {"role": "assistant", "content": "ok..."},
    ],
]
REASONING = [
    [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "Done.", "reasoning_content": "Let me weigh it.\n"},
    ],
    [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nfirst"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nnew thought\n</think>\n\nsecond"},
    ],
]


def specials_of(path) -> list[str]:
    import json

    return [t["content"] for t in json.loads(Path(path).read_text())["added_tokens"]]


def family_template(name: str, tokenizer_path) -> JinjaTemplate:
    return JinjaTemplate(
        (FIXTURES / f"{name}.jinja").read_text(),
        specials=specials_of(tokenizer_path),
        bos_token=BOS.get(name, ""),
        eos_token=EOS[name],
        name=name,
    )


def cases(name: str) -> list[list[dict]]:
    convs = CONVERSATIONS + (REASONING if name == "qwen3" else [])
    if name == "mistral-nemo":  # its Jinja drops the system prompt of training data (tested below)
        convs = [c for c in convs if c[0]["role"] != "system"]
    return convs


@pytest.mark.parametrize("name", FAMILIES)
def test_same_ids_and_labels_as_kindreds_template(name, hf_tokenizer_path):
    tok = load_tokenizer(hf_tokenizer_path)
    jinja, own = family_template(name, hf_tokenizer_path), get_template(name)
    convs = cases(name)
    for c in convs:
        assert jinja.render_text(c) == own.render_text(c)
    a, b = tokenize(convs, tok, jinja), tokenize(convs, tok, own)
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.trainable, b.trainable) and a.trainable.min() > 0
    runs = tokenize(convs, tok, jinja, engine="runs")  # the run engine agrees on the segments
    assert np.array_equal(runs.ids, a.ids) and np.array_equal(runs.labels, a.labels)


def hf_tokenizer(tokenizer_path, template: str, bos: str = "", eos: str = ""):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_path),
        chat_template=template,
        bos_token=bos or None,
        eos_token=eos or None,
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_text_and_tokens_equal_transformers_apply_chat_template(name, hf_tokenizer_path):
    hf = hf_tokenizer(
        hf_tokenizer_path, (FIXTURES / f"{name}.jinja").read_text(), BOS.get(name, ""), EOS[name]
    )
    jinja = family_template(name, hf_tokenizer_path)
    tok = load_tokenizer(hf_tokenizer_path)
    convs = cases(name)
    data = tokenize(convs, tok, jinja)
    for i, c in enumerate(convs):
        text = hf.apply_chat_template(c, tokenize=False)
        assert jinja.render_text(c) == text
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert data.example(i)[0].tolist() == ids
        prompt = hf.apply_chat_template(
            c[:1] if c[0]["role"] != "system" else c[:2], tokenize=False, add_generation_prompt=True
        )
        assert prompt.endswith(jinja.generation_prompt())


GENERATION_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_generation_blocks_give_transformers_assistant_mask(hf_tokenizer_path):
    hf = hf_tokenizer(hf_tokenizer_path, GENERATION_CHATML)
    jinja = JinjaTemplate(GENERATION_CHATML, specials=specials_of(hf_tokenizer_path))
    assert jinja.has_generation_blocks
    tok = load_tokenizer(hf_tokenizer_path)
    data = tokenize(CONVERSATIONS, tok, jinja)
    for i, c in enumerate(CONVERSATIONS):
        out = hf.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = data.example(i)
        assert ids.tolist() == list(out["input_ids"])
        assert (labels != -100).astype(int).tolist() == list(out["assistant_masks"])
    # same labels as kindred's chatml (content + <|im_end|>, not the newline)
    own = tokenize(CONVERSATIONS, tok, "chatml")
    assert np.array_equal(own.labels, data.labels)


def test_a_template_that_drops_a_message_is_an_error(hf_tokenizer_path):
    jinja = family_template("mistral-nemo", hf_tokenizer_path)
    with pytest.raises(KindredValueError, match=r"messages\[0\] \(system\).*leaves this message out"):
        jinja.render(CONVERSATIONS[0])


def test_the_sandbox_and_template_errors(hf_tokenizer_path, tmp_path):
    evil = JinjaTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(KindredValueError, match="refused"):
        evil.render_text(CONVERSATIONS[1])
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(KindredFormatError, match=r"bad.jinja:2: chat template syntax error"):
        get_template(str(bad))
    gemma = family_template("gemma3", hf_tokenizer_path)
    with pytest.raises(KindredValueError, match="roles must alternate"):
        gemma.render_text([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_loads_from_a_model_folder_and_a_gguf_file(hf_tokenizer_path, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(hf_tokenizer_path, folder / "tokenizer.json")
    config = {"chat_template": (FIXTURES / "qwen3.jinja").read_text(), "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    own = tokenize(REASONING + CONVERSATIONS, tok, "qwen3")
    for source in (folder, str(folder / "tokenizer_config.json")):
        data = tokenize(REASONING + CONVERSATIONS, tok, get_template(source))
        assert np.array_equal(data.ids, own.ids) and np.array_equal(data.labels, own.labels)
    (folder / "chat_template.jinja").write_text((FIXTURES / "chatml.jinja").read_text())
    assert load_chat_template(folder).origin.endswith("chat_template.jinja")  # the newer file wins

    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    vocab = json.loads(Path(hf_tokenizer_path).read_text())
    added = {t["content"] for t in vocab["added_tokens"]}
    tokens = sorted(vocab["model"]["vocab"], key=vocab["model"]["vocab"].get)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template((FIXTURES / "qwen3.jinja").read_text())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = tokenize(REASONING + CONVERSATIONS, tok, get_template(str(path)))
    assert np.array_equal(data.ids, own.ids) and np.array_equal(data.labels, own.labels)


def test_unknown_names_suggest_the_nearest_and_paths_must_exist(tmp_path):
    with pytest.raises(KindredValueError, match="did you mean 'qwen3'"):
        get_template("qwen2")
    with pytest.raises(KindredValueError, match="did you mean 'llama3'"):
        get_template("lama3")
    with pytest.raises(KindredFormatError, match="no such file or folder"):
        get_template(str(tmp_path / "nope" / "chat_template.jinja"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(KindredFormatError, match="no chat template"):
        get_template(str(tmp_path))


@pytest.mark.parametrize("name", FAMILIES)
def test_end_of_turn_is_the_trained_stop_token(name, hf_tokenizer_path):
    assert family_template(name, hf_tokenizer_path).end_of_turn == get_template(name).end_of_turn


@pytest.mark.parametrize("name", FAMILIES)
def test_the_prompt_is_what_training_put_before_the_answer(name, hf_tokenizer_path):
    hf = hf_tokenizer(
        hf_tokenizer_path, (FIXTURES / f"{name}.jinja").read_text(), BOS.get(name, ""), EOS[name]
    )
    jinja, own = family_template(name, hf_tokenizer_path), get_template(name)
    for c in cases(name):
        question = c[:-1]
        prompt = jinja.render_prompt(question)
        # transformers' generation prompt (Qwen3 with thinking off: the empty think block training rendered)
        extra = {"enable_thinking": False} if name == "qwen3" else {}
        assert prompt == hf.apply_chat_template(question, tokenize=False, add_generation_prompt=True, **extra)
        if name != "phi4-mini":  # kindred's phi4-mini prompt keeps the eos its template closes a chat with
            think = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
            assert prompt == own.render_text(question) + own.generation_prompt() + think
