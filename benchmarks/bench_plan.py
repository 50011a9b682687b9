"""Planning benchmark (issue 23): kindred's trainer over a grid, the plan's predictions against measurement.

Grid: Qwen3-8B and Qwen3-4B (random weights of the real shapes built from the catalogue, NF4, LoRA r = 16,
α = 16 on the seven projections, 25 % of labels −100; bench_e2e's trainer and timing) × sequence 2048
(4 rows per step), 8192 and 16384 (1 row) × recomputation full / none: 12 cells, each 1 warm-up and
``KINDRED_PLAN_STEPS`` (default 2) timed steps. One process per model (``--worker``): the model is rebuilt
for every cell; what a process keeps between cells (the shared dequantization scratch of the model's largest
layer, cuBLAS workspaces) a fresh process would also hold after its first step. Per cell: the allocated
peak over the timed steps (max_memory_allocated after a reset), the reserved peak, device memory in use
at the end (mem_get_info), torch's own allocations before the model exists (after one GEMM: cuBLAS
workspaces), tokens/s. An out-of-memory cell, or a worker that dies, is recorded in the row, not fatal.

Each row of benchmarks/results/plan.csv carries the plan's predictions of that moment in its notes
(predicted_mib, predicted_tok_s); then calibration.json (python/kindred/plan/), plan_grid.md and
plan_grid.png (benchmarks/results/) are regenerated from all result CSVs, the table with the predictions of
the regenerated calibration and, for tokens/s, the error of a fit that left the cell out.

Run (H200, ≈ 4 minutes): python -m pytest benchmarks/bench_plan.py -m benchmark -s
Table, plot and calibration from the CSVs (CPU): python -m benchmarks.bench_plan --report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kindred.errors import KindredValueError
from kindred.plan import default_catalogue, get_gpu, train_tokens_per_s, trainer_memory
from kindred.plan.calibrate import fit_trainer, load_train_rows, predicted_tokens_per_s, write_calibration
from kindred.plan.timing import CALIBRATION, load_calibration

from . import harness
from .bench_e2e import IGNORED, RANK, _free, kindred_step, kindred_trainer, measure
from .harness import fmt
from .shapes import HF_CONFIGS

RUNS_ON_CPU = True  # the tiny-model check and the report below; the grid itself is marked gpu
MODELS = ("qwen3-8b", "qwen3-4b")
CELLS = [
    (seq, batch, policy) for seq, batch in ((2048, 4), (8192, 1), (16384, 1)) for policy in ("full", "none")
]
WORKER_TIMEOUT_S = 420
_MiB = 1 << 20


def hf_config(model_id: str) -> dict:
    """A config.json for ``model_id`` with the catalogue's architecture numbers over its family's template."""
    spec = default_catalogue().get(model_id)
    template = next(c for c in HF_CONFIGS.values() if c["model_type"] == spec.model_type)
    return {
        **template,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": spec.tied_embeddings,
    }


def shape(model_id: str, seq: int, batch: int, policy: str) -> str:
    fields = f"model={model_id},method=qlora,seq={seq},batch={batch},r={RANK},policy={policy}"
    return f"{fields},trained={1 - IGNORED:g}"


def run_cells(hf: dict, cells, device: torch.device, warmup: int, steps: int):
    """Measure each (seq, batch, policy) cell with a freshly built model; yields one dict per cell."""
    if device.type == "cuda":
        a = torch.ones(64, 64, dtype=torch.bfloat16, device=device)
        (a @ a).sum().item()  # cuBLAS and its workspaces exist from here on, as in any training process
        del a
        runtime = torch.cuda.memory_allocated(device) / _MiB
    else:
        runtime = None
    for seq, batch, policy in cells:
        out = {"seq": seq, "batch": batch, "policy": policy, "runtime_mib": runtime}
        with tempfile.TemporaryDirectory() as folder:
            trainer = None
            try:
                trainer = kindred_trainer(hf, seq, batch, policy, device, folder)
                if device.type == "cuda":
                    out["live_mib"] = torch.cuda.memory_allocated(device) / _MiB
                m = measure(kindred_step(trainer), device, warmup, steps)
                out.update(m)
                if device.type == "cuda":
                    out["reserved_mib"] = torch.cuda.max_memory_reserved(device) / _MiB
                    free, total = torch.cuda.mem_get_info(device)
                    out["device_mib"] = (total - free) / _MiB
            except torch.OutOfMemoryError as e:
                out["error"] = f"out of memory: {str(e)[:160]}"
            except Exception as e:  # recorded in the row; the other cells still run
                out["error"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            del trainer
            _free(device)
        yield out


def _worker(model_id: str, cells: list, steps: int) -> None:
    torch.manual_seed(0)
    for out in run_cells(hf_config(model_id), cells, torch.device("cuda"), 1, steps):
        print("CELL " + json.dumps(out), flush=True)


def predictions(
    model_id: str, seq: int, batch: int, policy: str, gpu_name: str, cal: dict, method: str = "qlora"
) -> dict:
    """The plan's allocated peak (MiB) and tokens/s for one cell, from calibration ``cal``."""
    spec = default_catalogue().get(model_id)
    measured = cal.get("memory", {}).get("kindred")
    mem = trainer_memory(spec, method, seq, batch, RANK, policy, measured=measured)
    try:
        gpu = get_gpu(gpu_name)
    except KindredValueError:  # a GPU the table does not know: memory only
        gpu = None
    tps = None
    if gpu is not None:
        tps = train_tokens_per_s(
            spec, gpu, method, seq, batch, RANK, policy, calibration=cal, trained_share=1 - IGNORED
        )
    return {"predicted_mib": mem.info["allocated_bytes"] / _MiB, "predicted_tok_s": tps}


