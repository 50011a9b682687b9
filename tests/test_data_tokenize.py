"""Tokenizers and the accounting engine: tokenizing segment by segment equals tokenizing the whole rendered
string (property-tested on every template and four tokenizers trained at test time), counts equal the
tokenizer library's own, the C++ sentencepiece path equals the sentencepiece package, labels follow the
segments, and a tokenizer lacking a template's special token is named in the error."""

import numpy as np
import pytest

import kindred
from kindred import KindredFormatError, KindredValueError, _core
from kindred.data import TEMPLATES, get_template, load_tokenizer, tokenize
from kindred.data.samples import corpus_lines, load_calibration


def library_encode(path, rendered: str) -> list[int]:
    """The tokenizer library's own encoding of a whole string (not kindred's wrapper)."""
    if str(path).endswith(".json"):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).encode(rendered, add_special_tokens=False).ids
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).encode(rendered)


@pytest.mark.parametrize("name", TEMPLATES)
def test_counts_equal_the_library_on_the_calibration_set(name, any_tokenizer_path):
    convs = load_calibration()
    tpl = get_template(name)
    data = tokenize(convs, load_tokenizer(any_tokenizer_path), tpl)
    for i, conv in enumerate(convs):
        expected = library_encode(any_tokenizer_path, tpl.render_text(conv))
        assert data.tokens[i] == len(expected)
        assert list(data.example(i)[0]) == expected
    assert (data.trainable > 0).all() and (data.trainable < data.tokens).all()
    assert data.tokens.sum() == data.turn_tokens.sum() + _template_only(data)
    assert (
        data.tokens == data.fixed + np.add.reduceat(data.exchange_tokens, data.exchange_offsets[:-1])
    ).all()


def _template_only(data) -> int:
    lengths = np.diff(data.seg_offsets)
    return int(lengths[data.seg_turn < 0].sum())


def test_trained_tokens_decode_to_assistant_content(hf_tokenizer_path):
    tok = load_tokenizer(hf_tokenizer_path)
    convs = load_calibration()[:10]
    for name in TEMPLATES:
        tpl = get_template(name)
        data = tokenize(convs, tok, tpl)
        for i, conv in enumerate(convs):
            trained = [seg for seg in tpl.render(conv) if seg.trainable]
            got = [tok.decode(ids) for _, tr, ids in data.segments(i) if tr]
            assert got == [s.text for s in trained], name


def test_per_turn_and_exchange_counts(hf_tokenizer_path):
    tok = load_tokenizer(hf_tokenizer_path)
    conv = load_calibration()[0]
    tpl = get_template("chatml")
    data = tokenize([conv], tok, tpl)
    # ChatML: each message is its own turn, rendered separately and tokenized independently (specials split).
    for k, m in enumerate(conv):
        piece = (
            tpl.render_text([m])
            if m["role"] != "assistant"
            else f"<|im_start|>assistant\n{m['content']}<|im_end|>\n"
        )
        assert data.turn_tokens[k] == len(tok.encode(piece))
    assert list(data.turn_role) == [1] + [2, 3] * ((len(conv) - 1) // 2)
    assert len(data.exchanges(0)) == (len(conv) - 1) // 2
    assert data.fixed[0] == data.turn_tokens[0]  # ChatML: the system turn is the only fixed part


@pytest.mark.skipif(not _core.sentencepiece_compiled(), reason="built without the sentencepiece C++ library")
def test_core_sentencepiece_equals_the_python_package(sp_tokenizer_path, sp_bpe_tokenizer_path):
    import sentencepiece as spm

    lines = [*corpus_lines()[:500], "", " ", "\n\n", "中文 😀 ß", "<|im_start|>user\nhi<|im_end|>"]
    for path in (sp_tokenizer_path, sp_bpe_tokenizer_path):
        ref = spm.SentencePieceProcessor(model_file=str(path))
        core = load_tokenizer(path)
        assert core.backend.startswith("kindred core")
        ids, off = core.encode_batch(lines)
        assert [list(ids[off[i] : off[i + 1]]) for i in range(len(lines))] == ref.encode(lines)
        assert core.vocab_size == ref.vocab_size()
        assert core.decode(ref.encode("Be honest.")) == "Be honest."
        assert core.lookup("<|im_end|>") == ref.piece_to_id("<|im_end|>")
        assert core.lookup("<definitely-not-a-piece>") is None


def test_python_sentencepiece_fallback_says_so(sp_tokenizer_path):
    from kindred.data import SentencePieceTokenizer

    py = SentencePieceTokenizer(sp_tokenizer_path, backend="python")
    assert "Python package" in py.backend
    auto = load_tokenizer(sp_tokenizer_path)
    lines = corpus_lines()[:50]
    a, ao = py.encode_batch(lines)
    b, bo = auto.encode_batch(lines)
    assert np.array_equal(a, b) and np.array_equal(ao, bo)
    if not _core.sentencepiece_compiled():
        assert "built without the sentencepiece C++ library" in auto.backend
    assert kindred.data.sentencepiece_backend()


def test_special_tokens_are_resolved_by_name(hf_tokenizer_path, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = load_tokenizer(hf_tokenizer_path)
    assert tok.token_id("<|im_end|>") == tok.lookup("<|im_end|>")
    # a tokenizer without Gemma's tokens: the error names the tokenizer, the token and the template
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    path = tmp_path / "bare.json"
    bare.save(str(path))
    with pytest.raises(
        KindredValueError,
        match=r"bare.json: the tokenizer has no token '<bos>' \(needed by chat template 'gemma3'\)",
    ):
        tokenize(load_calibration()[:1], path, "gemma3")


def test_tokenizer_files_missing_or_corrupt(tmp_path, sp_tokenizer_path):
    with pytest.raises(KindredFormatError, match=r"nope.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": 3')
    with pytest.raises(KindredFormatError, match=r"tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(bad)
    corrupt = tmp_path / "broken.model"
    corrupt.write_bytes(sp_tokenizer_path.read_bytes()[:100])
    with pytest.raises(KindredFormatError, match=r"broken.model: not a valid sentencepiece model"):
        load_tokenizer(corrupt)
    from kindred.data import SentencePieceTokenizer

    with pytest.raises(KindredFormatError, match=r"broken.model: not a valid sentencepiece model"):
        SentencePieceTokenizer(corrupt, backend="python")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(KindredFormatError, match=r"no tokenizer.json or tokenizer.model"):
        load_tokenizer(empty)


def test_take_and_concat_keep_examples_intact(hf_tokenizer_path):
    data = tokenize(load_calibration()[:6], hf_tokenizer_path, "qwen3")
    sub = data.take([4, 1])
    for k, i in enumerate([4, 1]):
        assert np.array_equal(sub.example(k)[0], data.example(i)[0])
        assert np.array_equal(sub.example(k)[1], data.example(i)[1])
        assert np.array_equal(sub.exchanges(k), data.exchanges(i))
        assert [s[2].tolist() for s in sub.segments(k)] == [s[2].tolist() for s in data.segments(i)]
    both = type(data).concat([sub, data])
    assert len(both) == 8 and np.array_equal(both.example(3)[0], data.example(1)[0])
    empty = tokenize([], hf_tokenizer_path, "qwen3")
    assert len(empty) == 0 and empty.total_tokens == 0
