"""Ollama: a ``Modelfile`` beside an exported GGUF, with an explicit Go-template ``TEMPLATE`` translated from
the family's chat template (kindred.data.templates), a ``PARAMETER stop`` for every end-of-turn token and
``num_ctx``.

Each TEMPLATE renders a conversation ending with a user turn, followed by the generation prompt, as the text
kindred's template renders (``render_text(messages) + generation_prompt()``), for conversations kindred's data
validation accepts. The leading BOS is left out when the GGUF's tokenizer adds it itself (Ollama tokenizes the
prompt with the model's add_bos rule), so it is never doubled. Go templates have no trim: Llama 3's and
Gemma 3's templates strip message content, so content with surrounding whitespace renders differently; and
Qwen3's reasoning in earlier assistant turns is kept (kindred drops it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import get_template
from ..errors import KindredValueError
from .gguf import check_output

# The system message's content, and the index of the last user message.
_SYSTEM = (
    '{{- $sys := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $sys = .Content }}{{- end }}'
    "{{- end }}"
)
_LAST_USER = (
    '{{- $lu := 0 }}{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}{{- $lu = $i }}{{- end }}'
    "{{- end }}"
)

_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_TEMPLATES = {
    "chatml": ("", _CHATML),
    "qwen3": ("", _CHATML),
    "llama3": (
        "<|begin_of_text|>",
        _SYSTEM + "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n{{ $sys }}<|eot_id|>"
        '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        "{{ .Content }}<|eot_id|>{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma3": (
        "<bos>",
        _SYSTEM + "{{- $first := true }}"
        '{{- range .Messages }}{{- if eq .Role "user" }}<start_of_turn>user\n'
        "{{ if and $first $sys }}{{ $sys }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $first = false }}"
        '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        "{{ end }}{{- end }}<start_of_turn>model\n",
    ),
    "phi4": (
        "",
        "{{- range .Messages }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>{{ end }}"
        "<|im_start|>assistant<|im_sep|>",
    ),
    "phi4-mini": (
        "",
        "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|endoftext|><|assistant|>",
    ),
    "mistral-nemo": (
        "<s>",
        _SYSTEM + _LAST_USER + '{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}[INST]'
        "{{ if and (eq $i $lu) $sys }}{{ $sys }}\n\n{{ end }}{{ $m.Content }}[/INST]"
        '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>{{ end }}{{- end }}',
    ),
}
OLLAMA_TEMPLATES = tuple(_TEMPLATES)  # kindred's templates that have a Go translation


@dataclass(frozen=True)
class Modelfile:
    """What :func:`write_modelfile` wrote."""

    path: Path
    template: str
    stops: tuple[str, ...]
    num_ctx: int


def go_template(template, add_bos: bool) -> str:
    """The Ollama TEMPLATE for kindred chat template ``template`` (name or object); BOS left out when the
    tokenizer adds it (``add_bos``)."""
    name = get_template(template).name
    if name not in _TEMPLATES:
        raise KindredValueError(
            f"template: {name!r} has no Ollama translation; known: {', '.join(_TEMPLATES)}"
        )
    bos, body = _TEMPLATES[name]
    return body if add_bos else bos + body


def stop_strings(tokenizer, template) -> tuple[str, ...]:
    """The text of every token generation stops at (kindred.generate.stop_token_ids), for PARAMETER stop."""
    from ..generate import stop_token_ids

    return tuple(
        dict.fromkeys(tokenizer.decode([i]) for i in stop_token_ids(tokenizer, get_template(template).name))
    )


def _quote(s: str) -> str:
    if '"""' in s:
        raise KindredValueError('template: holds """, which a Modelfile cannot quote')
    return f'"""{s}"""'


def write_modelfile(
    gguf_path: str | Path,
    template,
    tokenizer,
    *,
    num_ctx: int = 4096,
    add_bos: bool = False,
    system: str | None = None,
    path: str | Path | None = None,
    overwrite: bool = False,
) -> Modelfile:
    """Write ``Modelfile`` (default: beside ``gguf_path``) for ``ollama create NAME -f Modelfile``.

    ``tokenizer``: a kindred tokenizer (its end-of-turn tokens become stops); ``add_bos``: whether the GGUF's
    tokenizer adds BOS itself (``tokenizer.ggml.add_bos_token``).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise KindredValueError(f"{gguf_path}: no such GGUF file for the Modelfile")
    if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1:
        raise KindredValueError(f"num_ctx must be a positive integer, got {num_ctx!r}")
    out = check_output(path or gguf_path.with_name("Modelfile"), overwrite)
    body = go_template(template, add_bos)
    stops = stop_strings(tokenizer, template)
    rel = gguf_path.name if gguf_path.parent.resolve() == out.parent.resolve() else str(gguf_path.resolve())
    lines = [f"FROM ./{rel}" if "/" not in rel else f"FROM {rel}", f"TEMPLATE {_quote(body)}"]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stops] + [f"PARAMETER num_ctx {num_ctx}"]
    out.write_text("\n".join(lines) + "\n")
    return Modelfile(out, body, stops, num_ctx)
