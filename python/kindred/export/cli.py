"""``kindred export merged|awq``: a fine-tune written for serving, checked by the quality gate, with a
manifest. Every argument is checked before slow work; the output folder is written atomically and never
replaced without ``--overwrite``.

    kindred export merged RUN/adapter --out merged/            # onto the adapter's 16-bit base
    kindred export awq RUN/adapter --out awq/ [--format awq-gemm] [--max-gpu-memory 16GiB]

(``gguf`` / ``ollama`` have their own parsers: export/gguf_cli.py.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import KindredValueError
from .gguf_cli import add_parsers as add_gguf_parsers

KINDS = ("merged", "awq")


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", text or "")
    if not m:
        raise KindredValueError(f"a size like 16GiB or 5GB is expected, got {text!r}")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(m.group(1)) * unit[m.group(2) or "B"])


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="write a fine-tune for serving: merged safetensors, AWQ W4A16 (vLLM), GGUF (llama.cpp, Ollama)",
        description="kindred export KIND SOURCE --out DIR: merged (the adapter folded onto its 16-bit base) "
        "or awq (W4A16, compressed-tensors or AutoAWQ GEMM), each checked by the quality gate and described "
        "by manifest.json.",
    )
    sub = p.add_subparsers(dest="export_kind", required=True)
    for kind in KINDS:
        q = sub.add_parser(kind, help="merged HF safetensors" if kind == "merged" else "AWQ W4A16 for vLLM")
        q.add_argument(
            "source",
            help="a PEFT adapter folder (its base from adapter_config.json) or, for awq, a model folder",
        )
        q.add_argument("--base", help="the 16-bit base model folder (default: the adapter's base)")
        q.add_argument("--out", required=True, help="output folder (must not exist, unless --overwrite)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        q.add_argument(
            "--template", help="chat template (default: the training run's, else from the tokenizer)"
        )
        q.add_argument("--eval-data", help="chat JSONL for the gate (default: the run's held-out split)")
        q.add_argument("--no-gate", action="store_true", help="skip the quality gate (the manifest says so)")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda")
        q.add_argument("--shard-size", default="5GB", help="max safetensors shard size (default 5GB)")
        q.add_argument(
            "--allow-quantized-base",
            action="store_true",
            help="merge onto dequantized 4-bit weights (a GGUF or bnb base; --onto): costs quality",
        )
        if kind == "merged":
            q.add_argument(
                "--onto", choices=("nf4", "int4g"), help="merge onto the base as kindred quantized it"
            )
        else:
            q.add_argument(
                "--format", default="compressed-tensors", choices=("compressed-tensors", "awq-gemm")
            )
            q.add_argument(
                "--group-size", type=int, default=128, help="INT4 group size: 128 (default), 64, 32"
            )
            q.add_argument(
                "--calibration", help="chat JSONL to calibrate on (default: the run's held-out split)"
            )
            q.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
            q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (512)")
            q.add_argument("--max-gpu-memory", help="GPU memory AWQ may use, e.g. 16GiB (default: no cap)")
            q.add_argument("--rtn", action="store_true", help="round to nearest instead of AWQ (a baseline)")
        q.set_defaults(func=run)
    add_gguf_parsers(sub)  # gguf, gguf-lora, ollama
    return p


def run(args) -> int:
    from .jobs import ExportJob

    job = ExportJob.from_args(args)  # every check that needs no weights
    manifest = job.run(progress=_progress)
    gate = json.loads(manifest.read_text())["gate"]
    print(f"kindred export {args.export_kind}: {job.out}")
    if gate is None:
        print("  gate: skipped (--no-gate)")
        return 0
    print(
        f"  gate: KL {gate['kl']:.4f}, top-1 {gate['top1']:.1%} on {gate['tokens']} held-out tokens; "
        f"smoke generation: {gate['smoke_finish']} after {gate['smoke_tokens']} tokens"
    )
    for w in gate["warnings"]:
        print(f"  warning: {w}", file=sys.stderr)
    return 0 if gate["passed"] else 1


def _progress(layer: int, layers: int, seconds: float) -> None:
    width = 30
    done = width * layer // layers
    end = "\n" if layer == layers else "\r"
    print(
        f"  AWQ [{'#' * done}{'.' * (width - done)}] block {layer}/{layers}  {seconds:.1f} s/block", end=end
    )


def bytes_arg(text: str | None) -> int | None:
    return None if text is None else _bytes(text)


def source_paths(source: str, base: str | None) -> tuple[Path | None, str]:
    """(adapter folder or None, base name/path) of ``kindred export``'s SOURCE and --base."""
    src = Path(source)
    if (src / "adapter_config.json").is_file():
        named = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = base or named
        if not base:
            raise KindredValueError(
                f"{src}/adapter_config.json names no base_model_name_or_path: pass --base MODEL_FOLDER"
            )
        return src, base
    if base is not None:
        raise KindredValueError(f"--base is for an adapter SOURCE; {source} is not an adapter folder")
    if source != "smollm2" and not src.exists():
        raise KindredValueError(f"SOURCE {source}: no such adapter or model folder")
    return None, source
