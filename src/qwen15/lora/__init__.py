"""LoRA: low-rank adapters on the attention and MLP projections, applied from outside the model.

modules.py (LoRALinear, add_adapters, init, fusion, merging), peft_format.py (PEFT's adapter folders out and in,
load_adapter), merge.py (a base folder + an adapter folder -> a merged Hugging Face folder). Training with adapters
is `qwen15 train` with a `lora:` section (qwen15.train), their tensor-parallel split is in qwen15.parallel.
"""

from qwen15.lora.merge import merge_adapter_folder
from qwen15.lora.modules import (
    TARGETS,
    LoRAError,
    LoRALinear,
    LoRASpec,
    adapter_parameters,
    add_adapters,
    merge_adapters,
)
from qwen15.lora.peft_format import AdapterError, load_adapter, read_adapter, save_adapter

__all__ = [
    "TARGETS",
    "AdapterError",
    "LoRAError",
    "LoRALinear",
    "LoRASpec",
    "add_adapters",
    "adapter_parameters",
    "load_adapter",
    "merge_adapter_folder",
    "merge_adapters",
    "read_adapter",
    "save_adapter",
]
