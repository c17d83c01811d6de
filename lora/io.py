"""Save / load LoRA adapters, and export them in PEFT's format.

Our format (a directory)::

    adapter.safetensors    only the LoRA tensors, keyed by module path:
                           model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
                           model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]   …
    adapter_config.json    {"format": "miniqwen-lora", "version": 1, "rank": 4, "alpha": 4,
                            "targets": ["q_proj", "v_proj"], "base_model": "Qwen/Qwen2.5-0.5B-Instruct" | null}

PEFT's format (:func:`export_peft`), what ``peft.PeftModel.from_pretrained(base, dir)`` reads (PEFT's
``save_pretrained`` writes the same two files)::

    adapter_model.safetensors   keys "base_model.model." + module path, e.g.
                                base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
                                (PeftModel wraps the LoraModel as ``base_model``, which wraps the transformers
                                model as ``model``; the adapter name "default" is not part of saved keys)
    adapter_config.json         LoraConfig fields: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
                                target_modules, lora_dropout 0, bias "none", fan_in_fan_out false (weights are
                                stored [out, in] like nn.Linear), use_rslora false (scale = alpha / r, as ours),
                                use_dora false, init_lora_weights true, inference_mode true,
                                base_model_name_or_path, modules_to_save null

Safetensors only: no pickled objects are written or read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from miniqwen.atomic import atomic_write
from miniqwen.loading import describe_mismatch

from .layers import LoRALinear, apply_lora, lora_modules

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
FORMAT = "miniqwen-lora"


class AdapterError(RuntimeError):
    """An adapter directory that is missing, unreadable, or does not fit the model."""


def lora_settings(model: nn.Module) -> dict:
    """``{"rank", "alpha", "targets"}`` shared by all of ``model``'s adapters.

    Raises AdapterError if the model has no LoRA layers or they differ in rank/alpha.
    """
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("model has no LoRA layers (call lora.apply_lora first)")
    ranks = {(m.rank, m.alpha) for m in modules.values()}
    if len(ranks) != 1:
        raise AdapterError(f"LoRA layers differ in (rank, alpha): {sorted(ranks)}; one setting is supported")
    (rank, alpha), = ranks
    targets = []
    for name in modules:
        t = name.rsplit(".", 1)[-1]
        if t not in targets:
            targets.append(t)
    return {"rank": rank, "alpha": alpha, "targets": targets}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model``: ``{"<module path>.lora_A.weight": [r, in], "….lora_B.weight": [out, r]}``
    (detached, contiguous, on CPU; the live tensors are not shared)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous().clone()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous().clone()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy ``state`` (keys as in :func:`lora_state_dict`) into ``model``'s LoRA layers, checking exactly.

    Raises AdapterError listing missing keys, unexpected keys and shape mismatches; nothing is copied then.
    Raises RuntimeError if a layer is merged (unmerge first: the merged weight holds the old update).
    """
    params = {}
    for name, m in lora_modules(model).items():
        if m.merged:
            raise RuntimeError(f"{name} is merged; unmerge before loading new LoRA weights")
        params[f"{name}.lora_A.weight"] = m.lora_A.weight
        params[f"{name}.lora_B.weight"] = m.lora_B.weight
    problems = describe_mismatch({k: p.shape for k, p in params.items()}, state, "adapter", "model", limit=6)
    if problems:
        raise AdapterError("\n".join([f"{source}: LoRA weights do not fit the model", *problems]))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s adapter to ``out_dir`` (created if needed) as ``adapter.safetensors`` +
    ``adapter_config.json`` (format in the module docstring); each file is replaced atomically.

    ``state`` (keys as :func:`lora_state_dict`), if given, is written instead of the model's current LoRA weights
    (e.g. a copy kept at the best validation loss); its keys and shapes are checked against the model.

    Returns the directory. Raises AdapterError if the model has no (or mixed) LoRA layers or ``state`` does not fit.
    """
    out_dir = Path(out_dir)
    settings = lora_settings(model)
    current = lora_state_dict(model)
    if state is None:
        state = current
    elif set(state) != set(current) or any(state[k].shape != current[k].shape for k in current):
        raise AdapterError("save_adapter: the given LoRA state does not fit the model's LoRA layers")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    _write_json(out_dir / ADAPTER_CONFIG, {"format": FORMAT, "version": 1, **settings, "base_model": base_model})
    return out_dir


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of one of our adapter directories. Raises AdapterError if absent/invalid."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter config (is this an adapter directory?)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path}: cannot read adapter config: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        hint = " (this looks like a PEFT adapter)" if isinstance(config, dict) and "peft_type" in config else ""
        raise AdapterError(f"{path}: not a {FORMAT} adapter config{hint}")
    for key in ("rank", "alpha", "targets"):
        if key not in config:
            raise AdapterError(f"{path}: missing {key!r}")
    return config


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> dict[str, LoRALinear]:
    """Load an adapter saved by :func:`save_adapter` into ``model``.

    A model without LoRA layers gets them first (:func:`lora.apply_lora` with the saved rank, alpha and
    targets, which also freezes the model); a model that has them must have the same settings.

    Returns ``{module path: LoRALinear}``. Raises AdapterError for a missing/invalid directory, different
    settings, or weights that do not fit (missing/unexpected keys, wrong shapes).
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    try:
        state = load_file(str(weights))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: cannot read adapter weights ({err})") from None
    if not lora_modules(model):
        apply_lora(model, config["rank"], config["alpha"], config["targets"])
    settings = lora_settings(model)
    saved = {"rank": config["rank"], "alpha": config["alpha"], "targets": list(config["targets"])}
    if (settings["rank"], settings["alpha"], sorted(settings["targets"])) != (
            saved["rank"], saved["alpha"], sorted(saved["targets"])):
        raise AdapterError(f"{adapter_dir}: adapter settings {saved} differ from the model's LoRA layers {settings}")
    load_lora_state_dict(model, state, source=str(weights))
    return lora_modules(model)


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None) -> Path:
    """Write ``model``'s adapter in PEFT's LoRA format (``adapter_model.safetensors`` + ``adapter_config.json``)
    so that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` reproduces our
    adapted model (tested to 1e-5 in fp32 against transformers + peft).

    Args:
        model: a model with LoRA layers (not merged).
        out_dir: directory to write (created if needed).
        base_model_name_or_path: recorded in the config (Hub id or path of the base weights), as PEFT does.

    Returns the directory. Raises AdapterError if the model has no (or mixed) LoRA layers; RuntimeError if merged.
    Key naming and config fields: see the module docstring.
    """
    out_dir = Path(out_dir)
    settings = lora_settings(model)
    if any(m.merged for m in lora_modules(model).values()):
        raise RuntimeError("export_peft: unmerge the LoRA layers first (PEFT adds the update itself)")
    state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "target_modules": settings["targets"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / PEFT_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    _write_json(out_dir / PEFT_CONFIG, config)
    return out_dir
