"""Save / load LoRA adapters, and export them in PEFT's format.

Our format (a directory)::

    adapter.safetensors    only the LoRA tensors, keyed by module path:
                           model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
                           model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]   …
                           lm_head.bias   [vocab]   only with a trainable head bias (:mod:`lora.head_bias`)
    adapter_config.json    {"format": "miniqwen-lora", "version": 1, "rank": 4, "alpha": 4,
                            "targets": ["q_proj", "v_proj"], "base_model": "Qwen/Qwen2.5-0.5B-Instruct" | null}
                           and "head_bias": true when the adapter has one (absent = false)

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
    <name>.json                 (optional) whatever the caller passes as ``extra`` (:func:`export_peft`), e.g. the
                                experiments' record of how the adapter's inputs are written; this package gives
                                such files no meaning
    README.md                   (optional) the model card the caller passes as ``readme`` (:func:`export_peft`):
                                what the Hugging Face Hub shows; this package gives it no meaning either
    head_bias.safetensors       (only with a trainable head bias) key "lm_head.bias" [vocab], float32: PEFT's
                                LoraConfig has no place for it; how a transformers + peft user adds it:
                                :mod:`lora.head_bias`

:func:`load_peft` reads such a directory back into one of our models (the LoRA settings of the config, the tensors
of the weights file), so the export is also a format we load.

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

from .head_bias import (HEAD_BIAS_KEY, add_head_bias, has_head_bias, head_bias_parameters, read_peft_head_bias,
                        save_peft_head_bias)
from .layers import LoRALinear, apply_lora, lora_modules

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_README = "README.md"
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
    """The LoRA tensors of ``model``: ``{"<module path>.lora_A.weight": [r, in], "….lora_B.weight": [out, r]}``,
    and ``"lm_head.bias"`` [vocab] if the model has a trainable head bias (:mod:`lora.head_bias`) (detached,
    contiguous, on CPU; the live tensors are not shared)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous().clone()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous().clone()
    for key, bias in head_bias_parameters(model).items():
        out[key] = bias.detach().cpu().contiguous().clone()
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
    params.update(head_bias_parameters(model))  # "lm_head.bias", if the model has a trainable head bias
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
    flag = {"head_bias": True} if has_head_bias(model) else {}  # absent = false, as in adapters saved before it
    _write_json(out_dir / ADAPTER_CONFIG, {"format": FORMAT, "version": 1, **settings, "base_model": base_model,
                                           **flag})
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


