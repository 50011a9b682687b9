"""Budget policy, the budget report, the users' planning numbers (planner, cost table, logits memory), the
`kindred tokens` CLI and `kindred plan --data` end to end."""

import json

import numpy as np
import pytest

from kindred import KindredValueError
from kindred.cli import main
from kindred.data import (
    TEMPLATES,
    apply_budget,
    budget_report,
    cost_table,
    floor_2sig,
    get_template,
    load_tokenizer,
    logits_bytes,
    plan_conversation,
    token_report,
    tokenize,
    truncate_conversation,
)
from kindred.data.budget import DROP, KEEP, TRUNCATE
from kindred.data.samples import calibration_path, load_calibration


def test_planner_reproduces_seed_004_worked_example():
    # Seed 004: budget 16K, system ~500, exchanges 400–600 tokens, buffer ~1K → ~14K available, ~28 exchanges
    # max at 500 per exchange, 20–25 recommended. By hand:
    #   16,384 − 500 − 1,000 = 14,884 available → 14,000 for planning (two significant digits, rounded down)
    #   ⌊14,000 / 500⌋ = 28 exchanges at most
    #   recommended ⌈0.7 × 28⌉ = ⌈19.6⌉ = 20 … ⌊0.9 × 28⌋ = ⌊25.2⌋ = 25
    #   at the long end of the range: ⌊14,000 / 600⌋ = 23
    plan = plan_conversation(16384, 500, 500, 1000, exchange_range=(400, 600))
    assert plan.available == 14884
    assert plan.available_planning == 14000
    assert plan.max_exchanges == 28
    assert plan.recommended == (20, 25)
    assert plan.max_exchanges_longest == 23
    assert "~14K for planning" in plan.summary() and "28 exchanges max" in plan.summary()
    assert "20–25 recommended" in plan.summary()
    # the other readings of "16K" and "~1K" give the same answer: 16,000 − 500 − 1,024 = 14,476 → 14,000
    for budget, buffer in ((16000, 1000), (16000, 1024), (16384, 1024)):
        p = plan_conversation(budget, 500, 500, buffer)
        assert (p.available_planning, p.max_exchanges, p.recommended) == (14000, 28, (20, 25))


def test_planner_edges():
    assert floor_2sig(14884) == 14000 and floor_2sig(950) == 950 and floor_2sig(1592) == 1500
    tight = plan_conversation(2048, 400, 600, 1024)  # 624 available → 1 exchange
    assert (tight.max_exchanges, tight.recommended) == (1, (1, 1))
    none = plan_conversation(1000, 500, 300, 1024)
    assert (none.max_exchanges, none.recommended) == (0, (0, 0))
    with pytest.raises(KindredValueError):
        plan_conversation(16384, 500, 0)


def test_logits_memory_gemma3_case():
    # a user's notes: 4096 tokens × 262,144 vocab × 4 bytes = 4,294,967,296 B ≈ 4.3 GB (4 GiB)
    assert logits_bytes(4096, 262_144) == 4_294_967_296
    assert round(logits_bytes(4096, 262_144) / 1e9, 1) == 4.3


def test_cost_table_applies_seed_004_ratios():
    lengths = np.array([1000, 3000, 5000, 9000, 20000, 70000])
    table = cost_table(lengths)
    assert [r["context"] for r in table] == [4096, 8192, 16384, 32768, 65536]
    assert [r["relative_cost"] for r in table] == [1, 2, 4, 8, 16]
    assert [r["examples_fit"] for r in table] == [2, 3, 4, 5, 5]
    assert table[0]["packed_rows"] == 1 and table[0]["packed_cost"] == 1  # 1000 + 3000 share one 4K row
    assert table[1]["padded_cost"] == 3 * 2
    assert table[4]["tokens_fit_share"] == pytest.approx(38000 / 108000)


@pytest.fixture
def tok(hf_tokenizer_path):
    return load_tokenizer(hf_tokenizer_path)


