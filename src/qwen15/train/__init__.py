"""Pretraining and full finetuning: `qwen15 train --config RECIPE [--section.key value ...]`, one process or torchrun.

config.py (recipes), distributed.py (process group, device mesh), parallelize.py (activation checkpointing,
compile, FSDP2), weights.py (sharded init / Hugging Face load), optim.py (AdamW, schedule, clipping), loss.py
(global token-mean cross-entropy), checkpointing.py (DCP checkpoints, resume), export.py (checkpoint -> Hugging
Face folder), metrics.py (log line, metrics.jsonl, TensorBoard, MFU, loss curve), trainer.py (the loop).
"""

from qwen15.train.config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config", "train"]


def train(cfg: TrainConfig, **kwargs):
    from qwen15.train.trainer import train as _train

    return _train(cfg, **kwargs)
