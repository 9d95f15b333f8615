"""Model shapes: the ModelConfig dataclass, the built-in size presets, and Hugging Face config.json in and out."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen15.errors import UserError

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
TOKENIZER_VOCAB = 151646  # tokens the tokenizer knows; embedding rows beyond this are padding
IGNORE_INDEX = -100  # the label of a token that carries no loss (torch's cross_entropy default)
# Qwen1.5-Chat's sampling settings (its generation_config.json sets top_p and repetition_penalty; the model cards
# recommend temperature 0.7 and top_k 20): used wherever a chat model samples without its own values.
CHAT_SAMPLING = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1}
_SHAPE = {"shape": True}  # field metadata: the key changes the architecture (a resume must match it)


class ConfigError(UserError):
    """A model configuration that cannot describe a Qwen1.5 model; the message says where and what to do."""


@dataclass
class ModelConfig:
    hidden_size: int = field(metadata=_SHAPE)
    intermediate_size: int = field(metadata=_SHAPE)
    num_hidden_layers: int = field(metadata=_SHAPE)
    num_attention_heads: int = field(metadata=_SHAPE)
    num_key_value_heads: int = field(metadata=_SHAPE)
    vocab_size: int = field(default=151936, metadata=_SHAPE)
    max_position_embeddings: int = field(default=32768, metadata=_SHAPE)
    rope_theta: float = field(default=1e6, metadata=_SHAPE)
    rms_norm_eps: float = field(default=1e-6, metadata=_SHAPE)
    tie_word_embeddings: bool = field(default=False, metadata=_SHAPE)
    bos_token_id: int | None = ENDOFTEXT_ID
    eos_token_id: int | list[int] | None = ENDOFTEXT_ID
    torch_dtype: str = "bfloat16"
    # Extra config.json keys that do not change the computation (kept so that an export round-trips them).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self, where: str = "model config") -> None:
        for name in (f.name for f in dataclasses.fields(self) if f.metadata.get("shape") and f.type == "int"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: '{name}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{where}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; head_dim must be a whole number"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not self.rope_theta > 0:
            raise ConfigError(f"{where}: 'rope_theta' must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"{where}: 'rms_norm_eps' must be positive, got {self.rms_norm_eps!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_params(self, include_embedding: bool = True) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        attn = h * h + 2 * h * kv + (h + 2 * kv) + h * h
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        total = self.num_hidden_layers * per_layer + h
        if include_embedding:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as a Qwen1.5 checkpoint carries it (loadable by transformers 4.37+ and 5.x)."""
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "model_type": "qwen2",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], where: str = "config.json") -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in ("qwen2", None):
            raise ConfigError(
                f"{where}: model_type is {model_type!r}; qwen15 reads Qwen1.5 checkpoints (model_type 'qwen2')"
            )
        quant = data.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else None
            if method == "qwen15":
                raise ConfigError(
                    f"{where}: this folder holds qwen15 {quant.get('weights', 'quantized')} weights (written by "
                    "`qwen15 convert --quantize`); load it with qwen15.quantize.load_quantized(folder), or give it "
                    "to `qwen15 generate` / `qwen15 chat` as --model"
                )
            raise ConfigError(
                f"{where}: the weights are quantized with {method!r}, which qwen15 does not read; use the "
                "unquantized checkpoint (qwen15 quantizes it itself: --quantize int8 or int4)"
            )
        unknown = sorted(set(data) - _HF_USED - _HF_IGNORED)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}. qwen15 reads Qwen1.5 (qwen2) configs; "
                "remove the key(s) if they do not change the architecture"
            )
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (Qwen1.5 uses 'silu')")
        if data.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window true is not supported (no Qwen1.5 model uses it)")
        rope_scaling = data.get("rope_scaling")
        rope_params = data.get("rope_parameters") or {}
        rope_type = (
            (rope_scaling or {}).get("type")
            or (rope_scaling or {}).get("rope_type")
            or rope_params.get("rope_type", "default")
        )
        if rope_type != "default":
            raise ConfigError(
                f"{where}: rope scaling {rope_type!r} is not supported; Qwen1.5 uses plain RoPE"
            )
        for flag in ("attention_bias",):
            if flag in data and data[flag] is False:
                raise ConfigError(f"{where}: '{flag}': false is not Qwen1.5 (q/k/v projections have a bias)")
        if (
            "head_dim" in data
            and data["head_dim"] is not None
            and "hidden_size" in data
            and "num_attention_heads" in data
            and data["head_dim"] * data["num_attention_heads"] != data["hidden_size"]
        ):
            raise ConfigError(
                f"{where}: head_dim {data['head_dim']} x num_attention_heads "
                f"{data['num_attention_heads']} != hidden_size {data['hidden_size']}"
            )
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in data
        ]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
        dtype = data.get("torch_dtype") or data.get("dtype") or "bfloat16"
        shape = {k: data[k] for k in SHAPE_KEYS if data.get(k) is not None}
        shape.setdefault("num_key_value_heads", data["num_attention_heads"])
        shape["rope_theta"] = data.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        try:
            shape["rope_theta"] = float(shape["rope_theta"])
            shape["rms_norm_eps"] = float(shape.get("rms_norm_eps", 1e-6))
            shape["tie_word_embeddings"] = bool(shape.get("tie_word_embeddings", False))
            return cls(
                **shape,
                bos_token_id=data.get("bos_token_id"),
                eos_token_id=data.get("eos_token_id"),
                torch_dtype=str(dtype),
                extra={k: data[k] for k in _HF_KEPT_EXTRA if k in data},
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("model config", where)) from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; a Hugging Face model folder needs a config.json") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
        return cls.from_hf_dict(data, where=str(path))

    def save_json(self, path: str | Path) -> None:
        from qwen15.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(), indent=2) + "\n")


