"""`kindred plan`: which models fit a GPU; memory, time, cost and serving numbers; weighted comparison."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import KindredValueError
from .catalogue import default_catalogue
from .gpus import custom_gpu, get_gpu
from .memory import FORMATS, METHODS, inference_memory
from .money import context_costs, load_prices
from .report import (
    breakdown_table,
    checklist_table,
    plot_breakdown,
    render_table,
    serving_tables,
    summary_table,
)
from .score import CRITERIA, PlanSettings, plan, rubric_check
from .support import LICENSES, license_ok
from .timing import load_calibration, train_tokens_per_s
from .training import OPTIMIZERS, POLICIES, trainer_memory


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="which models fit a GPU; memory, time, cost, serving, weighted comparison",
        description="Estimate kindred's training memory and time, inference and serving memory, cost and "
        "decode speed of catalogue models on a GPU, rank them by weighted criteria and evaluate the "
        "decision checklist.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpu", help="GPU name, e.g. rtx-4090, l40s, h100-sxm, 'NVIDIA H100 80GB HBM3'")
    where.add_argument("--vram", type=float, metavar="GB", help="GPU memory only (no time estimates)")
    p.add_argument("--method", choices=METHODS, default="qlora", help="training method (default qlora)")
    p.add_argument("--seq", type=int, default=2048, help="training sequence length in tokens (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--policy", choices=list(POLICIES), default="full", help="recomputation (default full)")
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adamw", help="the trainer's optimizer (default adamw)"
    )
    p.add_argument(
        "--unfused-loss", action="store_true", help="add an unfused loss's logits (not kindred's trainer)"
    )
    p.add_argument("--format", default="Q4_K_M", help=f"inference weight format: {', '.join(FORMATS)}")
    p.add_argument("--context", type=int, help="inference context in tokens (default: --seq)")
    p.add_argument("--util", type=float, default=0.9, help="vLLM gpu_memory_utilization (default 0.9)")
    p.add_argument(
        "--model",
        action="append",
        metavar="ID|config.json",
        help="plan only this model (repeatable) and show its full breakdown",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="config.json",
        help="add a model from its Hugging Face config.json to the candidates",
    )
    p.add_argument("--license", choices=LICENSES, default="any", help="keep only these licenses")
    p.add_argument("--data", help="chat JSONL to count tokens of (with --tokenizer and --template)")
    p.add_argument("--tokenizer", help="tokenizer for --data")
    p.add_argument("--template", help="chat template family for --data")
    p.add_argument("--tokens-p95", type=int, metavar="N", help="95th-percentile example length in tokens")
    p.add_argument("--dataset-tokens", type=int, metavar="N", help="total trained tokens of the dataset")
    p.add_argument(
        "--epochs", type=float, default=1.0, help="epochs for the training-time estimate (default 1)"
    )
    p.add_argument(
        "--weights",
        default="",
        metavar="K=W,...",
        help=f"criterion weights, e.g. capability=3,context=2 (criteria: {', '.join(CRITERIA)})",
    )
    p.add_argument(
        "--pass-rate",
        action="append",
        default=[],
        metavar="MODEL=RATE",
        help="your rubric pass rate (0-1) of a model, used as its base capability",
    )
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="[MODEL=]results.json",
        help="a kindred eval results.json: its base model's pass rate is that model's capability",
    )
    p.add_argument(
        "--price", action="append", default=[], metavar="GPU=USD", help="your hourly rate of a GPU"
    )
    p.add_argument("--prices", metavar="FILE", help="a prices JSON file (prices.json's format)")
    p.add_argument(
        "--results",
        metavar="DIR",
        help="calibrate on these benchmark CSVs instead of the packaged calibration.json",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of the memory breakdown")
    p.set_defaults(func=run)
    return p


def _pairs(text: str, what: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise KindredValueError(f"{what}: expected NAME=NUMBER, got {item!r}")
    return out


def _token_report(args):
    """kindred.data's token report for --data (None without --data)."""
    if not args.data:
        return None
    from ..data import token_report

    return token_report(args.data, tokenizer=args.tokenizer, template=args.template)


