"""`qwen15 demo`: the whole toolkit on a laptop-sized problem, on CPU, in a few minutes.

1. a byte-level BPE vocabulary trained on the spot (Qwen's pre-tokenizer and special tokens);
2. brief pretraining of a small Qwen1.5-architecture model from random init on Python's own documentation
   (`qwen15 train`, pretrain mode);
3. export to a Hugging Face folder, then full finetuning from that folder on chat conversations asking for
   multi-digit sums in words, packed rows, loss on the assistant turns only (`qwen15 train`, finetune mode);
4. export of the finetuned model (`qwen15 convert --to hf`) with the chat stop ids;
5. the loss curves (PNG when matplotlib is installed, and as text);
6. held-out questions (pairs never seen in training) answered through the chat template; accuracy printed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qwen15.demo import addition
from qwen15.demo.answer import answer
from qwen15.demo.bpe import train_bpe
from qwen15.demo.corpus import python_docs


@dataclass
class DemoBudget:
    """Sizes and steps of the demo; the defaults take a few minutes on 2 CPU cores. Small batches and many steps:
    a model this size learns to add from fewer tokens with more, smaller updates."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    seq_length: int = 256
    docs_chars: int = 200_000  # pretraining text: the standard library's docstrings
    pretrain_steps: int = 200
    pretrain_batch: int = 4  # rows of seq_length tokens per step
    pretrain_lr: float = 1e-3
    finetune_conversations: int = 40_000
    finetune_steps: int = 4000
    finetune_batch: int = 2
    finetune_lr: float = 1e-3
    digits: tuple[int, int] = (2, 2)  # operand length range
    held_out: int = 200
    seed: int = 0


QUICK = DemoBudget(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    intermediate_size=128,
    seq_length=128,
    docs_chars=40_000,
    pretrain_steps=6,
    finetune_conversations=400,
    finetune_steps=6,
    held_out=8,
)


def _schedule(steps: int, rows: int, lr: float) -> dict:
    return {
        "train.steps": steps,
        "train.global_batch_size": rows,
        "train.micro_batch_size": rows,
        "optim.lr": lr,
        "optim.min_lr": lr / 10,
        "optim.warmup_steps": max(1, steps // 20),
        "metrics.log_every": max(1, steps // 6),
    }


def _train(settings: dict, echo) -> object:
    """`qwen15 train` in this process, with `--key value` overrides built from `settings`. The run directory is
    the demo's own: an earlier demo's run there is replaced (not resumed, not set aside)."""
    from qwen15.train.config import load_config
    from qwen15.train.trainer import train

    shutil.rmtree(settings["train.run_dir"], ignore_errors=True)
    overrides = []
    for key, value in settings.items():
        overrides += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return train(load_config(None, overrides), echo=lambda m: echo("  " + m))


@dataclass
class Demo:
    """One demo run: where it writes, its budget, and what each stage leaves for the next."""

    out: Path
    budget: DemoBudget
    echo: Callable[[str], None]
    tokenizer: object = None
    docs: list[str] = field(default_factory=list)
    pretrained: Path | None = None
    finetune_checkpoint: Path | None = None
    model_dir: Path | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)

    def common_settings(self) -> dict:
        return {
            "data.seed": self.budget.seed,
            "train.device": "cpu",
            "metrics.plot": False,
            "metrics.tensorboard": False,
            "checkpoint.resume": "never",
            "checkpoint.keep": 1,
        }


def train_tokenizer(d: Demo) -> None:
    """A byte-level BPE vocabulary on the pretraining text and a few rendered conversations, which teach it the
    ChatML scaffolding (system prompt, role headers: otherwise ~20 tokens per conversation)."""
    from qwen15.tokenizer import Tokenizer

    b = d.budget
    d.docs = python_docs(b.docs_chars)
    scaffolding = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + q
        + "<|im_end|>\n<|im_start|>assistant\n"
        + a
        for q, a in addition.sample_texts(500, b.seed, b.digits)
    ]
    train_bpe(d.docs + scaffolding, b.vocab_size).save_pretrained(d.out / "tokenizer")
    d.tokenizer = Tokenizer.from_pretrained(d.out / "tokenizer")  # the saved files are what the rest reads
    example = "What is 482 plus 317?"
    d.echo(f"  {len(d.docs)} docstrings ({sum(map(len, d.docs)):,} chars) and 500 example conversations")
    d.echo(f"  {example!r} -> {[d.tokenizer.decode([i]) for i in d.tokenizer.encode(example)]}")


