"""Qwen2 configuration, with the field names of Hugging Face's ``config.json`` for ``model_type: "qwen2"``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A ``config.json`` that is missing, unreadable, not Qwen2, or inconsistent."""


@dataclass
class Qwen2Config:
    """Hyperparameters of a Qwen2 / Qwen2.5 decoder (defaults: Qwen2.5-0.5B-Instruct).

    Field names and meanings follow transformers' ``Qwen2Config`` so a HF ``config.json`` maps onto it directly:
    ``hidden_size`` d, ``intermediate_size`` I (SwiGLU width), ``num_attention_heads`` Hq,
    ``num_key_value_heads`` Hkv (grouped-query attention: Hq must be a multiple of Hkv), head_dim = d / Hq
    unless ``head_dim`` is given, ``rope_theta`` the RoPE base, ``rms_norm_eps`` the RMSNorm epsilon.
    """

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    torch_dtype: str | None = "bfloat16"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention needs it)"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Qwen2Config":
        """Build from a HF config dict.

        ``rope_theta`` may sit at top level (transformers < 5) or in ``rope_parameters`` (transformers 5);
        unknown keys are ignored. Raises :class:`ConfigError` if ``model_type`` is present and not ``"qwen2"``,
        or a field is missing/invalid; the message names ``source``.
        """
        model_type = raw.get("model_type")
        if model_type is not None and model_type != "qwen2":
            raise ConfigError(f"{source}: model_type is {model_type!r}, but miniqwen implements only 'qwen2'")
        raw = dict(raw)
        if "rope_theta" not in raw and isinstance(raw.get("rope_parameters"), dict):
            if "rope_theta" in raw["rope_parameters"]:
                raw["rope_theta"] = raw["rope_parameters"]["rope_theta"]
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2Config":
        """Read a HF ``config.json``. Raises :class:`ConfigError` naming the file when missing or not JSON."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face model directory?)") from None
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read config: {err}") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        """The fields as a HF-style dict (``model_type`` included), e.g. to write a ``config.json``."""
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **asdict(self)}
