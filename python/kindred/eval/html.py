"""The self-contained HTML report: summary, paired change, two inline-SVG plots, the tests × models matrix.

No network: styles, script and plots are inline, and a Content-Security-Policy forbids any fetch. The
matrix has a "differences only" filter (rows where the models disagree on pass/fail; ``#differences`` in
the address turns it on); a click on a row shows each model's answer and check results.
"""

from __future__ import annotations

import html
import json

from .results import EvalResults

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} .muted{color:#666}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{border-bottom:1px solid #e3e3e3;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.test{cursor:pointer} tr.test:hover{background:#fafafa}
.pass{color:#1a7f37;font-weight:600} .fail{color:#c62828;font-weight:600}
.badge{display:inline-block;font-size:11px;border-radius:3px;padding:0 4px;margin-left:4px;background:#eee}
.badge.loop{background:#fde2e1;color:#a11} .badge.ref{background:#e6eefb;color:#234}
pre{white-space:pre-wrap;background:#f7f7f7;padding:8px;border-radius:4px;margin:4px 0;max-height:340px;
overflow:auto}
.plots{display:flex;flex-wrap:wrap;gap:24px} .controls{margin:8px 0} figure{margin:0}
td.detail{background:#fcfcfc} ul.checks{margin:2px 0 8px 18px;padding:0}
"""

SCRIPT = """
(function(){
  var box = document.getElementById('diff-only');
  var rows = Array.prototype.slice.call(document.querySelectorAll('tr.test'));
  function apply(){
    var shown = 0;
    rows.forEach(function(tr){
      var hide = box.checked && tr.getAttribute('data-diff') === '0';
      tr.hidden = hide;
      var d = document.getElementById(tr.getAttribute('data-detail'));
      if (hide) { d.hidden = true; } else { shown += 1; }
    });
    document.getElementById('shown').textContent = String(shown);
  }
  box.addEventListener('change', function(){
    history.replaceState(null, '', box.checked ? '#differences' : '#');
    apply();
  });
  rows.forEach(function(tr){
    tr.addEventListener('click', function(){
      var d = document.getElementById(tr.getAttribute('data-detail'));
      d.hidden = !d.hidden;
    });
  });
  if (location.hash === '#differences') { box.checked = true; }
  apply();
  document.body.setAttribute('data-ready', '1');
})();
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _sec(x) -> str:
    return "–" if x is None else f"{x:.2f} s"


def bars_svg(categories: list[str], models: list[str], rates: dict, width: int = 560) -> str:
    """Grouped bars: pass rate by category (0-100 %), one bar per model with its 95 % interval."""
    h, left, bottom, top = 260, 44, 64, 16
    plot_w, plot_h = width - left - 10, h - top - bottom
    group = plot_w / max(1, len(categories))
    bar = min(28.0, group * 0.8 / max(1, len(models)))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" '
        'aria-label="pass rate by category">'
    ]
    for tick in range(0, 101, 25):
        y = top + plot_h * (1 - tick / 100)
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick}%</text>')
    for ci, cat in enumerate(categories):
        x0 = left + ci * group + (group - bar * len(models)) / 2
        for mi, m in enumerate(models):
            r = rates.get(m, {}).get(cat)
            if r is None or r["rate"] is None:
                continue
            x = x0 + mi * bar
            y = top + plot_h * (1 - r["rate"])
            color = COLORS[mi % len(COLORS)]
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{top + plot_h - y:.1f}" '
                f'fill="{color}"><title>{_e(m)} · {_e(cat)}: {r["k"]}/{r["n"]}</title></rect>'
            )
            lo, hi = r["ci95"]
            cx = x + (bar - 2) / 2
            y_lo, y_hi = top + plot_h * (1 - lo), top + plot_h * (1 - hi)
            out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y_lo:.1f}" y2="{y_hi:.1f}" stroke="#333"/>')
        label_x = left + ci * group + group / 2
        out.append(
            f'<text x="{label_x:.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle">'
            f"{_e(cat[:18])}</text>"
        )
    out.append(_legend(models, left, h - 22))
    out.append("</svg>")
    return "".join(out)


def latency_svg(models: list[str], seconds: dict[str, list[float]], width: int = 560) -> str:
    """Each model's per-test total seconds as dots, with its median (thick tick) and p95 (thin tick)."""
    row_h, left, top = 34, 110, 14
    h = top + row_h * len(models) + 40
    longest = max([v for vs in seconds.values() for v in vs] + [1e-3])
    plot_w = width - left - 16

    def x_of(v: float) -> float:
        return left + plot_w * v / longest

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" '
        'aria-label="latency per test">'
    ]
    for k in range(5):
        v = longest * k / 4
        x = x_of(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - 30}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{h - 16}" font-size="11" text-anchor="middle">{v:.1f} s</text>')
    for mi, m in enumerate(models):
        y = top + mi * row_h + row_h / 2
        color = COLORS[mi % len(COLORS)]
        out.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="12" text-anchor="end">{_e(m[:16])}</text>'
        )
        values = sorted(seconds.get(m, []))
        for v in values:
            out.append(f'<circle cx="{x_of(v):.1f}" cy="{y:.1f}" r="3.5" fill="{color}" fill-opacity="0.6"/>')
        if values:
            from .stats import percentile

            for q, w in ((50, 3), (95, 1.5)):
                x = x_of(percentile(values, q))
                out.append(
                    f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 11:.1f}" y2="{y + 11:.1f}" stroke="#222" '
                    f'stroke-width="{w}"><title>p{q}: {percentile(values, q):.2f} s</title></line>'
                )
    out.append("</svg>")
    return "".join(out)


