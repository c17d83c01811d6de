"""LoRA for miniqwen (Hu et al. 2021): adapters on frozen linear layers, their FLOPs, save/load and PEFT export.

Depends on :mod:`miniqwen` only to report FLOPs into the same counter; miniqwen never imports this package.
"""

from .io import (
    AdapterError,
    export_peft,
    load_adapter,
    load_lora_state_dict,
    lora_settings,
    lora_state_dict,
    read_adapter_config,
    save_adapter,
)
from .layers import (
    LoRALinear,
    apply_lora,
    count_trainable_parameters,
    lora_modules,
    lora_parameter_count,
    merge_lora,
    merged,
    remove_lora,
    unmerge_lora,
)

__all__ = [
    "AdapterError", "LoRALinear", "apply_lora", "count_trainable_parameters", "export_peft", "load_adapter",
    "load_lora_state_dict", "lora_modules", "lora_parameter_count", "lora_settings", "lora_state_dict",
    "merge_lora", "merged", "read_adapter_config", "remove_lora", "save_adapter", "unmerge_lora",
]
