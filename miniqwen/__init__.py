"""miniqwen: Qwen2 / Qwen2.5 written from scratch in PyTorch, loading Hugging Face safetensors unchanged."""

from .config import ConfigError, Qwen2Config
from .flops import FlopCounter
from .generate import generate, token_ids_for
from .loading import DEFAULT_MODEL, WeightsError, load_pretrained
from .model import KVCache, Qwen2ForCausalLM
from .tokenizer import QwenTokenizer, chat_prompt

__all__ = [
    "ConfigError", "DEFAULT_MODEL", "FlopCounter", "KVCache", "Qwen2Config", "Qwen2ForCausalLM", "QwenTokenizer",
    "WeightsError", "chat_prompt", "generate", "load_pretrained", "token_ids_for",
]
