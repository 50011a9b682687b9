"""One ``kindred export`` run: resolved and checked up front (:meth:`ExportJob.from_args`, no weights read),
then run (:meth:`ExportJob.run`): the artefact, the quality gate against the 16-bit model, the manifest."""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import get_template, load_tokenizer
from ..data.tokenizers import HFTokenizer
from ..errors import KindredValueError
from ..models import (
    DecoderConfig,
    from_gguf,
    from_pretrained,
    gguf_chat_template,
    gguf_tokenizer,
    load_config,
    smollm2_gguf_path,
)
from ..nn import load_adapter, merge_lora
from .awq import AWQSettings, quantize_awq, round_to_nearest
from .calibration import halves, read_chats, run_data, sequences
from .cli import bytes_arg, source_paths
from .files import check_output
from .gate import run_gate, write_manifest
from .merged import end_of_turn_ids, merge_adapter, save_merged
from .w4a16 import save_w4a16

EVAL_SEQUENCES, EVAL_SEQ_LEN = 16, 256  # the gate's held-out text: up to 4,096 tokens


@dataclass
class ExportJob:
    kind: str
    args: object
    adapter: Path | None
    base: Path
    out: Path
    config: DecoderConfig
    hf_config: dict
    tokenizer: object
    template: object
    eval_chats: list
    calibration_chats: list
    device: torch.device

    @classmethod
    def from_args(cls, args) -> ExportJob:
        kind = args.export_kind
        adapter, base_name = source_paths(args.source, args.base)
        out = check_output(args.out, args.overwrite)
        base = smollm2_gguf_path() if base_name == "smollm2" else Path(base_name)
        if base is None or not base.exists():
            raise KindredValueError(
                f"the base {base_name!r} is not here: pass --base with the 16-bit model folder the adapter "
                "was trained on"
            )
        gguf = base.is_file() and base.suffix == ".gguf"
        if not gguf and not (base / "config.json").is_file():
            raise KindredValueError(f"--base {base}: neither a model folder (config.json) nor a .gguf file")
        if gguf:
            from ..formats.gguf import gguf_metadata, gguf_to_hf_config, read_gguf

            reader = read_gguf(base)
            hf_config = gguf_to_hf_config(gguf_metadata(reader), {t.name for t in reader.tensors}, str(base))
            tmp = Path(tempfile.mkdtemp(prefix="kindred-export-tok-"))
            gguf_tokenizer(base).save(str(tmp / "tokenizer.json"))
            tokenizer = HFTokenizer(tmp / "tokenizer.json")
        else:
            hf_config = json.loads((base / "config.json").read_text())
            tokenizer = load_tokenizer(base)
        quantized_base = gguf or "quantization_config" in hf_config
        if quantized_base and kind == "merged" and not args.allow_quantized_base:
            raise KindredValueError(
                f"--base {base} holds quantized weights only: merge onto the original 16-bit model folder "
                "(--base), or pass --allow-quantized-base to merge onto the dequantized weights"
            )
        if getattr(args, "onto", None) and not args.allow_quantized_base:
            raise KindredValueError(
                f"--onto {args.onto} merges onto dequantized 4-bit weights: add --allow-quantized-base"
            )
        config = load_config(hf_config)
        run_config = _run_config(adapter)
        template = get_template(
            args.template or run_config.get("data", {}).get("template") or _guess(config, tokenizer)
        )
        eval_chats, calibration = _chats(args, kind, run_config)
        if kind == "awq":
            _check_awq_args(args, config)
        device = (
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if args.device == "auto"
            else torch.device(args.device)
        )
        return cls(
            kind,
            args,
            adapter,
            base,
            out,
            config,
            hf_config,
            tokenizer,
            template,
            eval_chats,
            calibration,
            device,
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _dense(self, device) -> torch.nn.Module:
        """The 16-bit model: the base dense in the compute dtype, the adapter on it (not merged)."""
        if self.base.is_file():
            model = from_gguf(self.base, None, self.dtype, device)
        else:
            model = from_pretrained(self.base, None, self.dtype, device)
        if self.adapter is not None:
            load_adapter(model, self.adapter)
        return model.eval()

    def run(self, progress=None) -> Path:
        a, shard = self.args, bytes_arg(self.args.shard_size)
        tpl = self.template.name
        chat_template = gguf_chat_template(self.base) if self.base.is_file() else None
        calibration = None
        if self.kind == "merged":
            if self.base.is_dir():
                merge_adapter(
                    self.adapter,
                    self.base,
                    self.out,
                    onto=a.onto,
                    allow_quantized_base=a.allow_quantized_base,
                    template=tpl,
                    max_shard_bytes=shard,
                    overwrite=a.overwrite,
                )
            else:
                save_merged(
                    self._dense("cpu"),
                    self.hf_config,
                    self.out,
                    self.tokenizer,
                    allow_quantized_base=True,
                    chat_template=chat_template,
                    template=tpl,
                    max_shard_bytes=shard,
                    overwrite=a.overwrite,
                )
            quant = {
                "type": "none",
                "merged_onto": a.onto or ("gguf (dequantized)" if self.base.is_file() else "16-bit base"),
            }
            reference = None
        else:
            reference = self._dense("cpu")
            model = (
                merge_lora(copy.deepcopy(reference)) if self.adapter is not None else copy.deepcopy(reference)
            )
            ids = sequences(
                self.calibration_chats, self.tokenizer, self.template, a.seq_len, a.samples, "--calibration"
            )
            if a.rtn:
                round_to_nearest(model, a.group_size)
                report = None
            else:
                settings = AWQSettings(group_size=a.group_size, max_gpu_memory=bytes_arg(a.max_gpu_memory))
                report = quantize_awq(model, ids, settings, self.device, progress)
            save_w4a16(
                model,
                self.hf_config,
                self.out,
                self.tokenizer,
                fmt=a.format,
                base=self.base if self.base.is_dir() else None,
                chat_template=chat_template,
                template=tpl,
                max_shard_bytes=shard,
                overwrite=a.overwrite,
                dtype=None if self.dtype != torch.float32 else torch.float32,
            )
            del model
            quant = {
                "type": "rtn" if a.rtn else "awq",
                "format": a.format,
                "bits": 4,
                "group_size": a.group_size,
                "symmetric": False,
                "lm_head": "16-bit",
            }
            calibration = {
                "sequences": int(ids.shape[0]),
                "seq_len": int(ids.shape[1]),
                "source": a.calibration or "the training run's held-out split (even conversations)",
                "seconds": None if report is None else round(report.seconds, 2),
                "peak_gpu_bytes": None if report is None else report.peak_gpu_bytes,
            }
        gate = None
        if not a.no_gate:
            reference = (reference or self._dense("cpu")).to(self.device)
            reference.model.init_rotary(self.device)
            candidate = from_pretrained(self.out, None, self.dtype, self.device)  # as `kindred eval` loads it
            eval_ids = sequences(
                self.eval_chats, self.tokenizer, self.template, EVAL_SEQ_LEN, EVAL_SEQUENCES, "--eval-data"
            )
            stops = end_of_turn_ids(self.tokenizer, self.config, tpl)
            gate = run_gate(
                reference,
                candidate,
                eval_ids,
                self.tokenizer,
                self.template,
                stops,
                self.eval_chats[0],
                four_bit=self.kind == "awq",
            )
        return write_manifest(
            self.out,
            kind=self.kind,
            base=str(self.base),
            adapter=self.adapter,
            quant=quant,
            template=self.template,
            gate=gate,
            calibration=calibration,
        )


def _run_config(adapter: Path | None) -> dict:
    """The config.yaml of the kindred training run that wrote ``adapter`` (run/adapter), or {}."""
    import yaml

    f = adapter.parent / "config.yaml" if adapter is not None else None
    if f is None or not f.is_file():
        return {}
    cfg = yaml.safe_load(f.read_text())
    return cfg if isinstance(cfg, dict) else {}


def _guess(config: DecoderConfig, tokenizer) -> str:
    from ..generate.cli import guess_template

    return guess_template(config.model_type, tokenizer)


def _chats(args, kind: str, run_config: dict) -> tuple[list, list]:
    """(gate chats, calibration chats): the given files, else the run's held-out split (for AWQ without a
    calibration file: its even conversations calibrate, its odd ones are the gate's)."""
    calibration = read_chats(args.calibration) if getattr(args, "calibration", None) else None
    evals = read_chats(args.eval_data) if args.eval_data else None
    needs_eval = not args.no_gate and evals is None
    needs_cal = kind == "awq" and calibration is None
    if needs_eval or needs_cal:
        if not run_config:
            what = " and ".join(
                x for x, n in (("--eval-data", needs_eval), ("--calibration", needs_cal)) if n
            )
            raise KindredValueError(
                f"no training run beside the adapter to take held-out chats from: pass {what}"
            )
        held, _ = run_data(run_config)
        if needs_cal and needs_eval:
            calibration, evals = halves(held)
        elif needs_cal:
            calibration = list(held.conversations)
        else:
            evals = list(held.conversations)
    return evals or [], calibration or []


def _check_awq_args(args, config: DecoderConfig) -> None:
    """Group size and the projections' shapes, before any weight is read."""
    from ..ops.quant import INT4G_GROUPS

    g = args.group_size
    if g not in INT4G_GROUPS:
        raise KindredValueError(f"--group-size must be one of {INT4G_GROUPS}, got {g}")
    dims = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads x head_dim": config.num_heads * config.head_dim,
    }
    for what, k in dims.items():
        if k % g:
            fits = [x for x in INT4G_GROUPS if k % x == 0 and all(d % x == 0 for d in dims.values())]
            fix = f"pass --group-size {fits[-1]}" if fits else "this model has no INT4 group size that fits"
            raise KindredValueError(f"--group-size {g}: {what} = {k} is not a multiple of {g}: {fix}")
    if args.samples < 1 or args.seq_len < 16:
        raise KindredValueError(
            f"--samples must be >= 1 and --seq-len >= 16, got {args.samples}, {args.seq_len}"
        )
    bytes_arg(args.max_gpu_memory)