def pretrain(d: Demo) -> None:
    """The docstrings as a text file -> `qwen15 data preprocess --type text` rows -> `qwen15 train` from random
    init -> a Hugging Face folder to finetune from."""
    from qwen15.data.pretrain import preprocess_text
    from qwen15.train.export import export_hf

    b = d.budget
    text = d.out / "data" / "docstrings.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n\n".join(doc.strip() for doc in d.docs) + "\n", encoding="utf-8")
    data = d.out / "data" / "pretrain"
    preprocess_text(
        [text],
        data,
        d.tokenizer,
        seq_length=b.seq_length,
        kind="text",
        text_unit="block",
        overwrite=True,
        quiet=True,
    )
    result = _train(
        {
            **d.common_settings(),
            "model.preset": "tiny",  # the architecture; the shape below replaces its sizes
            "model.vocab_size": len(d.tokenizer),
            "model.hidden_size": b.hidden_size,
            "model.intermediate_size": b.intermediate_size,
            "model.num_hidden_layers": b.num_layers,
            "model.num_attention_heads": b.num_heads,
            "model.num_key_value_heads": b.num_heads,
            "model.max_position_embeddings": b.seq_length,
            "model.tokenizer": d.out / "tokenizer",
            "model.init_seed": b.seed,
            "data.path": data,
            "train.run_dir": d.out / "pretrain",
            **_schedule(b.pretrain_steps, b.pretrain_batch, b.pretrain_lr),
        },
        d.echo,
    )
    d.pretrained = export_hf(result.last_checkpoint, d.out / "pretrained-hf", dtype="float32", overwrite=True)


def finetune(d: Demo) -> None:
    """Addition questions as chat JSON Lines -> `qwen15 data preprocess --type chat --layout pack --loss-on
    assistant` -> `qwen15 train --train.mode finetune` from the pretrained folder."""
    from qwen15.data.sft import preprocess_chat

    b = d.budget
    conversations = addition.training_conversations(b.finetune_conversations, b.seed, b.digits)
    source = d.out / "data" / "addition.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    data = d.out / "data" / "finetune"
    meta = preprocess_chat(
        [source],
        data,
        d.tokenizer,
        seq_length=b.seq_length,
        layout="pack",
        loss_on="assistant",
        overwrite=True,
        quiet=True,
    )
    d.echo(
        f"  {meta['conversations']:,} conversations packed into {meta['rows']:,} rows of {b.seq_length} tokens, e.g."
    )
    d.echo(
        "  "
        + d.tokenizer.apply_chat_template(conversations[0], tokenize=False).replace("\n", "\n  ").rstrip()
    )
    result = _train(
        {
            **d.common_settings(),
            "train.mode": "finetune",
            "model.path": d.pretrained,
            "data.path": data,
            "train.run_dir": d.out / "finetune",
            **_schedule(b.finetune_steps, b.finetune_batch, b.finetune_lr),
        },
        d.echo,
    )
    d.finetune_checkpoint = result.last_checkpoint


def export(d: Demo) -> None:
    """`qwen15 convert --to hf` of the finetuned checkpoint: a chat model (both stop ids)."""
    from qwen15.train.export import export_hf

    d.model_dir = export_hf(d.finetune_checkpoint, d.out / "model", dtype="float32", overwrite=True)
    d.echo(f"  {d.model_dir}: " + ", ".join(sorted(p.name for p in d.model_dir.iterdir())))


