"""The quality gate's verdicts (KL / top-1, the smoke generation's end) and the manifest's records."""

import hashlib
import json

import pytest
import torch

from kindred.data import get_template, load_tokenizer
from kindred.demo import build_tiny_model
from kindred.export.gate import held_out_agreement, prompt_ids, run_gate, template_hash, write_manifest
from kindred.models import from_pretrained

CHAT = [
    {"role": "user", "content": "Is it fair to keep a found wallet?"},
    {"role": "assistant", "content": "No."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("gate") / "model", seed=2)
    return folder, from_pretrained(folder, dtype=torch.float32), load_tokenizer(folder)


def test_gate_passes_a_reply_that_ends_and_fails_one_that_does_not(tiny):
    _, model, tok = tiny
    tpl = get_template("chatml")
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([prompt_ids(tok, tpl, CHAT)])
    first = int(model(prompt)[0, -1].argmax())  # greedy's first token: made the stop token, it ends at once
    ok = run_gate(model, model, ids, tok, tpl, [first], CHAT, four_bit=True)
    assert ok.kl == 0 and ok.top1 == 1 and ok.tokens == 72
    assert ok.passed and ok.ended_on_eos and ok.smoke_tokens == 1 and not ok.warnings
    bad = run_gate(model, model, ids, tok, tpl, [], CHAT, four_bit=True, max_new_tokens=40)
    assert not bad.passed and bad.smoke_finish in ("length", "loop")
    assert any("did not end on an end-of-turn token" in w for w in bad.warnings)


def test_agreement_of_different_models_is_weighted_by_tokens(tiny):
    _, model, _ = tiny
    other = from_pretrained(tiny[0], quant="int4g", dtype=torch.float32, group_size=32)
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    kl, top1, tokens = held_out_agreement(model, other, ids, rows=2)
    with torch.no_grad():
        from kindred.export import agreement

        whole = agreement(model(ids), other(ids))
    # (chunked and whole forwards round a little differently)
    assert tokens == whole.tokens and kl == pytest.approx(whole.kl, rel=1e-6)
    assert top1 == pytest.approx(whole.top1, rel=1e-6) and kl > 0


def test_manifest_records_base_adapter_template_and_gate(tiny, tmp_path):
    folder, *_ = tiny
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    out = tmp_path / "export"
    out.mkdir()
    path = write_manifest(
        out,
        kind="merged",
        base=str(folder),
        adapter=adapter,
        quant={"type": "none"},
        template=get_template("chatml"),
        gate=None,
    )
    m = json.loads(path.read_text())
    assert m["base"] == str(folder) and m["kind"] == "merged"
    assert m["adapter"]["sha256"] == hashlib.sha256(b"{}x").hexdigest()  # config, then weights
    assert m["gate"] is None and m["tool_versions"]["torch"] == torch.__version__
    assert template_hash(get_template("chatml"), out) != template_hash(get_template("gemma3"), out)
    assert m["template"]["sha256"] == template_hash(get_template("chatml"), out)
