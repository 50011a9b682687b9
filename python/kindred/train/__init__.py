"""kindred.train: QLoRA fine-tuning from a YAML/dict config, with atomic checkpoints and exact resume.

    import kindred
    result = kindred.train.train("config.yaml")                 # or a dict; see kindred.train.config
    result = kindred.train.train(cfg, resume=True)              # continue from the latest checkpoint
    print(result.eval_losses, result.adapter_dir)               # PEFT adapter folder

From the shell: ``kindred train config.yaml [--resume | --overwrite] [--set train.max_steps=100]``.
"""

import sys
import types

from .checkpoint import latest_checkpoint
from .config import TrainConfig, load_config
from .trainer import Trainer, TrainResult, lr_factor, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "latest_checkpoint", "load_config", "lr_factor", "train"]


class _TrainModule(types.ModuleType):
    """Lets ``kindred.train(cfg)`` call :func:`train`; ``kindred.train.TrainConfig`` etc. stay reachable."""

    def __call__(self, config, **kwargs) -> TrainResult:
        return train(config, **kwargs)


sys.modules[__name__].__class__ = _TrainModule