def plot_curves(d: Demo) -> None:
    """Both loss curves as PNG files (when matplotlib is installed) and as text sparklines."""
    from qwen15.train.metrics import plot_loss_curve, read_metrics, sparkline

    for name in ("pretrain", "finetune"):
        records = read_metrics(d.out / name / "metrics.jsonl")
        losses = [r["loss"] for r in records]
        d.curves[name] = losses
        png = plot_loss_curve(records, d.out / f"{name}_loss.png", title=f"{name} loss")
        d.echo(
            f"  {name:8s} {losses[0]:.2f} {sparkline(losses, 50)} {losses[-1]:.2f}"
            + (f"  ({png})" if png else "")
        )


def ask_held_out(d: Demo) -> tuple[int, int]:
    """The held-out questions through the chat path; (correct, asked)."""
    from qwen15.model import Qwen
    from qwen15.tokenizer import Tokenizer

    model = Qwen.from_pretrained(d.model_dir)
    tokenizer = Tokenizer.from_pretrained(d.model_dir)
    correct = 0
    questions = addition.held_out_questions(d.budget.held_out, d.budget.seed, d.budget.digits)
    for i, (question, x, y) in enumerate(questions):
        reply = answer(model, tokenizer, question)
        ok = addition.is_correct(reply, x, y)
        correct += ok
        if i < 6:
            d.echo(f"  Q: {question}\n  A: {reply}   [{'correct' if ok else f'wrong, {x + y}'}]")
    return correct, len(questions)


def claim_output(out: Path, overwrite: bool) -> None:
    """The demo writes many things into `out`: it takes an empty or new folder, or (with overwrite) one an earlier
    demo wrote (our marker), never a folder of the user's (qwen15.atomic's rule, applied to the folder)."""
    from qwen15.atomic import MARKER, check_output_folder

    out = check_output_folder(out, overwrite=overwrite, flag="--out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"written_by": "qwen15 demo"}) + "\n", encoding="utf-8")


def run_demo(out: Path, budget: DemoBudget | None = None, echo=print, overwrite: bool = False) -> dict:
    """Run every stage into `out`; returns a summary (accuracy, paths, seconds per stage)."""
    b = budget or DemoBudget()
    claim_output(Path(out), overwrite)
    d = Demo(Path(out), b, echo)
    stages = [
        (
            "tokenizer",
            f"tokenizer: byte-level BPE with {b.vocab_size} tokens, trained on the pretraining text",
            train_tokenizer,
        ),
        ("pretrain", "pretraining from random init (qwen15 train, pretrain mode)", pretrain),
        (
            "finetune",
            "finetuning from the exported Hugging Face folder on chat questions (packed, "
            "assistant-only loss)",
            finetune,
        ),
        ("export", "export to Hugging Face format (qwen15 convert --to hf)", export),
        ("plots", "loss curves", plot_curves),
        (
            "answers",
            f"{b.held_out} held-out questions (sums never seen in training), answered through the chat "
            "template",
            ask_held_out,
        ),
    ]
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    result = None
    for n, (name, title, run) in enumerate(stages, 1):
        echo(f"\n[{n}/{len(stages)}] {title}")
        t0, c0 = time.perf_counter(), time.process_time()
        result = run(d)
        times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
    correct, asked = result
    accuracy = correct / asked
    verdict = "the model learned to add" if accuracy >= 0.9 else "more steps would help"
    echo(f"\naccuracy on held-out questions: {correct}/{asked} = {accuracy:.1%} ({verdict})")
    echo(
        "time: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
        + f"; total {sum(times.values()):.0f}s (CPU time of this process {sum(cpu.values()):.0f}s)"
    )
    echo(f"chat with it: qwen15 chat --model {d.model_dir}")
    return {
        "accuracy": accuracy,
        "correct": correct,
        "questions": asked,
        "model": d.model_dir,
        "losses": d.curves,
        "seconds": times,
        "cpu_seconds": cpu,
        "budget": dataclasses.asdict(b),
    }
