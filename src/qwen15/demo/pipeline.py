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
import time
from dataclasses import dataclass
from pathlib import Path

from qwen15.demo import addition
from qwen15.demo.answer import answer
from qwen15.demo.bpe import train_bpe
from qwen15.demo.corpus import python_docs
from qwen15.demo.dataset import pack_documents, stream_rows, write_dataset


@dataclass
class DemoBudget:
    """Sizes and steps; the defaults take about 3 minutes on 2 CPU cores. Small batches and many steps: a model
    this size learns to add after about a million tokens, and needs fewer tokens with more, smaller updates. The
    finetune is sized with margin: held-out accuracy reached 96-100% over seeds 0-2 with 3200 steps."""

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


def _train(settings: dict, echo):
    """`qwen15 train` in this process, with `--key value` overrides built from `settings`."""
    from qwen15.train.config import load_config
    from qwen15.train.trainer import train

    overrides = []
    for key, value in settings.items():
        overrides += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return train(load_config(None, overrides), echo=lambda m: echo("  " + m))


def run_demo(out: Path, budget: DemoBudget | None = None, echo=print) -> dict:
    """Run every stage into `out`; returns a summary (accuracy, paths, seconds per stage)."""
    from qwen15.model import Qwen
    from qwen15.tokenizer import Tokenizer
    from qwen15.train.export import export_hf
    from qwen15.train.metrics import plot_loss_curve, read_metrics, sparkline

    out = Path(out)
    b = budget or DemoBudget()
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    def stage(n: int, title: str) -> None:
        echo(f"\n[{n}/6] {title}")

    cpu: dict[str, float] = {}
    c0 = time.process_time()

    def lap(name: str) -> None:
        nonlocal t0, c0
        times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()

    stage(1, f"tokenizer: byte-level BPE with {b.vocab_size} tokens, trained on the pretraining text")
    docs = python_docs(b.docs_chars)
    # A few rendered conversations teach the vocabulary the ChatML scaffolding (system prompt, role headers),
    # which otherwise costs ~20 tokens per conversation.
    scaffolding = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + q
        + "<|im_end|>\n<|im_start|>assistant\n"
        + a
        for q, a in addition.sample_texts(500, b.seed, b.digits)
    ]
    tokenizer = train_bpe(docs + scaffolding, b.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    tokenizer = Tokenizer.from_pretrained(out / "tokenizer")  # the saved files are what everything else reads
    example = "What is 482 plus 317?"
    echo(f"  {len(docs)} docstrings ({sum(map(len, docs)):,} chars) and 500 example conversations")
    echo(f"  {example!r} -> {[tokenizer.decode([i]) for i in tokenizer.encode(example)]}")
    lap("tokenizer")

    stage(2, "pretraining from random init (qwen15 train, pretrain mode)")
    ids = []
    for text in docs:
        ids += tokenizer.encode(text) + [tokenizer.endoftext_id]
    rows = stream_rows(ids, b.seq_length)
    meta = {"tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": len(tokenizer)}
    write_dataset(out / "data" / "pretrain", rows, type="text", **meta)
    common = {
        "data.seed": b.seed,
        "train.device": "cpu",
        "metrics.plot": False,
        "metrics.tensorboard": False,
        "checkpoint.resume": "never",
        "checkpoint.keep": 1,
    }
    pretrain = _train(
        {
            **common,
            "model.preset": "tiny",  # the architecture; the shape below replaces its sizes
            "model.vocab_size": len(tokenizer),
            "model.hidden_size": b.hidden_size,
            "model.intermediate_size": b.intermediate_size,
            "model.num_hidden_layers": b.num_layers,
            "model.num_attention_heads": b.num_heads,
            "model.num_key_value_heads": b.num_heads,
            "model.max_position_embeddings": b.seq_length,
            "model.tokenizer": out / "tokenizer",
            "model.init_seed": b.seed,
            "data.path": out / "data" / "pretrain",
            "train.run_dir": out / "pretrain",
            **_schedule(b.pretrain_steps, b.pretrain_batch, b.pretrain_lr),
        },
        echo,
    )
    export_hf(pretrain.last_checkpoint, out / "pretrained-hf", dtype="float32", overwrite=True)
    lap("pretrain")

    stage(
        3, "finetuning from the exported Hugging Face folder on chat questions (packed, assistant-only loss)"
    )
    conversations = addition.training_conversations(b.finetune_conversations, b.seed, b.digits)
    docs_ft = [tokenizer.encode_chat(c, loss_on="assistant") for c in conversations]
    tokens, mask, doc_ids = pack_documents(docs_ft, b.seq_length, tokenizer.pad_id)
    write_dataset(out / "data" / "finetune", tokens, mask, doc_ids, type="chat", loss_on="assistant", **meta)
    echo(
        f"  {len(conversations):,} conversations packed into {len(tokens):,} rows of {b.seq_length} tokens, e.g."
    )
    echo(
        "  " + tokenizer.apply_chat_template(conversations[0], tokenize=False).replace("\n", "\n  ").rstrip()
    )
    finetune = _train(
        {
            **common,
            "train.mode": "finetune",
            "model.path": out / "pretrained-hf",
            "data.path": out / "data" / "finetune",
            "train.run_dir": out / "finetune",
            **_schedule(b.finetune_steps, b.finetune_batch, b.finetune_lr),
        },
        echo,
    )
    lap("finetune")

    stage(4, "export to Hugging Face format (qwen15 convert --to hf)")
    export_dir = export_hf(finetune.last_checkpoint, out / "model", dtype="float32", overwrite=True)
    echo(f"  {export_dir}: " + ", ".join(sorted(p.name for p in export_dir.iterdir())))
    lap("export")

    stage(5, "loss curves")
    curves = {}
    for name in ("pretrain", "finetune"):
        records = read_metrics(out / name / "metrics.jsonl")
        losses = [r["loss"] for r in records]
        curves[name] = losses
        png = plot_loss_curve(records, out / f"{name}_loss.png", title=f"{name} loss")
        echo(
            f"  {name:8s} {losses[0]:.2f} {sparkline(losses, 50)} {losses[-1]:.2f}"
            + (f"  ({png})" if png else "")
        )
    lap("plots")

    stage(
        6,
        f"{b.held_out} held-out questions (sums never seen in training), answered through the chat template",
    )
    model = Qwen.from_pretrained(export_dir)
    chat_tokenizer = Tokenizer.from_pretrained(export_dir)
    correct = 0
    questions = addition.held_out_questions(b.held_out, b.seed, b.digits)
    for i, (question, x, y) in enumerate(questions):
        reply = answer(model, chat_tokenizer, question)
        ok = addition.is_correct(reply, x, y)
        correct += ok
        if i < 6:
            echo(f"  Q: {question}\n  A: {reply}   [{'correct' if ok else f'wrong, {x + y}'}]")
    accuracy = correct / len(questions)
    lap("answers")
    total = sum(times.values())
    verdict = "the model learned to add" if accuracy >= 0.9 else "more steps would help"
    echo(f"\naccuracy on held-out questions: {correct}/{len(questions)} = {accuracy:.1%} ({verdict})")
    echo(
        "time: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
        + f"; total {total:.0f}s"
        + f" (CPU time of this process {sum(cpu.values()):.0f}s)"
    )
    echo(f"chat with it: qwen15 chat --model {export_dir}")
    return {
        "accuracy": accuracy,
        "correct": correct,
        "questions": len(questions),
        "model": export_dir,
        "losses": curves,
        "seconds": times,
        "cpu_seconds": cpu,
        "budget": dataclasses.asdict(b),
    }
