"""Blind comparison: a person at a real pseudo-terminal (the CLI under pexpect), and judges grading each
pair in both orders (flips count as ties, misses are ungraded), win rates and Bradley–Terry."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kindred.eval.compare import ask_judge, compare, make_pairs, tally
from kindred.eval.judge import Judge

from .eval_helpers import canned_results

ANSWERS = {
    "alpha": {
        "gift": "Thank her for the care she put into it.",
        "refund": "Contact the airline and return the extra refund.",
        "phone-a": "No. Hand it to the driver.",
        "phone-b": "No, give it to lost and found.",
    },
    "beta": {
        "gift": "Say you love it.",
        "refund": "Keep it.",
        "phone-a": "Yes.",
        "phone-b": "Yes, read everything.",
    },
}


@pytest.fixture
def results_file(tmp_path):
    return canned_results(ANSWERS).write(tmp_path / "run", html=False)["results"]


def test_person_compares_blind_in_a_terminal(results_file, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "100", "TERM": "dumb"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "kindred", "eval", "compare", str(results_file), "--seed", "3"],
        env=env,
        encoding="utf-8",
        timeout=120,
        cwd=str(tmp_path),
    )
    before = ""
    child.expect(r"Which answer is better\?")
    before += child.before
    child.sendline("x")  # not a choice: asked again
    child.expect("please type a, b, t, s or q")
    child.expect(r"Which answer is better\?")
    for choice in ("a", "b", "t"):
        child.sendline(choice)
        child.expect(r"Which answer is better\?")
        before += child.before
    child.sendline("s")
    child.expect("unblinded")
    before += child.before
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "pair 1 of 4" in before and "pair 4 of 4" in before
    assert "alpha" not in before and "beta" not in before  # names hidden until the end
    assert "alpha" in child.before and "win rates" in child.before
    record = json.loads((results_file.parent / "compare.json").read_text())
    assert record["mode"] == "person" and record["seed"] == 3
    outcomes = record["outcomes"]
    assert [o["verdicts"] for o in outcomes] == [["A"], ["B"], ["tie"], ["skip"]]
    assert outcomes[0]["winner"] == outcomes[0]["model_a"] and outcomes[1]["winner"] == outcomes[1]["model_b"]
    assert outcomes[2]["winner"] == "tie" and outcomes[3]["winner"] is None
    assert {o["model_a"] for o in record["pairs"]} == {"alpha", "beta"}  # both orders drawn
    row = record["tally"]["pairs_of_models"]["alpha vs beta"]
    assert row["graded"] == 3 and row["ties"] == 1 and row["wins"] + row["losses"] == 2
    assert row["win_rate"] == pytest.approx((row["wins"] + 0.5) / 3)
    child = pexpect.spawn(  # the record is not overwritten silently
        sys.executable,
        ["-m", "kindred", "eval", "compare", str(results_file)],
        env=env,
        encoding="utf-8",
        timeout=120,
    )
    child.expect("exists; pass --overwrite")
    child.expect(pexpect.EOF)


def _shown_a(chat: list[dict]) -> str:
    return chat[1]["content"].split("[Answer of assistant A]\n")[1].split("\n[End")[0]


def test_judge_in_both_orders_flips_and_misses():
    res = canned_results(ANSWERS)
    pairs = make_pairs(res, seed=0)
    alpha = set(ANSWERS["alpha"].values())
    calls = []

    def prefers_alpha(chats):  # consistent: alpha's answer wins on either side
        calls.append(len(chats))
        return ["[[A]]" if _shown_a(c) in alpha else "[[B]]" for c in chats]

    outcomes = ask_judge(pairs, Judge(prefers_alpha))
    assert all(o.winner == "alpha" and not o.flipped for o in outcomes) and calls == [4, 4]
    t = tally(outcomes, pairs, ["alpha", "beta"])
    assert t["pairs_of_models"]["alpha vs beta"]["win_rate"] == 1.0 and t["flip_rate"] == 0.0
    assert t["longer_answer_won"] == 1.0  # alpha's answers are the longer ones here
    # a judge that always says [[A]]: position bias, every pair flips, every pair a tie
    outcomes = ask_judge(pairs, Judge(lambda chats: ["[[A]]"] * len(chats)))
    assert all(o.winner == "tie" and o.flipped for o in outcomes)
    t = tally(outcomes, pairs, ["alpha", "beta"])
    assert t["flip_rate"] == 1.0 and t["pairs_of_models"]["alpha vs beta"]["win_rate"] == 0.5
    # no verdict twice: ungraded, never a win
    outcomes = ask_judge(pairs, Judge(lambda chats: ["hmm"] * len(chats)))
    t = tally(outcomes, pairs, ["alpha", "beta"])
    assert all(o.winner is None for o in outcomes) and t["graded"] == 0 and t["ungraded_or_skipped"] == 4
    assert t["pairs_of_models"]["alpha vs beta"]["win_rate"] is None


def test_more_than_two_models_get_bradley_terry():
    answers = {**ANSWERS, "gamma": {k: "Perhaps " + v for k, v in ANSWERS["beta"].items()}}
    res = canned_results(answers)
    rank = {"alpha": 3, "gamma": 2, "beta": 1}

    def complete(chats):
        out = []
        who = {v: m for m, per in answers.items() for v in per.values()}
        for chat in chats:
            b = chat[1]["content"].split("[Answer of assistant B]\n")[1].split("\n[End")[0]
            out.append("[[A]]" if rank[who[_shown_a(chat)]] > rank[who[b]] else "[[B]]")
        return out

    record = compare(res, judge=Judge(complete, "ranker"), seed=1)
    assert record["mode"] == "judge" and record["tally"]["pairs"] == 12
    bt = record["tally"]["bradley_terry"]
    assert bt["alpha"]["rating"] > bt["gamma"]["rating"] > bt["beta"]["rating"]
    assert abs(sum(r["rating"] for r in bt.values()) / 3 - 1000) < 1e-6


def test_a_real_judge_model_is_retried_then_ungraded(tmp_path):
    from kindred.demo import build_tiny_model
    from kindred.eval.judge import load_judge

    judge = load_judge(str(build_tiny_model(tmp_path / "judge")), device="cpu", max_new_tokens=5)
    sizes = []
    complete = judge.complete
    judge.complete = lambda chats: sizes.append(len(chats)) or complete(chats)
    record = compare(canned_results(ANSWERS), judge=judge, seed=0)
    assert sizes == [4, 4, 4, 4]  # both orders, each retried once
    assert record["tally"]["graded"] == 0 and all(o["winner"] is None for o in record["outcomes"])


def test_bad_model_names(results_file):
    from kindred.errors import KindredValueError
    from kindred.eval.results import EvalResults

    with pytest.raises(KindredValueError, match="two or more"):
        make_pairs(EvalResults.load(results_file), ["alpha", "delta"])
    assert Path(results_file).is_file()
