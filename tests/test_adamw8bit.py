"""AdamW with 8-bit moments (nn/adamw8bit.py): the dynamic maps, block quantization on awkward sizes,
the update against torch's AdamW, its state through a state_dict, and a fine-tune that learns and resumes
bitwise through the trainer's checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

import kindred
from kindred import _core
from kindred.demo import build_tiny_model
from kindred.errors import KindredValueError
from kindred.nn.adamw8bit import BLOCK, AdamW8bit, dequantize_blocks, dynamic_map, quantize_blocks

from .helpers import tiny_run_config


def test_the_signed_map_is_the_cores_and_the_unsigned_one_is_whole():
    assert torch.equal(dynamic_map(True), torch.tensor(_core.DYNAMIC_MAP, dtype=torch.float32))
    u = dynamic_map(False)
    assert u.numel() == 256 and u.unique().numel() == 256 and bool((u[1:] > u[:-1]).all())
    assert u[0] == 0 and u[-1] == 1 and u[1] < 1e-6  # fine steps next to zero, where second moments sit


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 3, 255, 256, 257, 1000])
def test_blocks_round_trip_to_the_nearest_code(signed, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-4, 0, n)  # magnitudes over four decades in a block
    x = x if signed else x.abs()
    codes, absmax = quantize_blocks(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == (n,) and absmax.shape == (math.ceil(n / BLOCK),)
    back = dequantize_blocks(codes, absmax, signed)
    table = dynamic_map(signed)
    scale = absmax.repeat_interleave(BLOCK)[:n]
    # the nearest entry: no other entry of the map is closer to x / absmax than the one stored
    dist = ((x / scale)[:, None] - table[None, :]).abs()
    assert torch.equal(codes.long(), dist.argmin(dim=1)) or bool(
        (dist.gather(1, codes.long()[:, None])[:, 0] <= dist.min(dim=1).values + 1e-7).all()
    )
    assert float((back - x).abs().max()) <= float(absmax.max()) * 0.0362  # half the coarsest step (0.0724)
    zeros = quantize_blocks(torch.zeros(n), signed)
    assert torch.equal(dequantize_blocks(*zeros, signed), torch.zeros(n))


def _fit(opt_cls, steps: int, **kw) -> tuple[torch.Tensor, list[float]]:
    """Least squares (300 equations, 64 unknowns: one solution) from a fixed start; the losses on the way."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    w = torch.nn.Parameter(torch.randn(64, generator=g) * 0.1)
    opt = opt_cls([w], lr=1e-2, **kw)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (a @ w - b).square().mean()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return w.detach(), curve


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_follows_torch_adamw(weight_decay):
    ref_w, ref = _fit(torch.optim.AdamW, 150, weight_decay=weight_decay)
    w, got = _fit(AdamW8bit, 150, weight_decay=weight_decay)
    assert got[-1] < 0.5 * got[0] and abs(got[-1] - ref[-1]) <= 0.02 * ref[-1]
    assert float((w - ref_w).norm() / ref_w.norm()) < 5e-3  # 2-4e-4 measured
    one_w, _ = _fit(AdamW8bit, 1, weight_decay=weight_decay)
    one_ref, _ = _fit(torch.optim.AdamW, 1, weight_decay=weight_decay)
    assert torch.allclose(one_w, one_ref, atol=2e-4)  # the first step: m = g, v = g² up to their rounding


def test_state_survives_a_state_dict_bitwise():
    g = torch.Generator().manual_seed(1)
    start = torch.randn(700, generator=g)
    grads = [torch.randn(700, generator=g) for _ in range(6)]

    def run(split: int | None) -> torch.Tensor:
        w = torch.nn.Parameter(start.clone())
        opt = AdamW8bit([w], lr=1e-2, weight_decay=0.01)
        for i, grad in enumerate(grads):
            if i == split:
                saved = opt.state_dict()
                opt = AdamW8bit([w], lr=1e-2, weight_decay=0.01)
                opt.load_state_dict(saved)
            w.grad = grad.clone()
            opt.step()
        return w.detach()

    assert torch.equal(run(None), run(3))
    w = torch.nn.Parameter(start.clone())
    opt = AdamW8bit([w], lr=1e-2)
    w.grad = grads[0]
    opt.step()
    st = opt.state[w]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg_absmax"].shape == (3,) and float(st["step"]) == 1


def test_refuses_what_it_cannot_update():
    with pytest.raises(KindredValueError, match=r"float32 parameters, got torch\.bfloat16"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], lr=1e-3)
    with pytest.raises(KindredValueError, match="lr > 0"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(4))], lr=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny8") / "model", seed=1)


def _config(model, out, **over):
    return tiny_run_config(
        model,
        out,
        {"train.optimizer": "adamw8bit", **over},
        lora={"r": 8, "alpha": 16, "dropout": 0.1},
        # a constant lr: the run cut at step 4 and resumed to 8 follows the 8-step run's schedule
        train={
            "max_steps": 8,
            "micro_batch_tokens": 512,
            "grad_accum": 2,
            "lr": 2e-2,
            "schedule": "constant",
        },
        output={"save_every": 2, "progress": False, "plot": False},
    )


def test_fine_tune_learns_and_resumes_bitwise(tiny, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the straight run and the resumed one
    try:
        straight = kindred.train(_config(tiny, tmp_path / "straight"))
        kindred.train(_config(tiny, tmp_path / "split", **{"train.max_steps": 4}))
        kindred.train(_config(tiny, tmp_path / "split"), resume=True)
    finally:
        torch.set_num_threads(threads)
    curve = [r["loss"] for r in straight.metrics]
    assert len(curve) == 8 and curve[-1] < curve[0] - 0.3
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == curve
    with pytest.raises(kindred.errors.KindredValueError, match=r"train\.optimizer"):
        kindred.train(_config(tiny, tmp_path / "split", **{"train.optimizer": "adamw"}), resume=True)


def test_the_config_names_the_choices(tiny, tmp_path):
    with pytest.raises(
        KindredValueError, match=r"'train\.optimizer' must be one of adamw, adamw8bit; got 'sgd'"
    ):
        kindred.train(_config(tiny, tmp_path / "bad", **{"train.optimizer": "sgd"}))