def cell_row(model_id: str, cell: dict, gpu_name: str, cal: dict) -> dict:
    """The plan.csv row of one measured (or failed) cell."""
    pred = predictions(model_id, cell["seq"], cell["batch"], cell["policy"], gpu_name, cal)
    row = {"op": "train_step", "impl": "kindred", "dtype": "bf16"}
    row["shape"] = shape(model_id, cell["seq"], cell["batch"], cell["policy"])
    notes = [cell["error"]] if cell.get("error") else []
    for key in ("runtime_mib", "live_mib", "reserved_mib", "device_mib", "predicted_mib"):
        if (cell | pred).get(key) is not None:
            notes.append(f"{key}={(cell | pred)[key]:.0f}")
    if pred["predicted_tok_s"]:
        notes.append(f"predicted_tok_s={pred['predicted_tok_s']:.0f}")
    if cell.get("loss") is not None:
        notes.append(f"loss={cell['loss']:.4f}")
    if cell.get("ms"):
        row.update(
            ms=fmt(cell["ms"]),
            tokens_per_s=fmt(cell["tokens_per_s"], 5),
            peak_extra_mib=fmt(cell["peak_mib"], 6),
        )
    row["notes"] = "; ".join(notes)
    return row


def run_grid(steps: int) -> list[dict]:
    """Every model's cells in its own worker process; rows for plan.csv (failed workers' cells included)."""
    root = Path(__file__).resolve().parents[1]
    gpu_name = torch.cuda.get_device_name(0)
    cal = load_calibration()
    rows = []
    for model_id in MODELS:
        cmd = [sys.executable, "-m", "benchmarks.bench_plan", "--worker", model_id, "--steps", str(steps)]
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
            lines, tail = proc.stdout.splitlines(), (proc.stderr or "")[-300:]
        except subprocess.TimeoutExpired as e:
            lines = (e.stdout or b"").decode(errors="replace").splitlines() if e.stdout else []
            tail = f"worker timed out after {WORKER_TIMEOUT_S} s"
        done = [json.loads(line[5:]) for line in lines if line.startswith("CELL ")]
        for seq, batch, policy in CELLS[len(done) :]:
            done.append({"seq": seq, "batch": batch, "policy": policy, "error": f"worker died: {tail!r}"})
        for cell in done:
            row = cell_row(model_id, cell, gpu_name, cal)
            rows.append(row)
            tps, peak = row.get("tokens_per_s", ""), row.get("peak_extra_mib", "")
            print(f"{row['shape']:80s} {tps:>7s} tok/s {peak:>7s} MiB  {row['notes']}", flush=True)
    return rows


# ---- the report: calibration.json, plan_grid.md and plan_grid.png from the CSVs --------------------------
def _key(run: dict) -> tuple:
    return tuple(run[k] for k in ("impl", "model", "method", "seq", "batch", "rank", "policy", "gpu"))


def _order(run: dict) -> tuple:
    return (run["model"], run["seq"], run["batch"], run["policy"])


