"""The quality gate every export passes through, and the manifest that records it.

Gate: KL divergence and top-1 agreement of the artefact's next-token distributions against the 16-bit
model's on held-out user text (``kindred.export.quality.agreement``), and a greedy smoke generation from a
held-out prompt that must end on an end-of-turn token without looping (eval's LoopDetector). 4-bit
artefacts are warned about above KL 0.03 or below 92 % top-1 (eval-export-anchors B8).

Manifest (``manifest.json`` in the export folder): base, adapter sha256, quantization, template and its
hash, tool versions, calibration, the gate's figures.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import __version__
from ..eval.loops import LoopDetector
from ..generate import SamplingConfig, generate
from .files import folder_bytes, sha256_of
from .quality import agreement

KL_WARN, TOP1_WARN = 0.03, 0.92  # a 4-bit export above / below these is worth a look (anchors B8)
MANIFEST = "manifest.json"
_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]


@dataclass
class GateResult:
    kl: float
    top1: float
    tokens: int
    smoke_text: str | None
    smoke_finish: str
    smoke_tokens: int
    ended_on_eos: bool
    looped: bool
    passed: bool
    warnings: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_agreement(reference, candidate, ids: torch.Tensor, rows: int = 2):
    """agreement() of the two models over token ids [n, T], a few sequences at a time (the logits of a
    large vocabulary do not fit at once), combined weighted by tokens."""
    kl = top1 = 0.0
    tokens = 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], rows):
            chunk = ids[i : i + rows]
            ref = reference(chunk.to(reference.model.embed_tokens.weight.device)).float().cpu()
            cand = candidate(chunk.to(candidate.model.embed_tokens.weight.device)).float().cpu()
            a = agreement(ref, cand)
            kl, top1, tokens = kl + a.kl * a.tokens, top1 + a.top1 * a.tokens, tokens + a.tokens
    return kl / tokens, top1 / tokens, tokens


def prompt_ids(tokenizer, template, messages: list[dict]) -> list[int]:
    """The ids of a chat up to its first user turn, with the template's generation prompt."""
    from ..generate.cli import encode_chat

    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return encode_chat(SimpleNamespace(template=template, tokenizer=tokenizer), messages[: first_user + 1])


def run_gate(
    reference,
    candidate,
    eval_ids: torch.Tensor,
    tokenizer,
    template,
    stop_ids: list[int],
    smoke_messages: list[dict],
    *,
    four_bit: bool,
    max_new_tokens: int = 256,
) -> GateResult:
    """The gate's figures for ``candidate`` against ``reference`` (both kindred DecoderLMs)."""
    kl, top1, tokens = held_out_agreement(reference, candidate, eval_ids)
    prompt = prompt_ids(tokenizer, template, smoke_messages)
    detector = LoopDetector(decode=tokenizer.decode)
    out = generate(
        candidate,
        [prompt],
        SamplingConfig(max_new_tokens=max_new_tokens),
        stop_token_ids=stop_ids,
        tokenizer=tokenizer,
        loop_detector=detector,
    )[0]
    ended = out.finish_reason == "stop"
    looped = (
        out.finish_reason == "loop" or detector.analyse(out.tokens, finish_reason=out.finish_reason).looped
    )
    warnings = []
    if four_bit and kl > KL_WARN:
        warnings.append(f"KL {kl:.4f} > {KL_WARN} on held-out text")
    if four_bit and top1 < TOP1_WARN:
        warnings.append(f"top-1 agreement {top1:.1%} < {TOP1_WARN:.0%}")
    if not ended:
        warnings.append(f"the smoke generation did not end on an end-of-turn token ({out.finish_reason})")
    if looped:
        warnings.append("the smoke generation loops")
    return GateResult(
        kl,
        top1,
        tokens,
        out.text,
        out.finish_reason,
        out.new_tokens,
        ended,
        looped,
        ended and not looped,
        warnings,
    )


def template_hash(template, folder: Path) -> str:
    """sha256 of the chat template the export carries (its Jinja text, if any) and of kindred's rendering
    of a probe conversation with ``template`` (and its name): it changes whenever the prompts change."""
    h = hashlib.sha256()
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            text = (
                f.read_text()
                if name.endswith("jinja")
                else str(json.loads(f.read_text()).get("chat_template"))
            )
            h.update(text.encode())
    h.update(template.name.encode())
    h.update(template.render_text(_PROBE).encode())
    h.update(template.generation_prompt().encode())
    return h.hexdigest()


def _versions() -> dict:
    out = {"kindred": __version__, "torch": torch.__version__}
    for dist in ("safetensors", "transformers", "compressed-tensors", "peft"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(
    folder: Path,
    *,
    kind: str,
    base: str,
    adapter: Path | None,
    quant: dict,
    template,
    gate: GateResult | None,
    calibration: dict | None = None,
) -> Path:
    """manifest.json in the export folder (written to a temporary file, then renamed into place)."""
    folder = Path(folder)
    adapter_files = (
        [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"] if adapter else []
    )
    manifest = {
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": base,
        "adapter": None if adapter is None else {"path": str(adapter), "sha256": sha256_of(adapter_files)},
        "quantization": quant,
        "template": {"name": template.name, "sha256": template_hash(template, folder)},
        "calibration": calibration,
        "tool_versions": _versions(),
        "size_bytes": folder_bytes(folder),
        "gate": None if gate is None else gate.to_dict(),
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST
