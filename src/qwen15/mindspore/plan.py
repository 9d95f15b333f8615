"""What a conversion maps: MindFormers tensors checked against the model config and matched to Hugging Face names
(fused tensors split by their row order), and the reverse; what is skipped and why goes into a `Summary`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen15.errors import UserError
from qwen15.hf_folder import OutTensor
from qwen15.mindspore import names as N
from qwen15.mindspore.dtypes import FLOATS, convert, storage
from qwen15.mindspore.source import RowSource, row_blocks
from qwen15.model_config import ModelConfig


class MigrationError(UserError):
    """A checkpoint that does not fit the model config or the options; names the file and the tensors."""


@dataclass
class Summary:
    """What a conversion mapped, skipped and why: printed by the command."""

    mapped: int = 0
    fused: int = 0
    dtype: str = ""
    converted_dtype: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"  mapped {self.mapped} tensors ({self.fused} of them split from fused ones), dtype {self.dtype}"
        ]
        if self.converted_dtype:
            out.append(f"  converted to {self.dtype}: {', '.join(sorted(set(self.converted_dtype)))} tensors")
        for why, items in self.skipped.items():
            shown = ", ".join(items[:4]) + (f", ... ({len(items) - 4} more)" if len(items) > 4 else "")
            out.append(f"  skipped {len(items)} {why}: {shown}")
        if self.scalars:
            shown = ", ".join(
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.scalars.items()
            )
            out.append(f"  training values (not part of the model): {shown}")
        return out


def _scalar(t: RowSource) -> Any:
    value = t.read().reshape(-1)
    if t.dtype in FLOATS:
        value = convert(value, t.dtype, "float32")
    return value[0].item() if value.size == 1 else value.tolist()


def plan_from_mindformers(
    cfg: ModelConfig,
    tensors: dict[str, RowSource],
    layout: str | None,
    skip_lora: bool,
    summary: Summary,
    where: str,
) -> list[N.Part]:
    """Check the checkpoint against `cfg` and list the Hugging Face tensors it gives, in transformers' order."""
    expected = N.mindformers_shapes(cfg)
    by_kind: dict[str, list[str]] = {}
    for name, t in tensors.items():
        by_kind.setdefault(N.kind_of(name, t.shape), []).append(name)
    if by_kind.get("unknown"):
        raise MigrationError(
            f"{where}: tensors that are not MindFormers Qwen1.5 weights: {', '.join(by_kind['unknown'][:8])}. "
            "qwen15 reads the Llama-style names MindFormers' Qwen1.5 writes (see docs/migrate.md)"
        )
    if by_kind.get("lora"):
        if not skip_lora:
            raise MigrationError(
                f"{where}: holds {len(by_kind['lora'])} MindFormers LoRA tensors (e.g. {by_kind['lora'][0]}); "
                "pass --skip-lora to convert the base weights alone, and convert the LoRA weights to a PEFT "
                "adapter with --to peft --config THE_LORA_RUN.yaml (docs/migrate.md)"
            )
        summary.skipped["LoRA tensors (--skip-lora)"] = by_kind["lora"]
    if by_kind.get("optimizer"):
        summary.skipped["optimizer-state tensors"] = by_kind["optimizer"]
    for name in by_kind.get("scalar", []):
        summary.scalars[name] = _scalar(tensors[name])

    fused = sorted({N.split_layer(n)[1] for n in by_kind.get("fused", [])})
    if fused and layout is None:
        if N.layout_is_ambiguous(cfg, fused):
            raise MigrationError(
                f"{where}: fused tensors ({', '.join(fused)}) whose row order cannot be read from the file: pass "
                "--qkv-layout concat (MindFormers up to 1.3) or --qkv-layout interleaved (MindFormers 1.4 and "
                "later, per key/value group)"
            )
        layout = "concat"  # one key/value group and no gate/up: both orders are the same
    present: dict[str, tuple[str, np.ndarray | None]] = {}  # unfused name -> (source, rows)
    wrong = []
    for name in by_kind.get("model", []):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        want = expected.get(name)
        if want is None:
            wrong.append(f"{name} (layer beyond num_layers {cfg.num_hidden_layers})")
        elif tuple(tensors[name].shape) != want:
            wrong.append(f"{name}: checkpoint {list(tensors[name].shape)}, config {list(want)}")
        present[name] = (name, None)
    for name in by_kind.get("fused", []):
        n, rest = N.split_layer(name)
        parts = [f"model.layers.{n}.{p}" for p in N.FUSED[rest]]
        if parts[0] not in expected:
            wrong.append(f"{name} (layer beyond num_layers {cfg.num_hidden_layers})")
            continue
        want = (sum(expected[p][0] for p in parts), *expected[parts[0]][1:])
        if tuple(tensors[name].shape) != want:
            wrong.append(f"{name}: checkpoint {list(tensors[name].shape)}, config {list(want)}")
            continue
        for p, rows in zip(parts, N.fused_rows(cfg, rest, layout)):
            if p in present:
                wrong.append(f"{p} is both in {name} and on its own")
            present[p] = (name, rows)
            summary.fused += 1
    missing = [n for n in expected if n not in present]
    if wrong or missing:
        problems = []
        if wrong:
            problems.append("shapes that do not fit: " + "; ".join(wrong[:8]))
        if missing:
            problems.append(
                f"missing: {', '.join(missing[:8])}"
                + (f" ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
            )
        hint = (
            " (an untied config needs lm_head.weight; Qwen1.5-0.5B is tied: tie_word_embeddings: True)"
            if missing == ["lm_head.weight"]
            else ""
        )
        raise MigrationError(
            f"{where}: the checkpoint does not fit the config — {' | '.join(problems)}{hint}"
        )
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        _check_tied(tensors, where)
        summary.skipped["redundant copies of the tied embedding"] = ["lm_head.weight"]
    return [N.Part(N.hf_name(n), *present[n], expected[n]) for n in expected]


def _check_tied(tensors: dict[str, RowSource], where: str) -> None:
    emb, head = tensors["model.tok_embeddings.embedding_weight"], tensors["lm_head.weight"]
    same = emb.shape == head.shape and all(
        np.array_equal(a, b)
        for a, b in zip(row_blocks(emb, None, emb.dtype), row_blocks(head, None, emb.dtype))
    )
    if not same:
        raise MigrationError(
            f"{where}: the config ties the embeddings but lm_head.weight differs from "
            "model.tok_embeddings.embedding_weight; use a config with tie_word_embeddings false"
        )


def plan_to_mindformers(
    cfg: ModelConfig,
    found: dict[str, RowSource],
    dtype: str,
    layout: str | None,
    summary: Summary,
    where: str,
) -> list[OutTensor]:
    """Check Hugging Face tensors against `cfg`; the MindFormers tensors to write, in transformers' order (the
    seed's convert_weight.py order), q/k/v and gate/up fused when `layout` is given."""
    expected = N.mindformers_shapes(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" in found:
        summary.skipped["redundant copies of the tied embedding"] = ["lm_head.weight"]
    by_hf = {N.hf_name(n): n for n in expected}
    missing = [h for h in by_hf if h not in found]
    wrong = [
        f"{h}: file {list(found[h].shape)}, config {list(expected[m])}"
        for h, m in by_hf.items()
        if h in found and tuple(found[h].shape) != expected[m]
    ]
    unknown = sorted(set(found) - set(by_hf) - {"lm_head.weight"})
    unknown = [u for u in unknown if not u.endswith("rotary_emb.inv_freq")]
    if missing or wrong or unknown:
        raise MigrationError(
            f"{where}: the weights do not fit config.json — "
            + " | ".join(
                s
                for s in (
                    f"missing: {', '.join(missing[:8])}" if missing else "",
                    f"shapes: {'; '.join(wrong[:8])}" if wrong else "",
                    f"not Qwen1.5 weights: {', '.join(unknown[:8])}" if unknown else "",
                )
                if s
            )
        )
    out_dtype = found["model.embed_tokens.weight"].dtype if dtype == "auto" else dtype
    src = {m: found[h] for h, m in by_hf.items()}
    records: list[OutTensor] = []
    fused_done = set()
    for name in expected:
        layer = N.split_layer(name)
        group = (
            next((f for f, parts in N.FUSED.items() if layer and layer[1] in parts), None) if layout else None
        )
        if group is None:
            records.append(
                OutTensor(name, expected[name], out_dtype, lambda t=src[name]: row_blocks(t, None, out_dtype))
            )
            continue
        fused_name = f"model.layers.{layer[0]}.{group}"
        if fused_name in fused_done:
            continue
        fused_done.add(fused_name)
        parts = [f"model.layers.{layer[0]}.{p}" for p in N.FUSED[group]]
        shape = (sum(expected[p][0] for p in parts), *expected[parts[0]][1:])
        blocks = functools.partial(_fuse, cfg, group, [src[p] for p in parts], shape, layout, out_dtype)
        records.append(OutTensor(fused_name, shape, out_dtype, blocks))
        summary.fused += len(parts)
    summary.mapped, summary.dtype = len(records), out_dtype
    summary.converted_dtype = [found[h].dtype for h in by_hf if found[h].dtype != out_dtype]
    return records


def _fuse(
    cfg: ModelConfig, group: str, parts: list[RowSource], shape, layout: str, dtype: str
) -> list[np.ndarray]:
    """The fused tensor of a layer as one block (built whole: one layer's q/k/v or gate/up)."""
    fused = np.empty(shape, storage(dtype))
    for part, rows in zip(parts, N.fused_rows(cfg, group, layout)):
        fused[rows] = convert(part.read(), part.dtype, dtype)
    return [fused]
