"""kindred.train: QLoRA fine-tuning from a YAML/dict config, with atomic checkpoints and exact resume.

    import kindred
    result = kindred.train.train("config.yaml")                 # or a dict; see kindred.train.config
    result = kindred.train.train(cfg, resume=True)              # continue from the latest checkpoint
    print(result.eval_losses, result.adapter_dir)               # PEFT adapter folder

From the shell: ``kindred train config.yaml [--resume | --overwrite] [--set train.max_steps=100]``.
Names load from their modules on first use (``kindred train --help`` reads the config keys without torch).
"""

import importlib
import sys
import types

_EXPORTS = {
    "TrainConfig": "config",
    "load_config": "config",
    "latest_checkpoint": "checkpoint",
    "TrainResult": "trainer",
    "Trainer": "trainer",
    "lr_factor": "trainer",
    "train": "trainer",
}
__all__ = sorted(_EXPORTS)


class _TrainModule(types.ModuleType):
    """Lets ``kindred.train(cfg)`` call :func:`train`; ``kindred.train.TrainConfig`` etc. stay reachable."""

    def __call__(self, config, **kwargs):
        return self.train(config, **kwargs)

    def __getattr__(self, name: str):
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'kindred.train' has no attribute {name!r}")
        return getattr(importlib.import_module(f".{module}", __name__), name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _TrainModule