def report(results: Path = harness.RESULTS, calibration: Path = CALIBRATION) -> list[dict]:
    """Regenerate calibration.json, then plan_grid.md / .png from the grid's rows; returns the table rows."""
    write_calibration(results, calibration)
    cal = json.loads(calibration.read_text())
    kindred = sorted((r for r in load_train_rows(results) if r["impl"] == "kindred"), key=_order)
    table, others = [], []
    for run in kindred:
        pred = predictions(
            run["model"], run["seq"], run["batch"], run["policy"], run["gpu"], cal, run["method"]
        )
        row = {**run, **pred}
        rest = [r for r in kindred if _key(r) != _key(run) and r.get("tokens_per_s")]
        if run.get("tokens_per_s") and rest:
            row["held_out_tok_s"] = predicted_tokens_per_s(run, fit_trainer(rest))
        (table if run["source"] == "plan.csv" else others).append(row)
    _write_markdown(table, others, cal, results / "plan_grid.md")
    try:
        _write_plot(table, results / "plan_grid.png")
    except ImportError:  # a GPU machine without matplotlib: the table and the CSV are written all the same
        print("plan_grid.png not written: matplotlib is not installed")
    return table


def _pct(pred, meas) -> str:
    return "" if not pred or not meas else f"{pred / meas - 1:+.1%}"


def _gib(mib) -> str:
    return f"{mib / 1024:.2f}" if mib else "-"


def _rate(tps) -> str:
    return f"{tps:,.0f}" if tps else "-"


def _line(r: dict) -> str:
    meas, tps = r.get("peak_mib"), r.get("tokens_per_s")
    cells = [
        r["model"],
        f"{r['seq']} × {r['batch']}",
        r["policy"],
        _gib(meas) if meas else "OOM / failed",
        _gib(r["predicted_mib"]),
        _pct(r["predicted_mib"], meas),
        _gib(r.get("reserved_mib")),
        _gib(r.get("device_mib")),
        _rate(tps),
        _rate(r["predicted_tok_s"]),
        _pct(r["predicted_tok_s"], tps),
        _pct(r.get("held_out_tok_s"), tps),
    ]
    return "| " + " | ".join(cells) + " |"


