"""Tokenizers and the accounting engine: tokenizing segment by segment equals tokenizing the whole rendered
string (property-tested on every template and four tokenizers trained at test time), counts equal the
tokenizer library's own, the C++ sentencepiece path equals the sentencepiece package, labels follow the
segments, and a tokenizer lacking a template's special token is named in the error."""

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kindred
from kindred import KindredFormatError, KindredValueError, _core
from kindred.data import TEMPLATES, get_template, load_tokenizer, tokenize
from kindred.data.samples import corpus_lines, load_calibration

PIECES = [
    "a",
    "b",
    "Z",
    "x",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    ".",
    ",",
    "!",
    "?",
    "'",
    "-",
    "0",
    "42",
    "é",
    "ß",
    "中文",
    "😀",
    " the",
    " honest",
    " friend",
    "truth",
    "Hello",
    " - ",
    "\n ",
    " \n",
    "<think>",
    "</think>",
]
text = st.lists(st.sampled_from(PIECES), min_size=0, max_size=12).map("".join)
answer = st.tuples(text, st.sampled_from(["ok", "Yes.", "Sure", "中", "fine!"]), text).map("".join)


@st.composite
def conversations(draw):
    msgs = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(text)})
        msgs.append({"role": "assistant", "content": draw(answer)})
    return msgs


def library_encode(path, rendered: str) -> list[int]:
    """The tokenizer library's own encoding of a whole string (not kindred's wrapper)."""
    if str(path).endswith(".json"):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).encode(rendered, add_special_tokens=False).ids
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).encode(rendered)


def assert_same_ids_or_tied(data, runs, tok, path, ties_possible: bool) -> None:
    """The fast engine's ids and labels equal the run engine's, except where a sentencepiece unigram model
    scores two segmentations of a run the same ('ok...' as '.' + '..' or '..' + '.'): Viterbi breaks such a
    tie by float rounding, which depends on the score of the text before the run, so a run encoded alone (the
    run engine) may come out as the other one. A difference must then stay inside one segment (the callers
    check that the segment lengths are equal), spell the same text, and score the same: both optimal."""
    if np.array_equal(data.ids, runs.ids):
        assert np.array_equal(data.labels, runs.labels)
        return
    assert ties_possible, "the engines' ids differ"
    import sentencepiece as spm

    score = np.vectorize(spm.SentencePieceProcessor(model_file=str(path)).GetScore, otypes=[np.float64])
    for g in range(len(data.seg_offsets) - 1):
        a, b = data.seg_offsets[g], data.seg_offsets[g + 1]
        mine, theirs = data.ids[a:b], runs.ids[a:b]
        if not np.array_equal(mine, theirs):
            assert tok.decode(mine) == tok.decode(theirs), g
            assert score(mine).sum() == pytest.approx(score(theirs).sum(), abs=1e-4), g
    trained = data.labels != -100
    assert np.array_equal(runs.labels != -100, trained)
    assert np.array_equal(runs.labels[trained], runs.ids[trained])


# Runs that tie for the unigram model trained here (see assert_same_ids_or_tied): always tried.
TIES = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok..."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes..."}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "fine!..."},
    ],
]


@pytest.mark.parametrize("name", TEMPLATES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convs=st.lists(conversations(), min_size=1, max_size=4))
@example(convs=TIES)
def test_segments_concatenate_to_the_whole_string_tokenization(name, any_tokenizer_path, convs, request):
    tok = load_tokenizer(any_tokenizer_path)
    tpl = get_template(name)
    data = tokenize(convs, tok, tpl)
    runs = tokenize(convs, tok, tpl, engine="runs")  # the reference engine: text runs between specials
    unigram = request.node.callspec.params["any_tokenizer_path"] == "sp-unigram"
    assert_same_ids_or_tied(data, runs, tok, any_tokenizer_path, ties_possible=unigram)
    for f in (
        "offsets",
        "seg_offsets",
        "seg_trainable",
        "seg_turn",
        "seg_exchange",
        "seg_role",
        "example_segs",
        "turn_tokens",
        "turn_trainable",
        "turn_role",
        "exchange_tokens",
        "fixed",
    ):
        assert np.array_equal(getattr(data, f), getattr(runs, f)), f
    for i, conv in enumerate(convs):
        assert tpl.render_text(conv) == "".join(seg.text for seg in tpl.render(conv))
        whole = tok.encode(tpl.render_text(conv))
        segs = data.segments(i)
        assert [int(t) for _, _, ids in segs for t in ids] == list(whole)
        # labels: exactly the tokens of trainable segments
        ids, labels = data.example(i)
        mask = np.concatenate([np.full(len(s), tr) for _, tr, s in segs]) if segs else np.zeros(0, bool)
        assert np.array_equal(labels, np.where(mask, ids, -100))
        assert all(role == "assistant" for role, tr, _ in segs if tr)


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
