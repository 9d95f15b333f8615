"""qwen15: a PyTorch-native toolkit for the Qwen1.5 language models.

from qwen15 import Qwen, Tokenizer, generate, prepare_for_inference
model = prepare_for_inference(Qwen.from_pretrained("Qwen1.5-0.5B-Chat"))  # for generation
tokenizer = Tokenizer.from_pretrained("Qwen1.5-0.5B-Chat")
load_adapter(Qwen.from_pretrained(BASE), ADAPTER_DIR)  # a PEFT LoRA adapter, before prepare_for_inference
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imported on first use, so that `qwen15 --help` and light tools start without loading torch.
_LAZY = {
    "Qwen": "qwen15.model",
    "KVCache": "qwen15.model",
    "ModelConfig": "qwen15.model_config",
    "get_preset": "qwen15.model_config",
    "PRESETS": "qwen15.model_config",
    "Tokenizer": "qwen15.tokenizer",
    "generate": "qwen15.generation",
    "stream_generate": "qwen15.generation",
    "prepare_for_inference": "qwen15.prepare",
    "load_adapter": "qwen15.lora.peft_format",
    "save_adapter": "qwen15.lora.peft_format",
    "merge_adapters": "qwen15.lora.modules",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen15' has no attribute {name!r}")
