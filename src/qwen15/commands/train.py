"""`qwen15 train --config RECIPE [--section.key value ...]`: pretrain or finetune, on one process or under torchrun.

  qwen15 train --config configs/finetune_7b.yaml --model.path ./Qwen1.5-7B --data.path data/alpaca-4096
  torchrun --nproc-per-node 8 -m qwen15 train --config configs/finetune_7b.yaml ...
  torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 --nproc-per-node 8 \\
      -m qwen15 train --config configs/pretrain_14b.yaml ...
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="recipe YAML file, or the name of a shipped recipe (e.g. finetune_7b, tiny); see docs/training.md",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.epilog = "Any key can be overridden: --section.key value (e.g. --optim.lr 1e-5 --train.steps 100)."


# `--section.key value` pairs are not declared options: the CLI entry hands what argparse does not know to this
# command as args.overrides (the config layer validates them and names any unknown key).
TAKES_OVERRIDES = True


def recipe_path(name: str) -> Path:
    """A file path as given, or a shipped recipe by name (configs/NAME.yaml of this source tree)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = Path(__file__).resolve().parents[3] / "configs"
    for candidate in (shipped / name, shipped / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # load_config reports it missing


def run(args: argparse.Namespace) -> int:
    from qwen15.train.config import load_config

    cfg = load_config(recipe_path(args.config) if args.config is not None else None, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from qwen15.train.trainer import train

    train(cfg, echo=lambda m: print(m, flush=True))
    return 0
