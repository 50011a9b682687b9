"""Blind pairwise comparison of two or more models' answers to the same tests.

Pairs are built per test and per pair of models, each shown with the names hidden and the order drawn at
random (seeded). A person picks A, B or a tie in the terminal and the choices are unblinded at the end;
or a judge model grades every pair in both orders (A/B as drawn, then swapped): two verdicts that
disagree count as a tie (an order flip, whose rate is reported), a pair without a verdict in either order
is "ungraded". The tally gives each pair of models wins, ties, losses and a win rate ((wins + ties / 2) /
graded) with a 95 % Wilson interval, the share of decided pairs the longer answer won, and, for more than
two models, Bradley–Terry ratings with bootstrap intervals.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import KindredValueError
from .judge import Judge
from .results import EvalResults
from .stats import bootstrap_bradley_terry, bradley_terry, wilson_interval

CHOICES = {"a": "A", "b": "B", "t": "tie", "s": "skip", "q": "quit"}


@dataclass
class Pair:
    """One blinded comparison: ``model_a`` is shown as A, ``model_b`` as B (hidden until the end)."""

    test_id: str
    category: str
    messages: list[dict]
    model_a: str
    model_b: str
    answer_a: str
    answer_b: str


@dataclass
class Outcome:
    test_id: str
    model_a: str
    model_b: str
    winner: str | None  # a model name, "tie", or None (skipped / ungraded)
    how: str  # "person" or "judge"
    verdicts: list = field(default_factory=list)  # the raw choices: one (person) or two (judge, both orders)
    flipped: bool = False  # the judge's two orders disagreed (counted as a tie)


def make_pairs(res: EvalResults, models: list[str] | None = None, seed: int = 0) -> list[Pair]:
    """Every test × pair of models that both answered it, order within a pair and of the pairs random."""
    models = models or res.model_names
    unknown = [m for m in models if m not in res.model_names]
    if unknown or len(models) < 2:
        raise KindredValueError(
            f"compare needs two or more of the results' models {res.model_names}, got {models}"
        )
    rng = random.Random(seed)
    pairs = []
    for t in res.tests:
        for x, y in itertools.combinations(models, 2):
            sx, sy = res.sample(x, t.id), res.sample(y, t.id)
            if sx is None or sy is None:
                continue
            if rng.random() < 0.5:
                (x, sx), (y, sy) = (y, sy), (x, sx)
            pairs.append(Pair(t.id, t.category, t.messages, x, y, sx.output, sy.output))
    rng.shuffle(pairs)
    return pairs


def _winner(p: Pair, choice: str | None) -> str | None:
    return {"A": p.model_a, "B": p.model_b, "tie": "tie"}.get(choice)


def ask_person(pairs: list[Pair], console=None, read: Callable[[str], str] = input) -> list[Outcome]:
    """Show each pair blind and read A / B / tie / skip / quit; the names appear only in the tally."""
    from rich.console import Console
    from rich.panel import Panel

    console = console or Console()
    out = []
    for k, p in enumerate(pairs, 1):
        question = p.messages[-1]["content"] if p.messages else p.test_id
        console.rule(f"pair {k} of {len(pairs)} · {p.category}")
        console.print(Panel(question, title="question", title_align="left"))
        console.print(Panel(p.answer_a or "(empty)", title="A", title_align="left"))
        console.print(Panel(p.answer_b or "(empty)", title="B", title_align="left"))
        while True:
            answer = read("Which answer is better? [a] / [b] / [t]ie / [s]kip / [q]uit: ").strip().lower()
            if answer[:1] in CHOICES and answer:
                break
            console.print("please type a, b, t, s or q")
        choice = CHOICES[answer[:1]]
        if choice == "quit":
            break
        winner = None if choice == "skip" else _winner(p, choice)
        out.append(Outcome(p.test_id, p.model_a, p.model_b, winner, "person", [choice]))
    return out


def ask_judge(pairs: list[Pair], judge: Judge) -> list[Outcome]:
    """Each pair judged as drawn and swapped; disagreement is a tie (flipped), a miss ungraded."""
    first = judge.pick([(p.messages, p.answer_a, p.answer_b) for p in pairs])
    second = judge.pick([(p.messages, p.answer_b, p.answer_a) for p in pairs])
    out = []
    for p, v1, v2 in zip(pairs, first, second, strict=True):
        w1 = _winner(p, v1.value)
        w2 = {"A": p.model_b, "B": p.model_a, "tie": "tie"}.get(v2.value)
        if w1 is None or w2 is None:
            winner, flipped = None, False
        elif w1 == w2:
            winner, flipped = w1, False
        else:
            winner, flipped = "tie", True
        out.append(Outcome(p.test_id, p.model_a, p.model_b, winner, "judge", [v1.value, v2.value], flipped))
    return out


def tally(outcomes: list[Outcome], pairs: list[Pair], models: list[str], seed: int = 0) -> dict:
    """Wins, ties and win rates per pair of models; flip rate; longer-answer share; Bradley–Terry (> 2)."""
    by_key = {(p.test_id, p.model_a, p.model_b): p for p in pairs}
    graded = [o for o in outcomes if o.winner is not None]
    table = {}
    for x, y in itertools.combinations(models, 2):
        mine = [o for o in graded if {o.model_a, o.model_b} == {x, y}]
        wins, losses = sum(o.winner == x for o in mine), sum(o.winner == y for o in mine)
        ties = len(mine) - wins - losses
        n = len(mine)
        lo, hi = wilson_interval(wins + ties / 2, n)
        table[f"{x} vs {y}"] = {
            "model": x,
            "opponent": y,
            "wins": wins,
            "losses": losses,
            "ties": ties,
            "graded": n,
            "win_rate": (wins + ties / 2) / n if n else None,
            "win_ci95": [lo, hi],
        }
    decided = [o for o in graded if o.winner != "tie"]
    longer = 0
    for o in decided:
        p = by_key[(o.test_id, o.model_a, o.model_b)]
        la, lb = len(p.answer_a), len(p.answer_b)
        longer += (la > lb and o.winner == p.model_a) or (lb > la and o.winner == p.model_b)
    judged = [o for o in outcomes if o.how == "judge" and o.winner is not None]
    result = {
        "pairs": len(pairs),
        "answered": len(outcomes),
        "graded": len(graded),
        "ungraded_or_skipped": len(outcomes) - len(graded),
        "flip_rate": sum(o.flipped for o in judged) / len(judged) if judged else None,
        "longer_answer_won": longer / len(decided) if decided else None,
        "pairs_of_models": table,
    }
    if len(models) > 2 and graded:
        games = [
            (o.model_a, o.model_b, 0.5 if o.winner == "tie" else float(o.winner == o.model_a)) for o in graded
        ]
        ratings = bradley_terry(models, games)
        ci = bootstrap_bradley_terry(models, games, seed=seed)
        result["bradley_terry"] = {m: {"rating": ratings[m], "ci95": list(ci[m])} for m in models}
    return result


def compare(
    res: EvalResults,
    *,
    models: list[str] | None = None,
    judge: Judge | None = None,
    seed: int = 0,
    console=None,
    read: Callable[[str], str] = input,
) -> dict:
    """The blind comparison (a person at the terminal unless ``judge`` is given); the record it returns
    holds every pair (unblinded), every outcome and the tally."""
    models = models or res.model_names
    pairs = make_pairs(res, models, seed)
    outcomes = ask_judge(pairs, judge) if judge is not None else ask_person(pairs, console, read)
    return {
        "schema": "kindred.eval.compare",
        "schema_version": 1,
        "battery": res.battery,
        "models": models,
        "mode": "judge" if judge is not None else "person",
        "judge": judge.name if judge is not None else None,
        "seed": seed,
        "outcomes": [asdict(o) for o in outcomes],
        "pairs": [asdict(p) for p in pairs],
        "tally": tally(outcomes, pairs, models, seed),
    }


def print_tally(record: dict, console=None) -> None:
    """The unblinded result: who was A and B in each pair, then win rates (and Bradley–Terry)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="unblinded", title_justify="left")
    for col in ("test", "A was", "B was", "choice", "winner"):
        t.add_column(col)
    for o in record["outcomes"]:
        choice = " / ".join(str(v) for v in o["verdicts"]) + (" (flipped)" if o["flipped"] else "")
        t.add_row(o["test_id"], o["model_a"], o["model_b"], choice, o["winner"] or "–")
    console.print(t)
    tally_ = record["tally"]
    w = Table(title="win rates (ties count half)", title_justify="left")
    for col in ("model", "opponent", "wins", "ties", "losses", "win rate (95% CI)"):
        w.add_column(col)
    for row in tally_["pairs_of_models"].values():
        rate = "–" if row["win_rate"] is None else f"{100 * row['win_rate']:.0f}%"
        lo, hi = row["win_ci95"]
        w.add_row(
            row["model"],
            row["opponent"],
            str(row["wins"]),
            str(row["ties"]),
            str(row["losses"]),
            f"{rate} ({100 * lo:.0f}%–{100 * hi:.0f}%)",
        )
    console.print(w)
    notes = [f"{tally_['graded']} of {tally_['pairs']} pairs graded"]
    if tally_["flip_rate"] is not None:
        notes.append(
            f"judge flip rate {100 * tally_['flip_rate']:.0f}% (order swaps that changed the verdict)"
        )
    if tally_["longer_answer_won"] is not None:
        notes.append(f"the longer answer won {100 * tally_['longer_answer_won']:.0f}% of decided pairs")
    console.print("; ".join(notes))
    if "bradley_terry" in tally_:
        b = Table(title="Bradley–Terry ratings (mean 1000)", title_justify="left")
        for col in ("model", "rating", "95% CI"):
            b.add_column(col)
        for m, r in sorted(tally_["bradley_terry"].items(), key=lambda kv: -kv[1]["rating"]):
            b.add_row(m, f"{r['rating']:.0f}", f"{r['ci95'][0]:.0f}–{r['ci95'][1]:.0f}")
        console.print(b)
