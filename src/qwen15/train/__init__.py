"""Pretraining and full finetuning: `qwen15 train --config RECIPE [--section.key value ...]`, one process or torchrun.

config.py (recipes), trainer.py (the loop), optim.py (AdamW, schedule, clipping), loss.py (global token-mean
cross-entropy), random_init.py (seeded init of a sharded model), dcp_checkpoint.py (DCP checkpoints, resume),
export.py (checkpoint -> Hugging Face folder), metrics.py (log line, metrics.jsonl, MFU, loss curve). Parallelism
is applied from qwen15.parallel.
"""

from qwen15.train.config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config", "train"]


def train(cfg: TrainConfig, **kwargs):
    from qwen15.train.trainer import train as _train

    return _train(cfg, **kwargs)
