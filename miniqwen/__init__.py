"""miniqwen: Qwen2 / Qwen2.5 written from scratch in PyTorch, loading Hugging Face safetensors unchanged."""

from .config import ConfigError, Qwen2Config
from .device import cpu_supports_bf16, default_compute_dtype
from .flop_count import FlopCounter
from .generate import generate, token_ids_for
from .kv_cache import KVCache
from .loading import DEFAULT_MODEL, WeightsError, load_pretrained
from .model import HeadRows, Qwen2ForCausalLM, Qwen2Model
from .packing import PackedLinear, packed_weights
from .tokenizer import QwenTokenizer, chat_prompt

__all__ = [
    "ConfigError", "DEFAULT_MODEL", "FlopCounter", "HeadRows", "KVCache", "PackedLinear", "Qwen2Config",
    "Qwen2ForCausalLM", "Qwen2Model", "QwenTokenizer", "WeightsError", "chat_prompt", "cpu_supports_bf16",
    "default_compute_dtype", "generate", "load_pretrained", "packed_weights", "token_ids_for",
]
