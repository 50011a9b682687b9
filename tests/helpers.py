"""Test helpers shared across files."""

import importlib.util
from pathlib import Path

import torch


def kindred_path() -> str:
    """The folder the kindred under test is imported from (the checkout's python/, or the site-packages of
    an installed wheel): the PYTHONPATH a subprocess needs to run that same kindred."""
    return str(Path(importlib.util.find_spec("kindred").origin).resolve().parents[1])


def randn(shape, dtype=torch.float32, device="cpu", seed=0, scale=0.02):
    """Random non-zero weights: normal, scaled like a trained layer, never exactly zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    w = torch.where(w == 0, torch.full_like(w, 1e-6), w)
    return w.to(dtype).to(device)


def with_overrides(cfg: dict, over: dict) -> dict:
    """A trainer config dict with dotted overrides ("train.lr") applied or sections ("lora") replaced."""
    for key, value in over.items():
        section, _, name = key.partition(".")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg


def tiny_run_config(model, out, over: dict, **sections: dict) -> dict:
    """A trainer config dict for a tiny model on the shipped calibration set (CPU, NF4, fp32): ``sections``
    add to the base's sections ("train": {...}), then the dotted ``over`` apply (with_overrides)."""
    from kindred.demo import CALIBRATION

    cfg = {
        "model": str(model),
        "quant": "nf4",
        "dtype": "fp32",
        "device": "cpu",
        "lora": {},
        "data": {"path": str(CALIBRATION), "template": "chatml", "budget": 512},
        "train": {},
        "output": {"dir": str(out), "tensorboard": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    return with_overrides(cfg, over)
