"""Property test of tokenize (hypothesis): on random conversations, the fast engine's segments equal the
run engine's and concatenate to the whole string's tokenization, labels exactly on trainable segments."""

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # only this module needs it
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kindred.data import TEMPLATES, get_template, load_tokenizer, tokenize

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