def test_policies(tok):
    convs = load_calibration()[:12]
    tpl = get_template("qwen3")
    data = tokenize(convs, tok, tpl)
    budget = int(np.sort(data.tokens)[6])  # about half the examples are over
    over = data.tokens > budget
    res = apply_budget(data, convs, tok, tpl, budget, "drop")
    assert res.dropped == over.sum() and len(res.data) == (~over).sum()
    assert (res.data.tokens <= budget).all()
    with pytest.raises(KindredValueError, match=f"over the budget of {budget:,} tokens") as e:
        apply_budget(data, convs, tok, tpl, budget, "error", where=lambda i: f"data.jsonl:{i + 1}")
    first_over = int(np.flatnonzero(over)[0])
    assert f"data.jsonl:{first_over + 1}: {int(data.tokens[first_over]):,} tokens" in str(e.value)
    res = apply_budget(data, convs, tok, tpl, budget, "truncate", keep_conversations=True)
    assert (res.data.tokens <= budget).all()
    assert set(res.action[~over]) == {KEEP}
    for i in np.flatnonzero(res.action == TRUNCATE):
        k = res.source.tolist().index(i)
        shortened = truncate_conversation(convs[i], int(res.dropped_exchanges[i]))
        assert res.conversations[k] == shortened
        assert shortened[0] == convs[i][0]  # the system prompt stays
        assert shortened[-1] == convs[i][-1]
        again = tokenize([shortened], tok, tpl)
        assert np.array_equal(res.data.example(k)[0], again.example(0)[0])
        assert res.tokens_after[i] == again.tokens[0]
    assert res.truncated + res.dropped == over.sum()
    assert (res.action[res.action == DROP] == DROP).all()


@pytest.mark.parametrize("template", ["gemma3", "mistral-nemo", "llama3"])
def test_truncation_keeps_the_system_prompt_in_every_template(tok, template):
    convs = [c for c in load_calibration() if sum(m["role"] == "user" for m in c) >= 3][:4]
    tpl = get_template(template)
    data = tokenize(convs, tok, tpl)
    budget = int(data.tokens.min()) - 1
    res = apply_budget(data, convs, tok, tpl, budget, "truncate", keep_conversations=True)
    for k, conv in enumerate(res.conversations or []):
        assert conv[0]["role"] == "system"
        assert res.data.tokens[k] <= budget
        text = tok.decode(res.data.example(k)[0])
        assert conv[0]["content"].strip() in text