def _legend(models: list[str], x: float, y: float) -> str:
    parts = []
    for i, m in enumerate(models):
        xi = x + i * 130
        parts.append(f'<rect x="{xi}" y="{y}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>')
        parts.append(f'<text x="{xi + 14}" y="{y + 9}" font-size="11">{_e(m[:16])}</text>')
    return "".join(parts)


def _summary_table(res: EvalResults, summary: dict) -> str:
    head = (
        "<tr><th>model</th><th>pass rate (95 % CI)</th><th>loops</th><th>substantive</th><th>refusals</th>"
        "<th>over-refusal</th><th>latency p50 / p95</th><th>tokens/s p50</th><th>ungraded</th></tr>"
    )
    rows = []
    for m in res.models:
        s = summary[m.name]
        lo, hi = s["pass_ci95"]
        lat = s["latency"]
        rows.append(
            f"<tr><td><b>{_e(m.name)}</b> <span class='muted'>{_e(m.role)}</span></td>"
            f"<td class='num'>{s['passed']}/{s['tests']} = {_pct(s['pass_rate'])} "
            f"<span class='muted'>({_pct(lo)}–{_pct(hi)})</span></td>"
            f"<td class='num'>{s['loops']['k']}</td><td class='num'>{s['substantive']['k']}</td>"
            f"<td class='num'>{s['refusal']['k']}</td><td class='num'>{s['over_refusal']['k']}/"
            f"{s['over_refusal']['n']}</td><td class='num'>{_sec(lat['total_p50_s'])} / "
            f"{_sec(lat['total_p95_s'])}</td><td class='num'>{_num(lat['tokens_per_s_p50'])}</td>"
            f"<td class='num'>{s['ungraded_checks']}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _num(x) -> str:
    return "–" if x is None else f"{x:,.1f}"


def _comparisons(res: EvalResults) -> str:
    items = res.comparisons()
    if not items:
        return ""
    rows = "".join(
        f"<tr><td>{_e(c['reference'])} → {_e(c['model'])}</td><td class='num'>{len(c['improved'])}</td>"
        f"<td class='num'>{len(c['regressed'])}</td><td class='num'>{c['both_pass']}</td>"
        f"<td class='num'>{c['both_fail']}</td><td class='num'>{_signed(c['delta_pass_rate'])}</td>"
        f"<td class='num'>{c['mcnemar_p']:.3f}</td></tr>"
        for c in items
    )
    return (
        "<h2>Paired change</h2><table><tr><th>models</th><th>improved</th><th>regressed</th>"
        "<th>both pass</th>"
        "<th>both fail</th><th>Δ pass rate</th><th>exact McNemar p</th></tr>" + rows + "</table>"
    )


def _signed(x) -> str:
    return "–" if x is None else f"{100 * x:+.0f} pts"


def _cell(sample) -> str:
    if sample is None:
        return "<td class='muted'>–</td>"
    mark = "<span class='pass'>✓</span>" if sample.passed else "<span class='fail'>✗</span>"
    badges = ""
    if sample.looped:
        badges += f"<span class='badge loop'>loop: {_e(sample.loop['rule'])}</span>"
    if sample.refused:
        badges += "<span class='badge ref'>refused</span>"
    if sample.ungraded:
        badges += f"<span class='badge'>{sample.ungraded} ungraded</span>"
    return f"<td>{mark} {sample.score:.2f}{badges}</td>"


def _detail(res: EvalResults, test, colspan: int) -> str:
    parts = []
    for m in res.model_names:
        s = res.sample(m, test.id)
        if s is None:
            continue
        checks = "".join(
            f"<li>{'✓' if c.passed else ('?' if c.passed is None else '✗')} {_e(c.kind)} "
            f"<span class='muted'>(weight {c.weight:g}) {_e(c.detail)}</span></li>"
            for c in s.checks
        )
        parts.append(
            f"<div><b>{_e(m)}</b> <span class='muted'>{s.new_tokens} tokens, {_sec(s.total_s)}, "
            f"finish {_e(s.finish_reason)}</span><pre>{_e(s.output) or '(empty)'}</pre>"
            f"<ul class='checks'>{checks}</ul></div>"
        )
    prompt = res.samples_of(res.model_names[0])
    first = next((s for s in prompt if s.test_id == test.id), None)
    shown = f"<div class='muted'>prompt (rendered)</div><pre>{_e(first.prompt)}</pre>" if first else ""
    return f"<td class='detail' colspan='{colspan}'>{shown}{''.join(parts)}</td>"


def _matrix(res: EvalResults) -> str:
    models = res.model_names
    head = "<tr><th>test</th><th>category</th>" + "".join(f"<th>{_e(m)}</th>" for m in models) + "</tr>"
    rows = []
    for i, t in enumerate(res.tests):
        samples = [res.sample(m, t.id) for m in models]
        verdicts = {s.passed for s in samples if s is not None}
        diff = "1" if len(verdicts) > 1 else "0"
        rows.append(
            f"<tr class='test' data-diff='{diff}' data-detail='d{i}' data-test='{_e(t.id)}'>"
            f"<td>{_e(t.id)}</td><td>{_e(t.category)}</td>{''.join(_cell(s) for s in samples)}</tr>"
            f"<tr id='d{i}' class='detail' hidden>{_detail(res, t, len(models) + 2)}</tr>"
        )
    return (
        "<div class='controls'><label><input type='checkbox' id='diff-only'> differences only</label> "
        f"<span class='muted'>(<span id='shown'>{len(res.tests)}</span> of {len(res.tests)} tests shown; "
        "click a row for the answers)</span></div>"
        f"<table id='matrix'>{head}{''.join(rows)}</table>"
    )


def render_html(res: EvalResults) -> str:
    """The report as one HTML string."""
    summary = res.summary()
    models = res.model_names
    categories = list(dict.fromkeys(t.category for t in res.tests))
    rates = {m: summary[m]["by_category"] for m in models}
    seconds = {m: [s.total_s for s in res.samples_of(m)] for m in models}
    info = "".join(
        f"<li><b>{_e(m.name)}</b> ({_e(m.role)}): {_e(m.base)}"
        f"{' + adapter ' + _e(m.adapter) if m.adapter else ''} "
        f"<span class='muted'>{_e(json.dumps(m.info, ensure_ascii=False))}</span></li>"
        for m in res.models
    )
    b = res.battery
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>kindred eval: {_e(b.get('name', ''))}</title><style>{STYLE}</style></head><body>"
        f"<h1>kindred eval · {_e(b.get('name', ''))}</h1>"
        f"<div class='muted'>{len(res.tests)} tests in {len(categories)} categories · "
        f"{_e(b.get('path', ''))} · "
        f"sha256 {_e(str(b.get('sha256', ''))[:12])} · {_e(res.created)}</div><ul>{info}</ul>"
        f"<h2>Summary</h2>{_summary_table(res, summary)}{_comparisons(res)}"
        "<h2>Plots</h2><div class='plots'>"
        f"<figure><figcaption>pass rate by category (95 % interval)</figcaption>"
        f"{bars_svg(categories, models, rates)}</figure>"
        f"<figure><figcaption>seconds per test (thick: median, thin: p95)</figcaption>"
        f"{latency_svg(models, seconds)}</figure></div>"
        f"<h2>Tests × models</h2>{_matrix(res)}"
        f"<script>{SCRIPT}</script></body></html>\n"
    )
