"""kindred.eval.evaluate end to end on a tiny model: base and tuned on one loaded base (each equal to a
separately loaded model), the records it keeps, the files it writes, judges, and errors before generation."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

import kindred.eval as ke
from kindred.errors import KindredError, KindredValueError
from kindred.eval.battery import parse_battery
from kindred.eval.judge import Judge, parse_rating, parse_verdict
from kindred.generate import SamplingConfig, generate
from kindred.models import from_pretrained
from kindred.nn import load_adapter

from .eval_helpers import SMALL_BATTERY, build_model_and_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_model_and_adapter(tmp_path_factory.mktemp("eval-model"))


@pytest.fixture(scope="module")
def battery_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bat") / "small.yaml"
    path.write_text(SMALL_BATTERY)
    return path


@pytest.fixture(scope="module")
def results(tiny, battery_file):
    folder, adapter = tiny
    return ke.evaluate(battery_file, folder, {"tuned": adapter}, quant="nf4", dtype="fp32", device="cpu")


def _reference_tokens(folder, adapter, battery, quant="nf4"):
    """Each test's greedy tokens from a model loaded on its own (with the adapter when given)."""
    from kindred.data import get_template, load_tokenizer

    model = from_pretrained(folder, quant=quant, dtype=torch.float32)
    if adapter is not None:
        load_adapter(model, adapter)
    tok, tpl = load_tokenizer(folder), get_template("chatml")
    stops = [tok.lookup("<|im_end|>"), tok.lookup("<|endoftext|>")]
    out = {}
    for t in battery.tests:
        ids = tok.encode(tpl.render_text(t.messages) + tpl.generation_prompt())
        cfg = SamplingConfig(max_new_tokens=t.sampling["max_new_tokens"])
        out[t.id] = generate(model, [ids], cfg, stop_token_ids=stops)[0].tokens
    return out


def test_base_and_tuned_on_one_base_equal_separate_models(tiny, battery_file, results):
    folder, adapter = tiny
    battery = ke.load_battery(battery_file)
    base_ref = _reference_tokens(folder, None, battery)
    tuned_ref = _reference_tokens(folder, adapter, battery)
    for t in battery.tests:
        assert results.sample("base", t.id).tokens == base_ref[t.id]
        assert results.sample("tuned", t.id).tokens == tuned_ref[t.id]
    assert any(base_ref[t] != tuned_ref[t] for t in base_ref)  # the adapter changes the answers
    assert [m.name for m in results.models] == ["base", "tuned"]
    assert [m.role for m in results.models] == ["base", "tuned"]
    assert results.models[1].adapter == str(adapter)
    assert results.models[0].info["template"] == "chatml"
    assert "config.yaml" in results.models[0].info["template_source"]  # read from the training run


def test_quant_auto_is_nf4_on_cuda_and_dense_for_a_small_model_on_the_cpu(tiny):
    from kindred.eval.models import CPU_DENSE_MAX_BYTES, auto_quant, resolve
    from kindred.models import load_config

    folder, _ = tiny
    small = load_config(folder)
    big = small.replace(  # Llama-3-8B's shape
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=128256,
        layer_types=("full_attention",) * 32,
    )
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_quant(small, torch.float32, cpu) == "none"
    assert auto_quant(small, torch.bfloat16, cuda) == "nf4"
    assert CPU_DENSE_MAX_BYTES < 8e9 * 4 and auto_quant(big, torch.float32, cpu) == "nf4"
    assert auto_quant(big, torch.bfloat16, cuda) == "nf4"
    assert resolve(folder, quant="auto", device="cpu").quant == "none"
    assert resolve(folder, quant="nf4", device="cpu").quant == "nf4"  # an explicit choice stays


def test_dense_base_and_tuned_in_one_batch_equal_separate_models(tiny, battery_file):
    """The default on the CPU (quant auto: dense here): base and tuned rows share each batch, and each
    answer is the greedy one of its model loaded and run alone. The adapter's display name holds a dot, as
    a bake-off candidate's does ("qwen3-0.6b"): no module name may, so it is loaded under another."""
    folder, adapter = tiny
    res = ke.evaluate(battery_file, folder, {"tuned-0.6b": adapter}, device="cpu")
    assert res.models[0].info["quant"] == "none"
    assert res.models[0].seconds == res.models[1].seconds  # one shared run
    assert res.models[1].name == "tuned-0.6b" and res.models[1].adapter == str(adapter)
    battery = ke.load_battery(battery_file)
    base_ref = _reference_tokens(folder, None, battery, quant=None)
    tuned_ref = _reference_tokens(folder, adapter, battery, quant=None)
    for t in battery.tests:
        assert res.sample("base", t.id).tokens == base_ref[t.id]
        assert res.sample("tuned-0.6b", t.id).tokens == tuned_ref[t.id]
    assert any(base_ref[t] != tuned_ref[t] for t in base_ref)


