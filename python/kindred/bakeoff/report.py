"""The bake-off's decision and its one report: ``report.json``, ``report.md``, ``report.html`` and plots.

The weighted comparison uses kindred.plan's criteria with measurements in place of estimates: capability is
the tuned model's pass rate on the battery, speed its measured decode tokens/s (relative to the fastest
candidate), preference its share of the blind comparison (wins, ties counted half); context, quantization
and community come from the model (the catalogue entry where there is one; left out where unknown). The
decision checklist (model selection's six questions) is decided item by item from what the stages measured.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from .config import BakeoffConfig
from .state import write_json

SYMBOL = {"pass": "✓", "fail": "✗", "unknown": "?"}


def _done(rec: dict | None) -> dict | None:
    return rec["result"] if rec and rec.get("status") == "done" else None


def _check(ok: bool | None, detail: str) -> dict:
    return {"status": "unknown" if ok is None else ("pass" if ok else "fail"), "detail": detail}


def preference_shares(comparison: dict | None) -> dict[str, float]:
    """Each model's share of its graded blind pairs (ties count half)."""
    tally = (_done(comparison) or {}).get("tally")
    if not tally:
        return {}
    won: dict[str, float] = {}
    played: dict[str, int] = {}
    for row in tally["pairs_of_models"].values():
        n = row["graded"]
        for me, wins, losses in (
            (row["model"], row["wins"], row["losses"]),
            (row["opponent"], row["losses"], row["wins"]),
        ):
            won[me] = won.get(me, 0.0) + wins + (n - wins - losses) / 2
            played[me] = played.get(me, 0) + n
    return {m: won[m] / played[m] for m in won if played[m]}


def checklist(cfg: BakeoffConfig, r, rec: dict, export: dict | None) -> dict:
    """Model selection's decision checklist for one candidate, each item from the bake-off's measurements."""
    from ..plan.score import rubric_check

    tokens, ctx = r.tokens, r.model_plan.context
    base, train, tuned = _done(rec["base_eval"]), _done(rec["train"]), _done(rec["tuned_eval"])
    plan = _done(rec["plan"]) or {}
    items = {}
    items["Context window fits your target conversation length"] = _check(
        tokens["max_tokens"] <= ctx,
        f"longest conversation {tokens['max_tokens']} tokens (p95 {tokens['p95_tokens']}) with this template "
        f"vs the model's context of {ctx}",
    )
    if base:
        item = rubric_check(base["pass_rate"])
        tuned_text = f"; tuned: {100 * tuned['pass_rate']:.0f} %" if tuned else ""
        items["Base model evaluated on your rubric (pass rate documented)"] = _check(
            True, f"{item['detail']}{tuned_text} ({base['tests']} tests, {base['results']})"
        )
    else:
        why = (rec["base_eval"] or {}).get("result", {}).get("error", "not run")
        items["Base model evaluated on your rubric (pass rate documented)"] = _check(False, why)
    exported = _done(export) if export and export["result"].get("path", "").endswith(r.name) else None
    if r.source.suffix == ".gguf":
        quant = _check(True, f"the candidate is a GGUF file ({r.source.name})")
    elif exported and exported.get("format") != "merged":
        quant = _check(True, f"exported as {exported['format']}: {exported['path']}")
    else:
        quant = _check(
            False,
            "no quantized file was produced: the bake-off exports merged 16-bit weights (export.format: "
            "merged; kindred.export.gguf.export_gguf quantizes that folder)"
            + (f"; written to {exported['path']}" if exported else ""),
        )
    items["Quantized version available in your target format"] = quant
    need = cfg.checklist.min_tokens_per_s
    if tuned and tuned["decode_tok_s_p50"] is not None:
        items["Speed acceptable for your use case"] = _check(
            tuned["decode_tok_s_p50"] >= need,
            f"{tuned['decode_tok_s_p50']:.1f} tokens/s measured (tuned model, p50, on {train['device']}) vs "
            f"{need:g} needed (checklist.min_tokens_per_s)",
        )
    else:
        items["Speed acceptable for your use case"] = _check(False, "the tuned model was not evaluated")
    vocab = plan.get("spec", {}).get("vocab")
    logits = plan.get("logits_gib")
    logit_note = f"; logits of the {vocab}-token vocabulary: {logits:.2f} GiB estimated" if logits else ""
    if train and train["gpu_mem_gib_peak"] is not None:
        total = plan.get("gpu", {}).get("memory_gb", 0) * 1e9 / 2**30
        items["Training memory fits your GPU (check vocab size!)"] = _check(
            train["gpu_mem_gib_peak"] <= total,
            f"trained; peak {train['gpu_mem_gib_peak']:.2f} GiB measured of {total:.0f} GiB{logit_note}",
        )
    elif train:
        est = plan.get("train_gib")
        items["Training memory fits your GPU (check vocab size!)"] = _check(
            True,
            f"trained on the CPU: peak host memory {train['host_mem_gib_peak']:.2f} GiB measured"
            + (f"; on {plan['gpu']['name']} the plan estimates {est:.2f} GiB" if est is not None else "")
            + logit_note,
        )
    else:
        err = (rec["train"] or {}).get("result", {}).get("error", "not run")
        items["Training memory fits your GPU (check vocab size!)"] = _check(False, f"training failed: {err}")
    budget = tokens["budget"]
    items["Token budget defined (recommend ≤16K/example)"] = _check(
        budget <= cfg.checklist.max_example_tokens and tokens["kept"] > 0,
        f"data.budget {budget} tokens per example (recommended ≤ {cfg.checklist.max_example_tokens}); "
        f"{tokens['over_budget']} of {tokens['conversations']} conversations over it, {tokens['truncated']} "
        f"truncated, {tokens['kept']} kept",
    )
    return items