# The keys that change the architecture (a resume or a loaded checkpoint must match them).
SHAPE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("shape"))
# Keys of a qwen2 config.json that we read.
_HF_USED = {
    *SHAPE_KEYS,
    "rope_parameters",
    "rope_scaling",
    "bos_token_id",
    "eos_token_id",
    "torch_dtype",
    "dtype",
    "hidden_act",
    "model_type",
    "use_sliding_window",
    "head_dim",
    "attention_bias",
}
# Keys that do not change the computation for Qwen1.5 (bookkeeping, training-only or inert settings).
_HF_IGNORED = {
    "architectures",
    "attention_dropout",
    "initializer_range",
    "max_window_layers",
    "sliding_window",
    "use_cache",
    "transformers_version",
    "layer_types",
    "pad_token_id",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "is_encoder_decoder",
    "auto_map",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "chunk_size_feed_forward",
    "torchscript",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "emb_dropout",
    "pretraining_tp",
}
_HF_KEPT_EXTRA = ("_name_or_path",)


def _preset(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, theta: float = 1e6
) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        rope_theta=theta,
    )


# Shapes from the published config.json files (see docs: QWEN15.md); always prefer a checkpoint's own config.json.
PRESETS: dict[str, ModelConfig] = {
    "qwen1.5-0.5b": _preset(1024, 2816, 24, 16, 16, 151936, True),
    "qwen1.5-1.8b": _preset(2048, 5504, 24, 16, 16, 151936, False),
    "qwen1.5-4b": _preset(2560, 6912, 40, 20, 20, 151936, False, theta=5e6),
    "qwen1.5-7b": _preset(4096, 11008, 32, 32, 32, 151936, False),
    "qwen1.5-14b": _preset(5120, 13696, 40, 40, 40, 152064, False),
    "qwen1.5-32b": _preset(5120, 27392, 64, 40, 8, 152064, False),
    "qwen1.5-72b": _preset(8192, 24576, 80, 64, 64, 152064, False),
    "qwen1.5-110b": _preset(8192, 49152, 80, 64, 8, 152064, False),
    # Tiny shapes for tests and CPU demos, one per family: tied head_dim 64 (0.5B-like), untied MHA head_dim 128,
    # GQA (32B/110B-like). They keep the real vocabulary so that the real tokenizer fits them.
    "tiny": _preset(128, 352, 2, 2, 2, 151936, True),
    "tiny-mha": _preset(256, 512, 2, 2, 2, 151936, False),
    "tiny-gqa": _preset(256, 512, 2, 4, 2, 151936, False),
}


def get_preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[key])