def test_budget_report_fields(tok, tmp_path):
    report = budget_report(
        calibration_path(), tok, "gemma3", budget=500, pack=1024, policy="truncate", buffer=128
    )
    d = report.to_dict()
    assert d["examples"] == 61 and report.total == int(report.lengths.sum())
    assert report.distribution["min"] <= report.median <= report.p95 <= report.distribution["max"]
    assert 0 < report.trainable_share < 1
    assert report.over_budget == report.truncated + report.dropped > 0
    assert all(e["tokens"] > 500 for e in report.over_examples)
    assert (
        report.padding["packed_rows"] is not None
        and report.padding["packed_waste"] < report.padding["unpacked_waste"]
    )
    assert [r["relative_cost"] for r in report.cost] == [1, 2, 4, 8, 16]
    assert report.planner["budget"] == 500 and report.planner["max_exchanges"] >= 1
    assert json.loads(json.dumps(d))["planner"]["max_exchanges"] == report.planner["max_exchanges"]
    text = str(report)
    for words in (
        "tokens per example",
        "tokens per exchange",
        "relative training cost",
        "fp32 logits",
        "planner",
    ):
        assert words in text
    pytest.importorskip("matplotlib")
    png = report.plot(tmp_path / "hist.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_json_plot_and_out(hf_tokenizer_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from safetensors.numpy import load_file

    argv = ["tokens", str(calibration_path()), "--tokenizer", str(hf_tokenizer_path), "--template", "qwen3"]
    assert main([*argv, "--budget", "16384", "--pack", "8192", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["budget"] == 16384 and d["pack"] == 8192 and d["over_budget"] == 0
    assert d["planner"]["recommended"][1] >= d["planner"]["recommended"][0] >= 1
    out = tmp_path / "prep.safetensors"
    assert (
        main(
            [
                *argv,
                "--budget",
                "2048",
                "--pack",
                "4096",
                "--plot",
                str(tmp_path / "h.png"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "conversation-length planner" in shown and "wrote prepared data" in shown
    tensors = load_file(out)
    assert tensors["input_ids"].shape[1] == 4096
    assert int(tensors["cu_seqlens"][-1]) == tensors["input_ids"].size
    assert main([*argv, "--budget", "1000", "--date-string", "1 Jan 2026"]) == 2  # not llama3
    assert "--date-string applies to the llama3 template only" in capsys.readouterr().err


def test_token_report_and_kindred_plan_data(hf_tokenizer_path, capsys):
    report = token_report(calibration_path(), tokenizer=hf_tokenizer_path, template="llama3")
    assert report.total == sum(report.lengths) and report.p95 == int(
        np.percentile(report.lengths, 95, method="higher")
    )
    assert report.budget is None and report.over_budget == 0
    argv = ["plan", "--gpu", "rtx-4090", "--model", "qwen3-8b", "--seq", "4096", "--json"]
    data = ["--data", str(calibration_path()), "--tokenizer", str(hf_tokenizer_path), "--template", "llama3"]
    assert main([*argv, *data]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["tokens_p95"] == report.p95
    assert out["settings"]["dataset_tokens"] == report.total
    checklist = out["models"][0]["checklist"]
    assert checklist["context fits data p95"]["status"] == "pass"
    assert checklist["token budget defined"]["status"] == "pass"
    assert main([*argv, "--data", str(calibration_path())]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


FIELDS = (
    "ids", "labels", "offsets", "tokens", "trainable", "fixed", "seg_offsets", "seg_trainable", "seg_turn",
    "seg_exchange", "seg_role", "example_segs", "turn_offsets", "turn_tokens", "turn_trainable", "turn_role",
    "exchange_offsets", "exchange_tokens", "exchange_trainable",
)  # fmt: skip


@pytest.mark.parametrize("name", TEMPLATES)
def test_truncation_by_splicing_equals_rerendering(name, any_tokenizer_path):
    from kindred.data.tokenized import splice_exchanges

    tok = load_tokenizer(any_tokenizer_path)
    tpl = get_template(name)
    convs = [c for c in load_calibration() if sum(m["role"] == "user" for m in c) >= 3]
    convs.append([m for m in convs[0] if m["role"] != "system"])  # no system prompt
    data = tokenize(convs, tok, tpl)
    rng = np.random.default_rng(3)
    rows = np.arange(len(convs))
    drop = np.array([rng.integers(1, len(data.exchanges(i))) for i in rows])
    spliced = splice_exchanges(data, rows, drop)
    rendered = tokenize(
        [truncate_conversation(c, int(k)) for c, k in zip(convs, drop, strict=True)], tok, tpl
    )
    same = all(np.array_equal(getattr(spliced, f), getattr(rendered, f)) for f in FIELDS)
    # Gemma 3 folds the system prompt into the first user turn: cutting tokens would lose it, so it re-renders
    assert same == tpl.truncation_splices


def test_compose_replaces_and_drops_rows(hf_tokenizer_path):
    from kindred.data.tokenized import compose

    convs = load_calibration()[:8]
    data = tokenize(convs, hf_tokenizer_path, "llama3")
    other = tokenize(convs[5:7], hf_tokenizer_path, "llama3")
    rows = np.array([0, 1, 3, 4, 5, 7])
    other_row = np.array([-1, -1, 1, -1, 0, -1])
    out = compose(data, rows, other, other_row)
    want = type(data).concat([data, other]).take([0, 1, 9, 4, 8, 7])
    for f in FIELDS:
        assert np.array_equal(getattr(out, f), getattr(want, f)), f