def test_pair_variants_joins_the_base_and_the_first_adapter():
    from kindred.eval.run import Variant, pair_variants

    base, a, b = Variant("base", "base", False), Variant("a", "tuned", "a"), Variant("b", "tuned", "b")
    assert pair_variants([base, a, b], True) == [[base, a], [b]]
    assert pair_variants([a, base, b], True) == [[base, a], [b]]
    assert pair_variants([base, a, b], False) == [[base], [a], [b]]
    assert pair_variants([a, b], True) == [[a], [b]]


def test_each_sample_records_what_the_issue_asks(results):
    s = results.sample("tuned", "gift")
    assert s.prompt.startswith("<|im_start|>system\nYou are a kind advisor.<|im_end|>\n<|im_start|>user\n")
    assert s.prompt.endswith("<|im_start|>assistant\n")
    assert s.prompt_tokens > 10 and 1 <= s.new_tokens <= 10 and len(s.tokens) == s.new_tokens
    assert 0 < s.ttft_s <= s.total_s and s.tokens_per_s == pytest.approx(s.new_tokens / s.total_s)
    assert s.finish_reason in ("stop", "length", "loop")
    assert {"rule", "seq_rep", "compression_ratio", "hit_max_tokens"} <= set(s.loop)
    assert [c.kind for c in s.checks] == ["icontains", "regex", "refusal"]
    assert results.sample("base", "phone-b").new_tokens <= 6  # a test's own max_new_tokens
    group = results.sample("base", "phone-a").checks[0]
    assert group.kind == "group" and "group 'phone'" in group.detail
    assert group.passed == results.sample("base", "phone-b").checks[0].passed


def test_summary_and_paired_change(results):
    summary = results.summary()
    for name in ("base", "tuned"):
        s = summary[name]
        assert s["tests"] == 4 and 0 <= s["passed"] <= 4
        assert s["pass_rate"] == s["passed"] / 4
        lo, hi = s["pass_ci95"]
        assert lo <= s["pass_rate"] <= hi
        assert set(s["by_category"]) == {"honesty", "consistency"}
        assert s["over_refusal"]["n"] == 4 and s["correct_refusal"]["n"] == 0
        lat = s["latency"]
        assert lat["total_p50_s"] <= lat["total_p95_s"] and lat["new_tokens"] > 0
    (c,) = results.comparisons()
    assert c["reference"] == "base" and c["model"] == "tuned" and c["tests"] == 4
    assert c["both_pass"] + c["both_fail"] + len(c["improved"]) + len(c["regressed"]) == 4
    assert c["mcnemar_p"] == ke.mcnemar_exact(len(c["regressed"]), len(c["improved"]))


def test_files_round_trip(results, tmp_path):
    paths = results.write(tmp_path / "out")
    assert {p.name for p in paths.values()} == {"results.json", "samples.jsonl", "results.csv", "report.html"}
    data = json.loads(paths["results"].read_text())
    assert data["schema"] == ke.SCHEMA and data["schema_version"] == 1
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ke.__file__).parent / "results.schema.json").read_text())
    jsonschema.validate(data, schema)
    lines = paths["samples"].read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["model"] == "base"
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 8 and rows[0]["test_id"] == "gift"
    back = ke.EvalResults.load(paths["results"])
    assert back.summary() == results.summary() and back.comparisons() == results.comparisons()
    assert back.sample("tuned", "gift").output == results.sample("tuned", "gift").output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(KindredError, match="schema_version"):
        ke.EvalResults.load(bad)


def test_merge_joins_runs_of_one_battery(results, tmp_path):
    other = ke.EvalResults.load(results.write(tmp_path / "a", html=False)["results"])
    for m in other.models:
        m.name = "other-" + m.name
    for s in other.samples:
        s.model = "other-" + s.model
    merged = ke.merge([results, other])
    assert merged.model_names == ["base", "tuned", "other-base", "other-tuned"]
    with pytest.raises(KindredValueError, match="unique"):
        ke.merge([results, results])


