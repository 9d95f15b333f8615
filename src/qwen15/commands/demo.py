"""`qwen15 demo`: tokenizer, pretraining, finetuning, export and chat with a small model on CPU, in a few minutes."""

from __future__ import annotations

import argparse

from qwen15.commands.options import bounded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="runs/demo", help="folder for everything the demo writes (runs/demo)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced budget that finishes in seconds (checks the plumbing only)",
    )
    parser.add_argument("--pretrain-steps", type=bounded(int, 1), help="override the pretraining steps")
    parser.add_argument("--finetune-steps", type=bounded(int, 1), help="override the finetuning steps")
    parser.add_argument(
        "--seed", type=bounded(int, 0), default=0, help="seed of the data, the split and the model init"
    )
    parser.add_argument("--threads", type=bounded(int, 1), help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what an earlier demo wrote into --out"
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import torch

    from qwen15.demo.pipeline import QUICK, DemoBudget, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else DemoBudget()
    budget = dataclasses.replace(budget, seed=args.seed)
    if args.pretrain_steps is not None:
        budget = dataclasses.replace(budget, pretrain_steps=args.pretrain_steps)
    if args.finetune_steps is not None:
        budget = dataclasses.replace(budget, finetune_steps=args.finetune_steps)
    run_demo(Path(args.out), budget, echo=lambda m: print(m, flush=True), overwrite=args.overwrite)
    return 0