def _check_finite(state: dict[str, torch.Tensor], source) -> None:
    """Refuse (AdapterError naming ``source`` and a tensor) weights holding NaN or infinity: they would turn every
    forecast into NaN without a word."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(f"{source}: tensor {key!r} holds {bad} NaN or infinite value(s) (a diverged or damaged "
                               "adapter)")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> dict[str, LoRALinear]:
    """Load an adapter saved by :func:`save_adapter` into ``model``.

    A model without LoRA layers gets them first (:func:`lora.apply_lora` with the saved rank, alpha and
    targets, which also freezes the model, and :func:`lora.head_bias.add_head_bias` if the adapter has a head
    bias); a model that has them must have the same settings, the head bias's presence included.

    Returns ``{module path: LoRALinear}``. Raises AdapterError for a missing/invalid directory, different
    settings, weights holding NaN or infinity, or weights that do not fit (missing/unexpected keys, wrong shapes).
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    try:
        state = load_file(str(weights))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: cannot read adapter weights ({err})") from None
    _check_finite(state, weights)
    if not lora_modules(model):
        apply_lora(model, config["rank"], config["alpha"], config["targets"])
        if config.get("head_bias"):
            add_head_bias(model)
    settings = {**lora_settings(model), "head_bias": has_head_bias(model)}
    saved = {"rank": config["rank"], "alpha": config["alpha"], "targets": list(config["targets"]),
             "head_bias": bool(config.get("head_bias", False))}
    if (settings["rank"], settings["alpha"], sorted(settings["targets"]), settings["head_bias"]) != (
            saved["rank"], saved["alpha"], sorted(saved["targets"]), saved["head_bias"]):
        raise AdapterError(f"{adapter_dir}: adapter settings {saved} differ from the model's LoRA layers {settings}")
    load_lora_state_dict(model, state, source=str(weights))
    return lora_modules(model)


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
                extra: dict[str, dict] | None = None, readme: str | None = None) -> Path:
    """Write ``model``'s adapter in PEFT's LoRA format (``adapter_model.safetensors`` + ``adapter_config.json``)
    so that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` reproduces our
    adapted model (tested to 1e-5 in fp32 against transformers + peft), and :func:`load_peft` reads it back.
    A trainable head bias goes beside them as ``head_bias.safetensors`` (:mod:`lora.head_bias` shows how a
    transformers + peft user adds it), tested the same way.

    Args:
        model: a model with LoRA layers (not merged).
        out_dir: directory to write (created if needed).
        base_model_name_or_path: recorded in the config (Hub id or path of the base weights), as PEFT does: what
            ``peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)`` loads as the base (a Hub id works anywhere).
        extra: ``{file name: JSON object}`` written beside the adapter (indented JSON, each file replaced
            atomically, before the adapter's own files), e.g. what a caller needs to use the adapter; PEFT ignores
            such files. Names are plain ``*.json`` file names other than ``adapter_config.json``.
        readme: the text of a ``README.md`` model card written beside them (replaced atomically, with ``extra``),
            e.g. Hugging Face Hub front matter and usage; None writes none and leaves an existing one alone.

    Returns the directory. Raises AdapterError if the model has no (or mixed) LoRA layers; RuntimeError if merged;
    ValueError (before anything is written) for a ``readme`` that is not a string, an ``extra`` name that is not a
    plain ``*.json`` file name or is the config's, or an object that is not JSON (NaN and infinity included). Key
    naming and config fields: see the module docstring.
    """
    out_dir = Path(out_dir)
    settings = lora_settings(model)
    if any(m.merged for m in lora_modules(model).values()):
        raise RuntimeError("export_peft: unmerge the LoRA layers first (PEFT adds the update itself)")
    extra_text = {}
    for name, obj in (extra or {}).items():
        if (not isinstance(name, str) or Path(name).name != name or "\\" in name or name.startswith(".")
                or not name.endswith(".json") or name == PEFT_CONFIG):
            raise ValueError(f"export_peft: extra file name {name!r} must be a plain *.json file name other than "
                             f"{PEFT_CONFIG}")
        if not isinstance(obj, dict):
            raise ValueError(f"export_peft: extra file {name}: expected a dict (a JSON object), got "
                             f"{type(obj).__name__}")
        try:
            extra_text[name] = json.dumps(obj, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as err:
            raise ValueError(f"export_peft: extra file {name} is not JSON: {err}") from None
    if readme is not None and not isinstance(readme, str):
        raise ValueError(f"export_peft: readme must be a string (the README.md text), got {type(readme).__name__}")
    bias = head_bias_parameters(model)  # written beside the PEFT files, not in them (save_peft_head_bias)
    state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items() if k not in bias}
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
    for name, text in extra_text.items():  # first: an adapter on disk never lacks what was written beside it
        atomic_write(out_dir / name, text)
    if readme is not None:
        atomic_write(out_dir / PEFT_README, readme if readme.endswith("\n") else readme + "\n")
    save_peft_head_bias(model, out_dir)  # head_bias.safetensors, or a stale one removed
    atomic_write(out_dir / PEFT_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    _write_json(out_dir / PEFT_CONFIG, config)
    return out_dir


#: PEFT LoraConfig fields whose other values change what the adapter computes, and the value :func:`load_peft`
#: supports (the one :func:`export_peft` writes; PEFT's default where a config leaves the field out)
_PEFT_FIXED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
               "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def read_peft_config(adapter_dir: str | os.PathLike) -> dict:
    """The LoRA settings of a PEFT adapter directory's ``adapter_config.json``: ``{"rank", "alpha", "targets",
    "base_model"}`` (``r``, ``lora_alpha``, ``target_modules`` as a list, ``base_model_name_or_path``).

    Raises AdapterError (one line naming the file and the field) if the file is missing or not JSON, is not a
    PEFT LoRA config (our own format is named as such), or uses what our LoRA layers do not compute: rsLoRA,
    DoRA, fan_in_fan_out, trained biases, modules_to_save, per-layer ranks or alphas, a subset of layers, a
    regular expression for ``target_modules``.
    """
    path = Path(adapter_dir) / PEFT_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter config (is {Path(adapter_dir)} a PEFT adapter directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path}: cannot read adapter config: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        hint = f" (this is a {FORMAT} adapter: use lora.load_adapter)" if isinstance(config, dict) and \
            config.get("format") == FORMAT else ""
        raise AdapterError(f"{path}: not a PEFT LoRA config (peft_type must be \"LORA\"){hint}")
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{path}: r = {rank!r} must be an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        raise AdapterError(f"{path}: lora_alpha = {alpha!r} must be a positive number")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{path}: target_modules = {targets!r} must be a list of module names (a regular "
                           "expression is not supported)")
    for key, supported in _PEFT_FIXED.items():
        value = config.get(key, supported)
        if value != supported and not (supported is None and value == []):
            raise AdapterError(f"{path}: {key} = {value!r} is not supported (only {supported!r})")
    return {"rank": rank, "alpha": alpha, "targets": list(dict.fromkeys(targets)),
            "base_model": config.get("base_model_name_or_path")}


def load_peft(model: nn.Module, adapter_dir: str | os.PathLike) -> dict[str, LoRALinear]:
    """Load a PEFT-format LoRA adapter (:func:`export_peft`'s, or PEFT's ``save_pretrained`` of a supported
    config, :func:`read_peft_config`) into ``model``.

    A model without LoRA layers gets them first (:func:`lora.apply_lora` with the config's r, lora_alpha and
    target_modules, which also freezes the model); a model that has them must have the same settings. The weights'
    keys must be ``"base_model.model." + module path + ".lora_A.weight" / ".lora_B.weight"`` for exactly the
    model's LoRA layers, with their shapes (A ``[r, in]``, B ``[out, r]``). A ``head_bias.safetensors`` beside
    them (:func:`export_peft` of a model with a trainable head bias) is loaded too, the bias added to a model that
    gets its LoRA layers here; a model with LoRA layers must then have a head bias, and one without the file none.

    Returns ``{module path: LoRALinear}``. Raises AdapterError for a missing/invalid directory, config or weights
    file, weights holding NaN or infinity, other settings than the model's LoRA layers, or weights that do not fit (missing/unexpected keys, wrong
    shapes; nothing is copied then); RuntimeError if the model's LoRA layers are merged.
    """
    adapter_dir = Path(adapter_dir)
    config = read_peft_config(adapter_dir)
    weights = adapter_dir / PEFT_WEIGHTS
    try:
        saved = load_file(str(weights))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: cannot read adapter weights ({err})") from None
    foreign = [k for k in saved if not k.startswith(PEFT_PREFIX)]
    if foreign:
        raise AdapterError(f"{weights}: key {foreign[0]!r} does not start with {PEFT_PREFIX!r} (not a PEFT "
                           f"adapter of a causal LM; {len(foreign)} such keys)")
    state = {k[len(PEFT_PREFIX):]: v for k, v in saved.items()}
    try:  # "lm_head.bias" from head_bias.safetensors beside the PEFT files, if exported with a head bias
        state.update(read_peft_head_bias(adapter_dir))
    except ValueError as err:
        raise AdapterError(str(err)) from None
    _check_finite(state, weights)
    if not lora_modules(model):
        try:
            apply_lora(model, config["rank"], config["alpha"], config["targets"])
        except ValueError as err:
            raise AdapterError(f"{adapter_dir / PEFT_CONFIG}: {err}") from None
        if HEAD_BIAS_KEY in state:
            add_head_bias(model)
    settings = lora_settings(model)
    if (settings["rank"], settings["alpha"], sorted(settings["targets"])) != (
            config["rank"], config["alpha"], sorted(config["targets"])):
        raise AdapterError(f"{adapter_dir}: adapter settings {({k: config[k] for k in settings})} differ from the "
                           f"model's LoRA layers {settings}")
    load_lora_state_dict(model, state, source=str(weights))
    return lora_modules(model)