def decide(cfg: BakeoffConfig, resolved: list, records: dict, comparison: dict | None) -> dict:
    """The weighted comparison from measured pass rates and speeds, and the winner."""
    from ..plan.score import criterion_scores, weighted_score
    from .preflight import spec_of

    prefs = preference_shares(comparison)
    rows = {}
    speeds = {
        r.name: _done(records[r.name]["tuned_eval"])["decode_tok_s_p50"]
        for r in resolved
        if _done(records[r.name]["tuned_eval"])
    }
    best = max((v for v in speeds.values() if v), default=None)
    for r in resolved:
        tuned = _done(records[r.name]["tuned_eval"])
        if not tuned:
            continue
        spec = spec_of(r, cfg.out_dir)
        scores = criterion_scores(spec, speeds[r.name], best, tuned["pass_rate"])
        if not r.catalogue_id:  # no catalogue entry: what is known of its formats and ecosystem
            scores["quantization"] = 1.0 if r.source.suffix == ".gguf" else None
            scores["community"] = None
        scores["preference"] = prefs.get(r.name)
        rows[r.name] = {"scores": scores, "score": weighted_score(scores, cfg.weights)}
    ranked = sorted(
        rows, key=lambda n: (rows[n]["score"], _done(records[n]["tuned_eval"])["pass_rate"]), reverse=True
    )
    return {"weights": cfg.weights, "rows": rows, "ranking": ranked, "winner": ranked[0] if ranked else None}


# -- writing -------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _num(x, fmt="{:.1f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _blocks(cfg, resolved, records, comparison, decision, export, gpu) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, list, image) rendered to Markdown and HTML."""
    b: list[tuple] = []
    n = len(resolved)
    b.append(("h1", f"Bake-off: {n} candidates, battery {cfg.battery}"))
    t = resolved[0].tokens if resolved else {}
    b.append(
        (
            "p",
            f"Data {cfg.data['path']}: {t.get('conversations', 0)} conversations. The same LoRA settings "
            f"({cfg.lora or 'defaults'}), training settings ({cfg.train or 'defaults'}) and battery for "
            f"every candidate; planned for {gpu.name}.",
        )
    )
    winner = decision["winner"]
    b.append(("h2", f"Winner: {winner}" if winner else "No winner (no candidate finished)"))
    weights = ", ".join(f"{k} {v:g}" for k, v in decision["weights"].items())
    b.append(
        (
            "p",
            f"Weighted comparison from measurements; weights: {weights}. Criteria without data are left out.",
        )
    )
    head = ["candidate", "base pass", "tuned pass", "decode tok/s", "train tok/s", "preference", "score"]
    rows = []
    for name in decision["ranking"]:
        rec = records[name]
        base, tuned, tr = _done(rec["base_eval"]), _done(rec["tuned_eval"]), _done(rec["train"])
        row = decision["rows"][name]
        rows.append(
            [
                name,
                _pct(base["pass_rate"] if base else None),
                _pct(tuned["pass_rate"]),
                _num(tuned["decode_tok_s_p50"]),
                _num(tr["tokens_per_s"] if tr else None, "{:,.0f}"),
                _pct(row["scores"].get("preference")),
                f"{row['score']:.3f}",
            ]
        )
    b.append(("table", head, rows))
    tally = (_done(comparison) or {}).get("tally")
    b.append(("h2", "Blind comparison of the tuned models"))
    if tally:
        how = _done(comparison)
        b.append(
            (
                "p",
                f"{tally['graded']} of {tally['pairs']} pairs graded by {how['judge'] or 'a person'}, names "
                "hidden (a judge sees each pair in both orders).",
            )
        )
        rows = [
            [r["model"], r["opponent"], r["wins"], r["ties"], r["losses"], _pct(r["win_rate"])]
            for r in tally["pairs_of_models"].values()
        ]
        b.append(("table", ["model", "opponent", "wins", "ties", "losses", "win rate"], rows))
    else:
        why = (comparison or {}).get("result", {})
        b.append(("p", f"Not done: {why.get('why') or why.get('error') or 'no result'}"))
    b.append(("h2", "Plan (estimates) and training (measured)"))
    rows = []
    for r in resolved:
        p, tr = _done(records[r.name]["plan"]) or {}, _done(records[r.name]["train"])
        rows.append(
            [
                r.name,
                _num(p.get("train_gib"), "{:.3f}"),
                {True: "yes", False: "no"}.get(p.get("fits_train"), "–"),
                _num(p.get("train_hours_estimate"), "{:.3f}"),
                _num(tr["elapsed_s"] / 3600 if tr and tr["elapsed_s"] else None, "{:.3f}"),
                _num(tr["final_loss"] if tr else None, "{:.4f}"),
            ]
        )
    b.append(
        (
            "table",
            ["candidate", "train GiB (est.)", "fits", "hours (est.)", "hours (measured)", "final loss"],
            rows,
        )
    )
    b.append(("h2", "Decision checklist"))
    for r in resolved:
        items = checklist(cfg, r, records[r.name], export)
        records[r.name]["checklist"] = items
        b.append(("h3", r.name))
        b.append(("list", [f"{SYMBOL[c['status']]} {k}: {c['detail']}" for k, c in items.items()]))
    b.append(("h2", "Stages"))
    rows = []
    for r in resolved:
        for stage in ("plan", "base_eval", "train", "tuned_eval"):
            rec = records[r.name][stage]
            res = rec.get("result", {})
            rows.append(
                [
                    r.name,
                    stage,
                    rec["status"],
                    _num(rec.get("seconds")),
                    res.get("line") or res.get("error") or res.get("why", ""),
                ]
            )
    if export:
        res = export["result"]
        rows.append(
            [
                "winner",
                "export",
                export["status"],
                _num(export.get("seconds")),
                res.get("line") or res.get("error", ""),
            ]
        )
    b.append(("table", ["candidate", "stage", "status", "seconds", "result"], rows))
    return b


