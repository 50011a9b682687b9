"""``kindred export merged|awq`` end to end on a short kindred training run: the artefacts, the gate's
figures in manifest.json, loading by ``kindred eval``, and bad input refused before any work."""

import json

import pytest
import torch

import kindred
from kindred.cli import main
from kindred.demo import CALIBRATION, build_tiny_model
from kindred.eval.models import resolve
from kindred.nn import Linear4bit

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step QLoRA run on a tiny model (its adapter, config.yaml and held-out split)."""
    root = tmp_path_factory.mktemp("export-cli")
    model = build_tiny_model(root / "model", seed=1)
    cfg = {
        "model": str(model),
        "quant": "nf4",
        "dtype": "fp32",
        "device": "cpu",
        "lora": {"r": 8, "alpha": 16},
        "data": {"path": str(CALIBRATION), "template": "chatml", "budget": 512, "eval_fraction": 0.3},
        "train": {"max_steps": 2, "micro_batch_tokens": 512, "lr": 2e-2, "warmup_steps": 1},
        "output": {"dir": str(root / "run"), "save_every": 2, "progress": False, "tensorboard": False},
    }
    kindred.train(cfg)
    return root, model, root / "run" / "adapter"


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow
def test_export_merged_gate_and_eval_loading(run, capsys):
    root, model, adapter = run
    out = root / "merged"
    rc = main(["export", "merged", str(adapter), "--out", str(out), "--device", "cpu"])
    m = _manifest(out)
    assert rc == (0 if m["gate"]["passed"] else 1)
    assert m["base"] == str(model.resolve()) and len(m["adapter"]["sha256"]) == 64
    assert m["quantization"] == {"type": "none", "merged_onto": "16-bit base"}
    assert m["gate"]["kl"] < 1e-9 and m["gate"]["top1"] == 1.0 and m["gate"]["tokens"] > 0
    assert m["gate"]["smoke_finish"] in ("stop", "length", "loop") and m["template"]["name"] == "chatml"
    assert "gate: KL" in capsys.readouterr().out
    # kindred eval resolves and loads the exported folder like any model folder
    plan = resolve(out, quant="none", device="cpu")
    ids = torch.randint(0, 600, (1, 20), generator=torch.Generator().manual_seed(0))
    reference = kindred.models.from_pretrained(model, dtype=torch.float32)
    kindred.nn.load_adapter(reference, adapter)
    assert torch.allclose(plan.load()(ids), reference(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_export_awq_cli(run):
    root, _, adapter = run
    out = root / "awq"
    args = ["export", "awq", str(adapter), "--out", str(out), "--group-size", "64", "--samples", "4"]
    rc = main([*args, "--seq-len", "64", "--device", "cpu"])
    m = _manifest(out)
    assert rc == (0 if m["gate"]["passed"] else 1)
    assert m["quantization"]["type"] == "awq" and m["quantization"]["format"] == "compressed-tensors"
    assert m["calibration"]["sequences"] == 4 and m["calibration"]["seq_len"] == 64
    assert m["gate"]["kl"] > 0 and 0 < m["gate"]["top1"] <= 1
    loaded = resolve(out, device="cpu").load()  # kindred eval's loader, default quant: INT4 as stored
    four_bit = [x for x in loaded.modules() if isinstance(x, Linear4bit)]
    assert len(four_bit) == 7 * loaded.config.num_layers and {x.quant_type for x in four_bit} == {"int4g"}


def test_bad_input_is_refused_before_work(run, tmp_path, capsys):
    adapter = run[2]
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["export", "merged", str(adapter), "--out", str(taken)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "awq", str(adapter), "--out", str(tmp_path / "a"), "--group-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "--group-size 128: hidden_size = 64 is not a multiple of 128: pass --group-size 64" in err
    assert (
        main(
            ["export", "merged", str(adapter), "--base", str(tmp_path / "gone"), "--out", str(tmp_path / "m")]
        )
        == 2
    )
    assert "is not here: pass --base" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()
