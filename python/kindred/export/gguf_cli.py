"""``kindred export gguf | gguf-lora | ollama``: the llama.cpp and Ollama exports from the command line
(``add_parsers`` adds them to ``kindred export``'s subcommands). Arguments are checked before the model
loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import KindredValueError
from .gguf_types import GGUF_QUANTS, LORA_TYPES


def _common(p, out_help: str) -> None:
    p.add_argument("model", help="a Hugging Face model folder, a .gguf file, or smollm2")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder (kindred train writes one)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--template", help="chat template (default: from the model's family and tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def add_parsers(subparsers) -> None:
    """Add ``gguf``, ``gguf-lora`` and ``ollama`` to an argparse subparsers object (``kindred export``'s)."""
    p = subparsers.add_parser(
        "gguf", help="a llama.cpp GGUF file, LoRA merged, quantized by llama.cpp's rules"
    )
    _common(p, "the .gguf file to write")
    p.add_argument("--quant", default="Q4_K_M", help=f"file type: {', '.join(GGUF_QUANTS)} (default Q4_K_M)")
    p.set_defaults(func=run_gguf)
    p = subparsers.add_parser("gguf-lora", help="the LoRA adapter as a GGUF LoRA file for llama.cpp --lora")
    _common(p, "the adapter .gguf file to write")
    p.add_argument("--dtype", default="F16", help=f"tensor type: {', '.join(LORA_TYPES)} (default F16)")
    p.add_argument("--base-out", help="also write the base model (no adapter) as a GGUF file here")
    p.add_argument("--quant", default="Q8_0", help="file type of --base-out (default Q8_0)")
    p.set_defaults(func=run_gguf_lora)
    p = subparsers.add_parser("ollama", help="a GGUF file and its Ollama Modelfile in a folder")
    _common(p, "the folder to write model.gguf and Modelfile into")
    p.add_argument("--quant", default="Q4_K_M", help=f"file type: {', '.join(GGUF_QUANTS)} (default Q4_K_M)")
    p.add_argument("--num-ctx", type=int, default=4096, help="context length Ollama allocates (default 4096)")
    p.add_argument("--system", help="a default system prompt (SYSTEM)")
    p.set_defaults(func=run_ollama)


def _check_inputs(args) -> None:
    if args.model != "smollm2" and not Path(args.model).exists():
        raise KindredValueError(f"MODEL {args.model!r}: no such folder or file")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise KindredValueError(f"--adapter {args.adapter}: no adapter_config.json in this folder")


def _load(args):
    from ..generate.cli import load

    ns = argparse.Namespace(
        model=args.model,
        adapter=args.adapter,
        merge=False,
        quant="none",
        device="cpu",
        template=args.template,
    )
    return load(ns)


def _tokenizer_source(args):
    from ..models import smollm2_gguf_path

    return smollm2_gguf_path() if args.model == "smollm2" else Path(args.model)


def run_gguf(args) -> int:
    from .gguf import check_output, check_quant, export_gguf  # torch: on use, not in the parser

    quant = check_quant(args.quant)
    out = check_output(args.out, args.overwrite)
    _check_inputs(args)
    loaded = _load(args)
    result = export_gguf(
        loaded.model, out, quant, tokenizer=_tokenizer_source(args), overwrite=args.overwrite
    )
    print(f"wrote {result.path} ({quant}, {result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s")
    return 0


def run_gguf_lora(args) -> int:
    from .gguf import check_output, check_quant, export_gguf  # torch: on use, not in the parser
    from .gguf_lora import export_gguf_lora

    if not args.adapter:
        raise KindredValueError("gguf-lora needs --adapter (the PEFT LoRA folder to convert)")
    if args.dtype.upper() not in LORA_TYPES:
        raise KindredValueError(f"--dtype {args.dtype!r}: known: {', '.join(LORA_TYPES)}")
    out = check_output(args.out, args.overwrite)
    base_out = check_output(args.base_out, args.overwrite) if args.base_out else None
    quant = check_quant(args.quant)
    _check_inputs(args)
    loaded = _load(args)
    path = export_gguf_lora(loaded.model, out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {path}")
    if base_out is not None:
        base = export_gguf(
            loaded.model,
            base_out,
            quant,
            tokenizer=_tokenizer_source(args),
            overwrite=args.overwrite,
            merge_adapters=False,
        )
        print(f"wrote {base.path} (base, {quant})")
    return 0


def run_ollama(args) -> int:
    from .gguf import check_quant, export_gguf  # torch: on use, not in the parser
    from .ollama import write_modelfile

    quant = check_quant(args.quant)
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise KindredValueError(f"--out {folder}: exists and is not a folder")
    if not isinstance(args.num_ctx, int) or args.num_ctx < 1:
        raise KindredValueError(f"--num-ctx must be a positive integer, got {args.num_ctx}")
    for name in ("model.gguf", "Modelfile"):
        if (folder / name).exists() and not args.overwrite:
            raise KindredValueError(f"{folder / name}: already exists; pass --overwrite to replace it")
    _check_inputs(args)
    loaded = _load(args)
    folder.mkdir(parents=True, exist_ok=True)
    result = export_gguf(
        loaded.model,
        folder / "model.gguf",
        quant,
        tokenizer=_tokenizer_source(args),
        overwrite=args.overwrite,
    )
    mf = write_modelfile(
        result.path,
        loaded.template,
        loaded.tokenizer,
        num_ctx=args.num_ctx,
        add_bos=result.add_bos,
        system=args.system,
        overwrite=args.overwrite,
    )
    print(f"wrote {result.path} ({quant}, {result.size_bytes / 1e6:.1f} MB) and {mf.path}")
    print(f"  ollama create NAME -f {mf.path}")
    return 0