def _cost_lines(spec, gpu, settings, price, report, cal) -> str:
    """Seed 004's cost-by-context table in hours and dollars for the user's data."""

    def tps_at(ctx: int):
        if ctx > spec.context:
            return None
        s = settings
        return train_tokens_per_s(
            spec, gpu, s.method, ctx, 1, s.rank, s.policy, calibration=cal, trained_share=s.trained_share
        )

    rows = context_costs(report.lengths, tps_at, price.usd_per_hour if price else 0.0, epochs=settings.epochs)
    table = [
        [
            f"{r['context']:,}",
            f"{r['relative_cost']:g}×",
            r["examples_fit"],
            r["packed_rows"],
            r["hours"],
            None if price is None or r["usd"] is None else f"${r['usd']:,.2f}",
        ]
        for r in rows
    ]
    head = ["context", "relative", "examples fit", "packed rows", "hours", "cost"]
    return render_table(table, head, f"{spec.name}: cost by context for your data on {gpu.name}")


def eval_pass_rates(items: list[str], catalogue) -> dict[str, tuple[float, str]]:
    """{catalogue id: (pass rate, how it was measured)} of the base model in each ``[MODEL=]results.json``
    written by ``kindred eval`` (the model id from MODEL= or the run's ``--plan-id``)."""
    out = {}
    for item in items:
        model, sep, path = item.partition("=")
        if not sep or not model or "/" in model:
            model, path = None, item
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KindredValueError(f"--eval: {path}: not a readable results.json ({e})") from None
        if not isinstance(data, dict) or data.get("schema") != "kindred.eval.results":
            raise KindredValueError(f"--eval: {path}: not a kindred eval results.json (schema)")
        base = next((m for m in data.get("models", []) if m.get("role") in ("base", "model")), None)
        if base is None:
            raise KindredValueError(f"--eval: {path}: has no base model (it was run with --no-base)")
        model = model or base.get("plan_id")
        if not model:
            raise KindredValueError(f"--eval: {path}: which catalogue model is it? write --eval MODEL={path}")
        s = data["summary"][base["name"]]
        battery = data.get("battery", {}).get("name", "?")
        out[catalogue.get(model).id] = (s["pass_rate"], f"{s['passed']}/{s['tests']} on {battery} ({path})")
    return out