def _write_markdown(table: list[dict], others: list[dict], cal: dict, path: Path) -> None:
    fit = cal["trainers"].get("kindred", {})
    mem = cal["memory"].get("kindred")
    commits = ", ".join(sorted({r["commit"] for r in table})) or "none yet: run the benchmark on a GPU"
    lines = [
        "# Planning grid: kindred's trainer, predicted vs measured",
        "",
        "Generated from the result CSVs by `python -m benchmarks.bench_plan --report`.",
        "",
        f"Measured rows: benchmarks/results/plan.csv (commits {commits}). Memory: the plan's allocated peak "
        "(python/kindred/plan/training.py) against `max_memory_allocated`; "
        "tokens/s: the time model (timing.py) with the regenerated calibration.json, and fitted without the "
        "cell (held out).",
        f"Time model for kindred: {fit.get('rows', 0)} measured steps, terms "
        f"{', '.join(fit.get('terms', []))}, "
        "coefficients " + ", ".join(f"{k} {v:.3f}" for k, v in fit.get("coef", {}).items()) + ".",
        "Allocator slack and context: "
        + (
            f"reserved ≤ {mem['reserved_over_allocated']:.3f} × allocated, "
            f"{mem['context_bytes'] / (1 << 30):.2f} GiB outside torch, "
            f"torch runtime {mem['runtime_allocated_bytes'] / _MiB:.0f} MiB ({mem['rows']} cells)."
            if mem
            else "not measured."
        ),
        "",
    ]
    head = [
        "| model | seq × batch | policy | measured GiB | predicted GiB | error | reserved GiB | device GiB "
        "| measured tok/s | predicted tok/s | error | held out |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += head + [_line(r) for r in table]
    if others:
        lines += [
            "",
            "Other measured steps of kindred's trainer (e2e.csv, plan_reference.csv, bench_dist rows):",
            "",
        ]
        lines += head + [_line(r) for r in others]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in table if r.get("peak_mib")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, pred, unit, band in (
        (axes[0], "peak_mib", "predicted_mib", "GiB", 0.10),
        (axes[1], "tokens_per_s", "predicted_tok_s", "tokens/s", 0.20),
    ):
        scale = 1 / 1024 if unit == "GiB" else 1.0
        xs = [r[key] * scale for r in done if r.get(pred)]
        ys = [r[pred] * scale for r in done if r.get(pred)]
        colors = ["tab:blue" if r["policy"] == "full" else "tab:orange" for r in done if r.get(pred)]
        top = max(xs + ys + [1.0]) * 1.1
        ax.plot([0, top], [0, top], color="grey", lw=1)
        ax.fill_between([0, top], [0, top * (1 - band)], [0, top * (1 + band)], color="grey", alpha=0.15)
        ax.scatter(xs, ys, c=colors)
        for r, x, y in zip([r for r in done if r.get(pred)], xs, ys, strict=True):
            ax.annotate(f"{r['model'].split('-')[1]} {r['seq']}×{r['batch']}", (x, y), fontsize=7)
        ax.set_xlabel(f"measured {unit}")
        ax.set_ylabel(f"predicted {unit}")
        ax.set_title(f"{unit}: ±{band:.0%} band (blue: recompute full, orange: none)", fontsize=9)
    fig.suptitle("kindred plan vs kindred's trainer (benchmarks/results/plan.csv)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@pytest.mark.benchmark
@pytest.mark.gpu
def test_plan_grid():
    steps = int(os.environ.get("KINDRED_PLAN_STEPS", "2"))
    rows = run_grid(steps)
    path = harness.append("plan", rows)
    table = report()
    print(f"\n{len(rows)} rows appended to {path}; table in {path.parent / 'plan_grid.md'}")
    print((path.parent / "plan_grid.md").read_text())
    assert any(r.get("tokens_per_s") for r in rows), [r["notes"] for r in rows]
    assert len(table) >= len([r for r in rows if r.get("tokens_per_s")])


# ---- the same code path on the CPU -----------------------------------------------------------------------
def _tiny(hf: dict) -> dict:
    small = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    return {**hf, **small, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def test_hf_config_matches_catalogue():
    cfg = hf_config("qwen3-4b")
    spec = default_catalogue().get("qwen3-4b")
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["tie_word_embeddings"]) == (2560, 9728, True)
    assert cfg["model_type"] == spec.model_type == "qwen3" and cfg["rope_theta"] == 1_000_000.0
    assert hf_config("qwen3-8b") == HF_CONFIGS["qwen3-8b"]  # the catalogue and bench_e2e's shapes agree


def test_cells_rows_and_report_on_cpu(tmp_path, monkeypatch):
    """Two cells of a tiny Qwen3 on the CPU through the worker's code, their rows, and the report."""
    tiny = _tiny(HF_CONFIGS["qwen3-8b"])
    cells = list(run_cells(tiny, [(16, 2, "full"), (16, 2, "none")], torch.device("cpu"), 1, 1))
    assert [c["policy"] for c in cells] == ["full", "none"] and all(c["tokens_per_s"] > 0 for c in cells)
    cal = load_calibration()
    rows = [cell_row("qwen3-8b", c, "NVIDIA H200", cal) for c in cells]
    oom = {"seq": 8192, "batch": 1, "policy": "none", "error": "out of memory: x"}
    rows.append(cell_row("qwen3-8b", oom, "NVIDIA H200", cal))
    assert "predicted_mib=" in rows[0]["notes"] and "predicted_tok_s=" in rows[0]["notes"]
    assert rows[2]["notes"].startswith("out of memory") and "tokens_per_s" not in rows[2]
    # the report reads the rows as an H200 run would have written them, measured as predicted
    for r, c in zip(rows[:2], cells, strict=True):
        pred = predictions("qwen3-8b", 16, 2, c["policy"], "NVIDIA H200", cal)
        r.update(tokens_per_s=fmt(pred["predicted_tok_s"], 5), peak_extra_mib=fmt(pred["predicted_mib"], 6))
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    harness.append("plan", rows)
    for name in ("e2e.csv", "plan_reference.csv", "quant.csv"):
        (tmp_path / name).write_bytes((Path(__file__).parent / "results" / name).read_bytes())
    table = report(tmp_path, tmp_path / "calibration.json")
    text = (tmp_path / "plan_grid.md").read_text()
    assert len(table) == 3 and "| qwen3-8b | 16 × 2 | full |" in text and "OOM / failed" in text
    assert (tmp_path / "plan_grid.png").read_bytes()[:4] == b"\x89PNG"
    cal2 = json.loads((tmp_path / "calibration.json").read_text())
    assert cal2["trainers"]["kindred"]["rows"] == cal["trainers"]["kindred"]["rows"] + 2
    assert "Other measured steps" in text and "| gemma-3-12b | 4096 × 1 | full | 10.67 |" in text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_plan")
    p.add_argument("--worker", metavar="MODEL", help="measure MODEL's cells in this process (GPU)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--report", action="store_true", help="regenerate calibration.json, plan_grid.md and .png")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, CELLS, args.steps)
    elif args.report:
        table = report()
        print(f"{len(table)} grid cells; wrote {CALIBRATION} and {harness.RESULTS / 'plan_grid.md'}")
    else:
        p.error("give --worker MODEL or --report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
