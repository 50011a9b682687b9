"""`kindred eval`: run a battery (`kindred eval BATTERY --model ...`), compare blind (`kindred eval
compare`), re-render or merge reports (`kindred eval report`), check a battery (`kindred eval validate`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import KindredValueError

SUBCOMMANDS = ("run", "compare", "report", "validate")


def with_default_subcommand(argv: list[str]) -> list[str]:
    """``kindred eval BATTERY ...`` means ``kindred eval run BATTERY ...``."""
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] not in (*SUBCOMMANDS, "-h", "--help"):
        return ["eval", "run", *argv[1:]]
    return argv


def _named(items: list[str], what: str) -> dict[str, str]:
    """NAME=PATH pairs (a bare PATH is named "tuned", then "tuned2", ...)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = ("tuned" if "tuned" not in out else f"tuned{len(out) + 1}"), item
        if not name or not path or name in out:
            raise KindredValueError(f"{what}: expected NAME=PATH with distinct names, got {item!r}")
        out[name] = path
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate base and tuned models on a battery; blind comparison; reports",
        description="kindred eval BATTERY --model M [--adapter DIR]: run a battery (the shipped one: "
        "ethics16). Subcommands: run (the default), compare, report, validate.",
    )
    sub = p.add_subparsers(dest="eval_command", required=True)
    r = sub.add_parser("run", help="run a battery on a base model and its adapters")
    r.add_argument("battery", help="a battery file (.yaml / .jsonl) or a shipped one: ethics16")
    r.add_argument(
        "--model", required=True, help="HF folder, .gguf, exported folder, adapter folder, or smollm2"
    )
    r.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a PEFT adapter on the base (repeatable)",
    )
    r.add_argument("--no-base", action="store_true", help="evaluate only the adapters, not the base")
    r.add_argument("--name", default="base", help="display name of the base model (default base)")
    r.add_argument(
        "--quant",
        default="auto",
        help="auto | nf4 | int4g | none (auto: nf4 on CUDA; dense on the CPU up to 4 GiB of weights)",
    )
    r.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda")
    r.add_argument(
        "--template", help="chat template (default: the adapter's training config or the tokenizer)"
    )
    r.add_argument("--tokenizer", help="tokenizer file or folder (default: the model's)")
    r.add_argument("--judge", help="judge model for rubric checks (default: the battery's judge:)")
    r.add_argument("--max-new-tokens", type=int, help="override every test's max_new_tokens")
    r.add_argument("--batch-size", type=int, help="prompts per generation batch (default: all)")
    r.add_argument("--no-loop-stop", action="store_true", help="let looping answers run to max_new_tokens")
    r.add_argument("--plan-id", help="the kindred plan catalogue id of the base (for kindred plan --eval)")
    r.add_argument("--out", default="kindred-eval", help="output folder (default ./kindred-eval)")
    r.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    r.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    c = sub.add_parser("compare", help="blind pairwise comparison of the models in results.json")
    c.add_argument("results", nargs="+", help="results.json file(s) of one battery (merged)")
    c.add_argument("--models", help="comma-separated model names (default: all)")
    c.add_argument("--judge", help="a judge model grades each pair in both orders (default: you, here)")
    c.add_argument("--quant", default="auto", help="the judge's quantization (default auto)")
    c.add_argument("--device", default="auto")
    c.add_argument("--seed", type=int, default=0, help="seed of the pair order (default 0)")
    c.add_argument(
        "--out", help="where to write the record (default: compare.json next to the first results)"
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing record")
    g = sub.add_parser("report", help="write the report files again from results.json (merging several)")
    g.add_argument("results", nargs="+", help="results.json file(s) of one battery")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true")
    v = sub.add_parser("validate", help="check a battery (and, with --model, that every prompt fits)")
    v.add_argument("battery")
    v.add_argument("--model", help="a model whose template and context to check against")
    v.add_argument("--template")
    v.add_argument("--max-new-tokens", type=int)
    p.set_defaults(func=run)
    return p


def _free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise KindredValueError(f"{path} exists; pass --overwrite to replace it (or choose another --out)")


def _load(paths: list[str]):
    from .results import EvalResults, merge

    runs = [EvalResults.load(p) for p in paths]
    return runs[0] if len(runs) == 1 else merge(runs)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    cmd = args.eval_command
    if cmd == "run":
        from .run import evaluate
        from .table import print_results

        out = Path(args.out)
        _free(out / "results.json", args.overwrite)
        res = evaluate(
            args.battery,
            args.model,
            _named(args.adapter, "--adapter"),
            include_base=not args.no_base,
            base_name=args.name,
            quant=args.quant,
            dtype=args.dtype,
            device=args.device,
            template=args.template,
            tokenizer=args.tokenizer,
            judge=args.judge,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            loop_stop=not args.no_loop_stop,
            plan_id=args.plan_id,
            progress=None if args.json else (lambda m: console.print(f"[dim]{m}[/]")),
        )
        paths = res.write(out)
        if args.json:
            print(json.dumps({"summary": res.summary(), "comparisons": res.comparisons()}, indent=1))
        else:
            print_results(res, console)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    if cmd == "compare":
        from .compare import compare, print_tally
        from .judge import load_judge

        res = _load(args.results)
        out = Path(args.out) if args.out else Path(args.results[0]).parent / "compare.json"
        _free(out, args.overwrite)
        models = [m.strip() for m in args.models.split(",")] if args.models else None
        judge = load_judge(args.judge, quant=args.quant, device=args.device) if args.judge else None
        record = compare(res, models=models, judge=judge, seed=args.seed, console=console)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print_tally(record, console)
        print(f"wrote {out}")
        return 0
    if cmd == "report":
        from .table import print_results

        res = _load(args.results)
        out = Path(args.out)
        _free(out / "results.json", args.overwrite)
        paths = res.write(out)
        print_results(res, console)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    from .battery import load_battery

    battery = load_battery(args.battery)
    fits = ""
    if args.model:
        from .models import resolve
        from .run import prepare_prompts

        plan = resolve(args.model, template=args.template)
        prompts = prepare_prompts(battery, plan, args.max_new_tokens)
        fits = f"; every prompt fits {plan.name}'s context ({max(len(i) for _, i in prompts)} tokens at most)"
    print(
        f"{battery.path}: {len(battery)} tests in {len(battery.categories)} categories "
        f"({', '.join(battery.categories)}){fits}"
    )
    return 0
