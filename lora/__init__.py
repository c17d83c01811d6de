"""LoRA for miniqwen (Hu et al. 2021): adapters on frozen linear layers, their FLOPs, save/load and PEFT export;
an optional trainable ``lm_head`` bias trained and saved with them (:mod:`lora.head_bias`).

Depends on :mod:`miniqwen` only to report FLOPs into the same counter and for the projection names
(:data:`miniqwen.config.PROJECTIONS`); miniqwen never imports this package. :data:`DEFAULT_LORA_TARGETS` (q_proj,
v_proj) is the projections adapted when none are named.
"""

from .head_bias import BiasedHead, add_head_bias, get_head_bias, has_head_bias, load_peft_head_bias, remove_head_bias
from .io import (
    AdapterError,
    export_peft,
    load_adapter,
    load_lora_state_dict,
    load_peft,
    lora_settings,
    lora_state_dict,
    read_adapter_config,
    read_peft_config,
    save_adapter,
)
from .layers import (
    DEFAULT_LORA_TARGETS,
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
    "AdapterError", "BiasedHead", "DEFAULT_LORA_TARGETS", "LoRALinear", "add_head_bias", "apply_lora",
    "count_trainable_parameters", "export_peft", "get_head_bias", "has_head_bias", "load_adapter",
    "load_peft_head_bias", "remove_head_bias", "load_lora_state_dict", "load_peft", "lora_modules",
    "lora_parameter_count", "lora_settings", "lora_state_dict", "merge_lora", "merged", "read_adapter_config",
    "read_peft_config", "remove_lora", "save_adapter", "unmerge_lora",
]