def test_errors_before_generation(tiny, tmp_path, monkeypatch):
    folder, _ = tiny

    def no(*a, **k):
        raise AssertionError("generation or loading started")

    monkeypatch.setattr("kindred.generate.generate", no)
    monkeypatch.setattr("kindred.eval.models.ModelPlan.load", no)
    long = tmp_path / "long.yaml"
    long.write_text(
        "tests:\n  - id: big\n    category: c\n    checks: [{contains: x}]\n    prompt: "
        + "honest " * 4200
        + "\n"
    )
    with pytest.raises(KindredValueError, match=r"long.yaml:5: tests\[0\].prompt: the prompt is \d+ tokens"):
        ke.evaluate(long, folder, template="chatml", device="cpu")
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(
        "tests:\n  - id: r\n    category: c\n    prompt: hi\n    checks:\n      - {rubric: kind}\n"
    )
    with pytest.raises(
        KindredValueError, match=r"rubric.yaml:6: tests\[0\].checks\[0\]: a rubric check needs"
    ):
        ke.evaluate(rubric, folder, template="chatml", device="cpu")
    judged = tmp_path / "judged.yaml"
    judged.write_text("judge: /no/such/judge\n" + rubric.read_text())
    with pytest.raises(
        KindredValueError, match=r"judged.yaml:1: judge: the judge model '/no/such/judge' cannot"
    ):
        ke.evaluate(judged, folder, template="chatml", device="cpu")
    with pytest.raises(KindredValueError, match="neither a model folder"):
        ke.evaluate(rubric, tmp_path / "nope", device="cpu")
    with pytest.raises(KindredValueError, match="quant must be"):
        ke.evaluate(rubric, folder, quant="q8", device="cpu")


def test_the_judge_protocol_with_scripted_replies():
    """Parsing, the single retry, and "ungraded" (no stand-in model: the replies are the test input)."""
    assert parse_rating("Clear and kind.\nRating: [[8]]") == 8
    assert parse_rating("Rating: [[11]]") is None and parse_rating("eight") is None
    assert parse_verdict('Use "[[A]]", "[[B]]" or "[[C]]".\nA is better. [[A]]') == "A"
    assert parse_verdict("[[C]]") == "tie" and parse_verdict("A wins") is None
    calls = []

    def complete(chats):
        calls.append(chats)
        first = len(calls) == 1
        return ["no verdict" if first and i % 2 else f"ok\nRating: [[{6 + i}]]" for i in range(len(chats))]

    verdicts = Judge(complete).rate([([{"role": "user", "content": "q"}], "answer", "kind")] * 3)
    assert [v.value for v in verdicts] == [6, 6, 8] and len(calls) == 2
    assert calls[1][0][-2] == {"role": "assistant", "content": "no verdict"}  # the retry keeps the miss
    never = Judge(lambda chats: ["I cannot decide."] * len(chats)).rate([([], "a", "c")])
    assert never[0].value is None and len(never[0].replies) == 2


def test_rubric_checks_with_a_real_judge_model(tiny, tmp_path):
    """The tiny random model as the judge: its replies are noise, so every rubric check is retried once
    and ends ungraded, which fails the test; a scripted judge's ratings pass or fail by min_rating."""
    folder, adapter = tiny
    bat = tmp_path / "rubric.yaml"
    bat.write_text(
        "defaults: {max_new_tokens: 4}\ntests:\n  - id: r\n    category: c\n    prompt: Be kind.\n"
        "    checks:\n      - {rubric: 'The answer is kind.', min_rating: 6}\n      - {regex: '.'}\n"
        "    threshold: 0.5\n"
    )
    judge = ke.load_judge(str(folder), device="cpu", max_new_tokens=6)
    batches = []
    complete = judge.complete
    judge.complete = lambda chats: batches.append(len(chats)) or complete(chats)
    res = ke.evaluate(bat, folder, {"tuned": adapter}, quant="none", device="cpu", judge=judge)
    assert batches == [2, 2]  # two samples, each asked twice
    for s in res.samples:
        rubric = s.checks[0]
        assert rubric.passed is None and rubric.detail.startswith("ungraded")
        assert s.ungraded == 1 and s.score <= 0.5
    assert res.summary()["base"]["ungraded_checks"] == 1
    scripted = Judge(lambda chats: ["Rating: [[6]]", "Rating: [[5]]"][: len(chats)])
    res = ke.evaluate(bat, folder, {"tuned": adapter}, quant="none", device="cpu", judge=scripted)
    assert [s.checks[0].passed for s in res.samples] == [True, False]


def test_jsonl_battery_and_a_model_given_as_its_adapter(tiny, tmp_path):
    folder, adapter = tiny
    bat = tmp_path / "b.jsonl"
    bat.write_text(
        '{"id": "x", "category": "c", "prompt": "Hello", "max_new_tokens": 3, "checks": [{"regex": "."}]}\n'
    )
    res = ke.evaluate(bat, adapter, quant="none", device="cpu")  # the base comes from adapter_config.json
    assert res.model_names == ["base", "tuned"]
    only = ke.evaluate(bat, folder, quant="none", device="cpu", template="chatml")
    assert [m.role for m in only.models] == ["model"] and only.comparisons() == []


def test_battery_parsed_once_is_reusable():
    b = parse_battery(SMALL_BATTERY, "x.yaml")
    assert len(b) == 4 and b.categories == ["honesty", "consistency"]