def _markdown(blocks, plots: dict[str, Path]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif kind == "table":
            head, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    out += [f"![{name}]({p.name})" for name, p in plots.items()]
    return "\n\n".join(out) + "\n"


def _html(blocks, plots: dict[str, Path]) -> str:
    e = html.escape
    body = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(blk[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in blk[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    for name, p in plots.items():
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(
            f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(name)}</figcaption></figure>"
        )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}"
    )
    head = f"<meta charset='utf-8'><title>kindred bake-off</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


def _plots(out: Path, resolved, records) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    names = [r.name for r in resolved]
    plots = {}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.38
    for k, (stage, label) in enumerate((("base_eval", "base"), ("tuned_eval", "tuned"))):
        vals, errs = [], [[], []]
        for n in names:
            res = _done(records[n][stage])
            rate = res["pass_rate"] if res else 0.0
            lo, hi = res["pass_ci95"] if res else (0.0, 0.0)
            vals.append(100 * rate)
            errs[0].append(100 * max(0.0, rate - lo))
            errs[1].append(100 * max(0.0, hi - rate))
        ax.bar(
            [i + (k - 0.5) * width for i in range(len(names))], vals, width, yerr=errs, capsize=3, label=label
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("pass rate (%), 95 % CI")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    plots["pass rates"] = out / "pass_rates.png"
    fig.savefig(plots["pass rates"], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for n in names:
        tr = _done(records[n]["train"])
        if tr and tr["loss_curve"]:
            steps, loss = zip(*tr["loss_curve"], strict=True)
            ax.plot(steps, loss, label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    plots["training loss"] = out / "loss.png"
    fig.savefig(plots["training loss"], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    speeds = [(_done(records[n]["tuned_eval"]) or {}).get("decode_tok_s_p50") or 0.0 for n in names]
    ax.bar(names, speeds)
    ax.set_ylabel("decode tokens/s (tuned, p50)")
    fig.tight_layout()
    plots["decode speed"] = out / "speed.png"
    fig.savefig(plots["decode speed"], dpi=110)
    plt.close(fig)
    return plots


def write_report(cfg, resolved, records, comparison, decision, export, gpu) -> dict:
    out = cfg.out_dir
    blocks = _blocks(cfg, resolved, records, comparison, decision, export, gpu)
    plots = _plots(out, resolved, records)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["markdown"].write_text(_markdown(blocks, plots), encoding="utf-8")
    paths["html"].write_text(_html(blocks, plots), encoding="utf-8")
    report = {
        "schema": "kindred.bakeoff",
        "schema_version": 1,
        "battery": cfg.battery,
        "data": cfg.data,
        "gpu": gpu.to_dict(),
        "candidates": {
            r.name: {
                "source": str(r.source),
                "template": r.template,
                "template_how": r.template_how,
                "tokens": r.tokens,
                "stages": {s: records[r.name][s] for s in ("plan", "base_eval", "train", "tuned_eval")},
                "checklist": records[r.name].get("checklist"),
            }
            for r in resolved
        },
        "compare": comparison,
        "decision": decision,
        "winner": decision["winner"],
        "export": export,
        "plots": {k: str(v) for k, v in plots.items()},
        "paths": {k: str(v) for k, v in paths.items()},
    }
    write_json(paths["json"], report)
    return report