def run(args: argparse.Namespace) -> int:
    """Run `kindred plan` on parsed arguments; prints tables or JSON and returns the exit code."""
    catalogue = default_catalogue()
    report = _token_report(args)
    for path in args.config:
        catalogue.add_config(path)
    specs = []
    for name in args.model or []:
        is_config = name.endswith(".json") and Path(name).is_file()
        specs.append(catalogue.add_config(name) if is_config else catalogue.get(name))
    explicit = bool(specs)
    specs = specs or list(catalogue)
    gpu = custom_gpu(args.vram) if args.vram is not None else get_gpu(args.gpu)
    weights = dict.fromkeys(CRITERIA, 1.0)
    weights.update(_pairs(args.weights, "--weights"))
    rates = {catalogue.get(k).id: v for k, v in _pairs(",".join(args.pass_rate), "--pass-rate").items()}
    evaluated = eval_pass_rates(args.eval, catalogue)
    rates.update({k: rate for k, (rate, _) in evaluated.items()})
    prices = load_prices(args.prices, _pairs(",".join(args.price), "--price"))
    cal = load_calibration(args.results, catalogue.get) if args.results else load_calibration()
    settings = PlanSettings(
        method=args.method,
        seq=args.seq,
        batch=args.batch,
        rank=args.rank,
        policy=args.policy,
        fused_loss=not args.unfused_loss,
        optimizer=args.optimizer,
        infer_format=args.format,
        infer_context=args.context,
        epochs=args.epochs,
        tokens_p95=report.p95 if report else args.tokens_p95,
        dataset_tokens=report.total if report else args.dataset_tokens,
        trained_share=report.trainable_share if report else 1.0,
        weights=weights,
        pass_rates=rates,
        license=args.license,
        calibration=cal,
        prices=prices,
    )
    if explicit:  # a model asked for by name: impossible settings are errors, not table notes
        for spec in specs:
            trainer_memory(
                spec,
                settings.method,
                settings.seq,
                settings.batch,
                settings.rank,
                settings.policy,
                optimizer=settings.optimizer,
            )
            inference_memory(spec, settings.infer_format, settings.infer_context or settings.seq)
    records = plan(specs, gpu, settings, catalogue.get)
    if args.plot:
        bars = {}
        for r in records:
            bars[f"{r['model']} train"] = r["breakdown"]["training"]
            if explicit:
                bars[f"{r['model']} infer"] = r["breakdown"]["inference"]
        plot_breakdown(
            bars, args.plot, f"{settings.method} seq {settings.seq}×{settings.batch} on {gpu.name}"
        )
    if args.json:
        out = {k: v for k, v in vars(settings).items() if k not in ("calibration", "prices")}
        out["price"] = prices[gpu.id].to_dict() if gpu.id in prices else None
        print(json.dumps({"gpu": gpu.to_dict(), "settings": out, "models": records}, indent=1, default=str))
        return 0
    title = (
        f"{settings.method} · seq {settings.seq} × batch {settings.batch} · r={settings.rank} · "
        f"recompute {settings.policy} · {gpu.name} ({gpu.memory_gb:g} GB) · inference {settings.infer_format}"
    )
    print(summary_table(records, title))
    dropped = [spec.id for spec in specs if not license_ok(spec, settings.license)]
    if dropped:
        print(f"left out by --license {settings.license}: {', '.join(dropped)}")
    fit = cal.get("trainers", {}).get("kindred")
    if fit:
        print(
            f"time model: kindred's own {fit['rows']} measured steps ({', '.join(fit['models'])}; commits "
            f"{', '.join(fit['commits'])}), largest fit error {fit['max_abs_error']:.0%}"
        )
    if not cal.get("memory", {}).get("kindred"):
        print(
            "memory: tensors only; allocator slack and CUDA context not measured (benchmarks/bench_plan.py)"
        )
    price = prices.get(gpu.id)
    if price:
        print(f"price: ${price.usd_per_hour:g}/h, {price.provider}: {price.offer} ({price.date})")
    else:
        print(f"price: none known for {gpu.name} (--price GPU=USD)")
    for model_id, (rate, how) in evaluated.items():
        print(f"rubric: {model_id} passed {how}: {rubric_check(rate)['detail']}")
    for r in records if explicit else []:
        spec = catalogue.get(r["model"])
        for kind in ("training", "host", "inference"):
            if r["breakdown"][kind]:
                print(breakdown_table(r["breakdown"][kind], f"{r['name']}: {kind} memory"))
        if r["format_refused"]:
            print(f"{settings.infer_format} refused: {r['format_refused']}")
        for name, a in r["anchors"].items():
            hours = f", {a['hours']:.2f} h" if a["hours"] else ""
            print(
                f"what {name} would take (calibrated on {a['rows']} of its measured steps): "
                f"{a['tokens_per_s']:,.0f} tokens/s{hours}"
            )
        print(serving_tables(spec, gpu, settings.infer_context or settings.seq, args.util, price))
        if report is not None:
            print(_cost_lines(spec, gpu, settings, price, report, cal))
        print(checklist_table(r["checklist"], f"{r['name']}: decision checklist"))
        print(
            "scores: "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in r["scores"].items())
            + f" -> {r['score']:.2f} (capability: {r['capability_source']})"
        )
    return 0
