"""Training metrics: a log line every N steps, metrics.jsonl, TensorBoard when installed, the loss curve at the end,
and model FLOPs utilisation (MFU) from the model shape and the device's peak."""

from __future__ import annotations

import io
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from qwen15.atomic import atomic_write_bytes, atomic_write_text
from qwen15.model_config import ModelConfig

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor data sheets, without sparsity). Matched in order against
# torch.cuda.get_device_name(); set metrics.peak_tflops for anything else.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM and NVL
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
]


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device for MFU: the configured value, else the table for known GPUs, else None."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS:
            if key in name:
                return value
    return None


def flops_per_token(config: ModelConfig, seq_length: int, weight_gradients: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x (parameters in matmuls, lm_head included,
    embedding lookup excluded) + the attention matmuls, 12 x layers x hidden x seq (QK^T and AV, forward and
    backward, counted for the full square as is conventional, as in the PaLM paper's MFU). Without weight
    gradients (a frozen base under LoRA; the adapters' own FLOPs are negligible) the matmuls cost 4x, not 6x."""
    matmul_params = config.num_params(include_embedding=False) + config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_length
    return (6.0 if weight_gradients else 4.0) * matmul_params + attention


def memory_gb(device: torch.device) -> float:
    """Peak memory: allocated by torch on a GPU, resident set of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger (same calls, nothing written)."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int, echo=print):
        self.enabled = enabled
        self.echo = echo
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines so every step appears once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def line(self, r: dict[str, Any], total_steps: int) -> None:
        if not self.enabled:
            return
        parts = [
            f"step {r['step']}/{total_steps}",
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.3e}",
            f"grad_norm {r['grad_norm']:.3f}",
            f"tok/s/dev {r['tokens_per_s_per_device']:,.0f}",
        ]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts += [f"mem {r['memory_gb']:.2f}GB", f"eta {format_duration(r['eta_s'])}"]
        self.echo(" | ".join(parts))

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class StepTimer:
    """Seconds per step, excluding the first step after (re)start (compilation, allocator warm-up) when there
    are others."""

    def __init__(self):
        self.times: list[float] = []
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        self.times.append(dt)
        return dt

    def mean(self) -> float:
        steady = self.times[1:] or self.times
        return sum(steady) / len(steady)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_loss_curve(records: list[dict[str, Any]], png: Path, title: str = "training loss") -> Path | None:
    """Loss against step as a PNG (when matplotlib is installed; returns None otherwise). The Figure API draws
    without pyplot, so no global backend is switched under a notebook or GUI that imported this."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token-mean cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png, buf.getvalue())
    return png


def sparkline(values: list[float], width: int = 60) -> str:
    """A one-line text plot (for terminals without a PNG viewer): the mean of each of `width` equal spans."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:]) if b > a]
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(bars[min(len(bars) - 1, int((v - lo) / span * (len(bars) - 1) + 0.5))] for v in values)
