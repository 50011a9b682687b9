"""The terminal view of an evaluation (rich): the tests × models matrix, per-model summary, paired change."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .results import EvalResults


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def matrix_table(res: EvalResults) -> Table:
    models = res.model_names
    table = Table(title=f"kindred eval · {res.battery.get('name', '')}", title_justify="left")
    table.add_column("test")
    table.add_column("category", style="dim")
    for m in models:
        table.add_column(m, justify="left")
    for t in res.tests:
        cells = []
        for m in models:
            s = res.sample(m, t.id)
            if s is None:
                cells.append("–")
                continue
            mark = "[green]✓[/]" if s.passed else "[red]✗[/]"
            flags = (" [magenta]loop[/]" if s.looped else "") + (" [blue]refused[/]" if s.refused else "")
            flags += f" [yellow]{s.ungraded} ungraded[/]" if s.ungraded else ""
            cells.append(f"{mark} {s.score:.2f}{flags}")
        table.add_row(t.id, t.category, *cells)
    return table


def summary_table(res: EvalResults) -> Table:
    summary = res.summary()
    table = Table(title="per model", title_justify="left")
    for col in (
        "model",
        "pass rate (95% CI)",
        "loops",
        "substantive",
        "refused",
        "over-refusal",
        "p50 / p95 s",
        "tok/s",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in res.models:
        s = summary[m.name]
        lo, hi = s["pass_ci95"]
        lat = s["latency"]
        tps = lat["tokens_per_s_p50"]
        table.add_row(
            f"{m.name} [dim]{m.role}[/]",
            f"{s['passed']}/{s['tests']} {_pct(s['pass_rate'])} ({_pct(lo)}–{_pct(hi)})",
            str(s["loops"]["k"]),
            str(s["substantive"]["k"]),
            str(s["refusal"]["k"]),
            f"{s['over_refusal']['k']}/{s['over_refusal']['n']}",
            f"{lat['total_p50_s'] or 0:.2f} / {lat['total_p95_s'] or 0:.2f}",
            "–" if tps is None else f"{tps:.1f}",
        )
    return table


def print_results(res: EvalResults, console: Console | None = None) -> None:
    console = console or Console()
    console.print(matrix_table(res))
    console.print(summary_table(res))
    for c in res.comparisons():
        console.print(
            f"{c['reference']} → {c['model']}: {len(c['improved'])} improved, "
            f"{len(c['regressed'])} regressed, Δ pass rate {100 * (c['delta_pass_rate'] or 0):+.0f} pts, "
            f"exact McNemar p = {c['mcnemar_p']:.3f}"
        )
