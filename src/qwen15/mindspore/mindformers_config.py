"""Model shapes from a MindFormers YAML (its `model.model_config` section) or a Hugging Face config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen15.model_config import ConfigError, ModelConfig

# model_config key -> ModelConfig field (keys the seed's Qwen1.5 YAMLs use; both spellings of max positions)
KEYS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "rms_norm_eps": "rms_norm_eps",
    "theta": "rope_theta",
    "max_position_embedding": "max_position_embeddings",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
REQUIRED = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size")


def load_model_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(shapes, the YAML's model_config or {} for a config.json) from either kind of file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass the MindFormers YAML or the config.json of the model")
    if path.suffix == ".json":
        return ModelConfig.from_json_file(path), {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    section = (data or {}).get("model", {}).get("model_config") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: no model.model_config section; pass a MindFormers Qwen1.5 YAML (e.g. "
            "predict_qwen1_5_7b.yaml) or a Hugging Face config.json"
        )
    missing = [k for k in REQUIRED if section.get(k) is None]
    if missing:
        raise ConfigError(f"{path}: model.model_config lacks {', '.join(missing)}")
    fields: dict[str, Any] = {}
    for key, name in KEYS.items():
        if section.get(key) is not None:
            fields[name] = section[key]
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    for name in ("rms_norm_eps", "rope_theta"):
        if name in fields:
            fields[name] = float(fields[name])
    try:
        return ModelConfig(**fields), section
    except ConfigError as e:
        raise ConfigError(f"{path}: model.model_config: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{path}: model.model_config: {e}") from None
