"""Qwen2 configuration, with the field names of Hugging Face's ``config.json`` for ``model_type: "qwen2"``."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A ``config.json`` that is missing, unreadable, not Qwen2, or inconsistent.

    The message names the file (when there is one), the field and the offending value.
    """


#: The linear layers of one decoder layer, by their Hugging Face names: the attention's four projections, then the
#: MLP's three (``model.layers.<i>.self_attn.q_proj`` …, ``model.layers.<i>.mlp.gate_proj`` …).
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")
_POSITIVE_REALS = ("rope_theta", "rms_norm_eps")
_TOKEN_IDS = ("bos_token_id", "eos_token_id")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class Qwen2Config:
    """Hyperparameters of a Qwen2 / Qwen2.5 decoder (defaults: Qwen2.5-0.5B-Instruct).

    Field names and meanings follow transformers' ``Qwen2Config`` so a HF ``config.json`` maps onto it directly:
    ``hidden_size`` d, ``intermediate_size`` I (SwiGLU width), ``num_attention_heads`` Hq,
    ``num_key_value_heads`` Hkv (grouped-query attention: Hq must be a multiple of Hkv), head_dim = d / Hq
    unless ``head_dim`` is given, ``rope_theta`` the RoPE base, ``rms_norm_eps`` the RMSNorm epsilon.

    Every field is checked on construction: sizes and head counts are positive integers (not bools, not strings),
    ``rope_theta`` and ``rms_norm_eps`` positive finite numbers, ``head_dim`` even (RoPE rotates pairs), Hq a
    multiple of Hkv, d divisible by Hq when head_dim is derived. Raises :class:`ConfigError` naming the field and
    its value otherwise.
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
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in _POSITIVE_REALS:
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in _TOKEN_IDS:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer or null, got {value!r}")
            setattr(self, name, None if value is None else int(value))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(f"torch_dtype must be a string or null, got {self.torch_dtype!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                    " (head_dim = hidden_size / num_attention_heads must be an integer, or give head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        elif not _is_int(self.head_dim) or self.head_dim <= 0:
            raise ConfigError(f"head_dim must be a positive integer or null, got {self.head_dim!r}")
        self.head_dim = int(self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs of dimensions)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention needs it)"
            )

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Qwen2Config":
        """Build from a HF config dict.

        ``rope_theta`` may sit at top level (transformers < 5) or in ``rope_parameters`` (transformers 5; if both
        are given they must agree); ``num_key_value_heads`` null means ``num_attention_heads`` (as in transformers);
        ``eos_token_id`` may be a list (its first id is used). Unknown keys are ignored, except those that would
        change the model's arithmetic in ways miniqwen does not implement.

        Raises:
            ConfigError: naming ``source``, when ``raw`` is not a dict; ``model_type`` is present and not
                ``"qwen2"``; a field is missing its right type or value (see :class:`Qwen2Config`); or the config
                asks for RoPE scaling (``rope_scaling`` / ``rope_parameters.rope_type`` other than ``"default"``),
                sliding-window attention, or quantized weights — all of which miniqwen would otherwise silently
                ignore, giving wrong results.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type is not None and model_type != "qwen2":
            raise ConfigError(f"{source}: model_type is {model_type!r}, but miniqwen implements only 'qwen2'")
        problem = _unsupported(raw)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        raw = dict(raw)
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            if raw.get("rope_theta") is None:
                raw["rope_theta"] = rope["rope_theta"]
            elif raw["rope_theta"] != rope["rope_theta"]:
                raise ConfigError(f"{source}: rope_theta {raw['rope_theta']!r} disagrees with "
                                  f"rope_parameters.rope_theta {rope['rope_theta']!r}")
        if "num_key_value_heads" in raw and raw["num_key_value_heads"] is None:
            raw["num_key_value_heads"] = raw.get("num_attention_heads", cls.num_attention_heads)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if isinstance(kwargs.get("eos_token_id"), list):
            if not kwargs["eos_token_id"]:
                raise ConfigError(f"{source}: eos_token_id is an empty list")
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2Config":
        """Read a HF ``config.json``.

        Raises:
            ConfigError: naming the file, when it is missing, unreadable, not UTF-8, not JSON, not a JSON object,
                or not a valid Qwen2 config (see :meth:`from_dict`).
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face model directory?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read config, not a JSON file: {err}") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        """The fields as a HF-style dict (``model_type`` included), e.g. to write a ``config.json``."""
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **asdict(self)}


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of the linear layers of one decoder layer, in :data:`PROJECTIONS`
    order, for a :class:`Qwen2Config` (or anything with its size fields). With d = ``hidden_size``, I =
    ``intermediate_size``, D = ``head_dim``, Hq / Hkv query / key-value heads: q_proj d → Hq·D, k_proj and v_proj
    d → Hkv·D (grouped-query attention), o_proj Hq·D → d, gate_proj and up_proj d → I, down_proj I → d."""
    d, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    return {"q_proj": (d, Hq * D), "k_proj": (d, Hkv * D), "v_proj": (d, Hkv * D), "o_proj": (Hq * D, d),
            "gate_proj": (d, I), "up_proj": (d, I), "down_proj": (I, d)}


def _unsupported(raw: dict) -> str | None:
    """Why the HF config ``raw`` asks for something miniqwen does not implement, or None."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = raw.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            return f"{key} must be an object or null, got {rope!r}"
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default"):
            return f"{key} asks for RoPE scaling {rope_type!r}, which miniqwen does not implement (plain RoPE only)"
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            return (f"layer_types {layer_types!r} asks for attention other than 'full_attention' on some layers; "
                    "miniqwen implements full attention only")
    elif raw.get("use_sliding_window"):
        return "use_sliding_window is true, but miniqwen implements full attention only"
    if raw.get("quantization_config") is not None:
        return "quantization_config is set: quantized checkpoints are not supported (give dequantized weights)"
    return None
