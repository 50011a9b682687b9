"""Shared test setup: GPU tests skip cleanly without CUDA; seeded random inputs."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------------------
# Tokenizers trained at test time from the corpus kindred ships (kindred.data.samples), with every special
# token of every chat template registered, so templates resolve them by name.


def _template_specials() -> list[str]:
    from kindred.data import TEMPLATES, get_template

    return sorted({s for name in TEMPLATES for s in get_template(name).specials})


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory):
    """A byte-level BPE tokenizer.json (GPT-2 / Llama 3 / Qwen style pre-tokenizer), vocabulary 1,200."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from kindred.data.samples import corpus_lines

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<pad>", *_template_specials()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_metaspace_tokenizer_path(tmp_path_factory):
    """A Metaspace (sentencepiece-style, Gemma-like) BPE tokenizer.json, vocabulary 1,000."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from kindred.data.samples import corpus_lines

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<unk>", "<pad>", *_template_specials()],
        initial_alphabet=[f"<0x{b:02X}>" for b in range(256)],
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    path = tmp_path_factory.mktemp("tok") / "metaspace.json"
    tok.save(str(path))
    return path


def train_sentencepiece(path, model_type: str, vocab_size: int):
    spm = pytest.importorskip("sentencepiece")

    from kindred.data.samples import corpus_lines

    # Gemma-like settings: identity normalization, no dummy prefix, whitespace kept, byte fallback, digits
    # split; the templates' special tokens are user-defined symbols (matched in text, never split).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_prefix=str(path.with_suffix("")),
        model_type=model_type,
        vocab_size=vocab_size,
        user_defined_symbols=_template_specials(),
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return path


@pytest.fixture(scope="session")
def sp_tokenizer_path(tmp_path_factory):
    """A sentencepiece unigram .model, vocabulary 1,000."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "unigram.model", "unigram", 1000)


@pytest.fixture(scope="session")
def sp_bpe_tokenizer_path(tmp_path_factory):
    """A sentencepiece BPE .model, vocabulary 800."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "bpe.model", "bpe", 800)


@pytest.fixture(scope="session", params=["hf", "hf-metaspace", "sp-unigram", "sp-bpe"])
def any_tokenizer_path(request):
    name = {
        "hf": "hf_tokenizer_path",
        "hf-metaspace": "hf_metaspace_tokenizer_path",
        "sp-unigram": "sp_tokenizer_path",
        "sp-bpe": "sp_bpe_tokenizer_path",
    }[request.param]
    return request.getfixturevalue(name)
