"""MindFormers' Qwen1.5 parameter names and fused layouts <-> Hugging Face names.

MindFormers runs Qwen1.5 as its Llama model: `model.tok_embeddings.embedding_weight`,
`model.layers.N.attention.{wq,wk,wv,wo}`, `feed_forward.{w1,w2,w3}` (gate, down, up), `attention_norm`, `ffn_norm`,
`model.norm_out.weight`, `lm_head.weight` (absent when tied). With `qkv_concat` it fuses q/k/v into
`attention.w_qkv` and gate/up into `feed_forward.w_gate_hidden`, in one of two row orders: "concat" (MindFormers up
to 1.3: all q rows, then k, then v; all gate rows, then up) or "interleaved" (1.4 and later: per key/value group
its q heads, its k head, its v head; gate and up rows alternating).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from qwen15.model_config import ModelConfig

LAYOUTS = ("concat", "interleaved")
GLOBAL = {
    "model.tok_embeddings.embedding_weight": "model.embed_tokens.weight",
    "model.norm_out.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LAYER = {  # within model.layers.N.
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
FUSED = {  # fused MindFormers tensor -> the unfused ones it holds, in concat order
    "attention.w_qkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "attention.w_qkv.bias": ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias"),
    "feed_forward.w_gate_hidden.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moment1.", "moment2.", "exp_avg.", "exp_avg_sq.")
LORA_MARK = "mindpet_delta_lora"
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[int, str] | None:
    m = _LAYER_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def kind_of(name: str, shape: tuple[int, ...]) -> str:
    """'model', 'fused', 'lora', 'optimizer', 'scalar' (training counters and the like) or 'unknown'."""
    if name.startswith(OPTIMIZER_PREFIXES):  # also the moments of LoRA tensors
        return "optimizer"
    if LORA_MARK in name:
        return "lora"
    if name in GLOBAL:
        return "model"
    layer = split_layer(name)
    if layer is not None:
        if layer[1] in LAYER:
            return "model"
        if layer[1] in FUSED:
            return "fused"
    if len(shape) == 0 or shape == (1,):
        return "scalar"
    return "unknown"


def mindformers_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Unfused MindFormers name -> shape, in the order transformers lists the parameters."""
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_layer = {
        "attention.wq.weight": (h, h),
        "attention.wq.bias": (h,),
        "attention.wk.weight": (kv, h),
        "attention.wk.bias": (kv,),
        "attention.wv.weight": (kv, h),
        "attention.wv.bias": (kv,),
        "attention.wo.weight": (h, h),
        "feed_forward.w1.weight": (i, h),
        "feed_forward.w3.weight": (i, h),
        "feed_forward.w2.weight": (h, i),
        "attention_norm.weight": (h,),
        "ffn_norm.weight": (h,),
    }
    out = {"model.tok_embeddings.embedding_weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        out.update({f"model.layers.{n}.{k}": v for k, v in per_layer.items()})
    out["model.norm_out.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


def hf_name(mf_name: str) -> str:
    if mf_name in GLOBAL:
        return GLOBAL[mf_name]
    n, rest = split_layer(mf_name)
    return f"model.layers.{n}.{LAYER[rest]}"


def fused_rows(cfg: ModelConfig, fused: str, layout: str) -> list[np.ndarray]:
    """For fused tensor `fused` (a key of FUSED): the rows of the fused tensor that hold each of its parts."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if fused.startswith("feed_forward."):
        i = cfg.intermediate_size
        if layout == "concat":
            return [np.arange(i), np.arange(i, 2 * i)]
        return [np.arange(0, 2 * i, 2), np.arange(1, 2 * i, 2)]
    d, groups, rep = cfg.head_dim, cfg.num_key_value_heads, cfg.num_key_value_groups
    h, kv = cfg.hidden_size, groups * d
    if layout == "concat":
        return [np.arange(h), np.arange(h, h + kv), np.arange(h + kv, h + 2 * kv)]
    group = (rep + 2) * d  # rows of one group: its rep q heads, its k head, its v head
    q = (np.arange(h) // (rep * d)) * group + np.arange(h) % (rep * d)
    k = (np.arange(kv) // d) * group + rep * d + np.arange(kv) % d
    return [q, k, k + d]


def layout_is_ambiguous(cfg: ModelConfig, fused_names: list[str]) -> bool:
    """Whether the two row orders differ for these fused tensors (with one key/value group q/k/v do not)."""
    return any(n.startswith("feed_forward.") or cfg.num_key_value_heads > 1 for n in fused_names)


@dataclass
class Part:
    """One Hugging Face tensor: rows `rows` (None: all) of checkpoint tensor `source`."""

    hf_name: str
    source: str
    rows: np.ndarray | None
    shape: tuple[int, ...]
