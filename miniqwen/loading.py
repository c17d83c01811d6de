"""Load Hugging Face-layout Qwen2 checkpoints (local directory or Hub repo id) into :class:`Qwen2ForCausalLM`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ConfigError, Qwen2Config
from .model import Qwen2ForCausalLM
from .tokenizer import QwenTokenizer, WeightsError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local model directory for ``name_or_path``.

    An existing directory is used as is. Anything else is taken as a Hub repo id (``owner/name``) and fetched with
    ``huggingface_hub.snapshot_download``, which honours ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1``
    (then only the local cache is used). Raises :class:`WeightsError` with advice when neither works.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise WeightsError(f"{name}: no such model directory, and it is not a Hub repo id of the form owner/name")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except Exception as err:  # network, auth, offline-cache miss: all mean the same thing to the user
        if getattr(constants, "HF_HUB_OFFLINE", False) and "Incomplete" not in type(err).__name__:
            why = (f"{name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                   "forbids downloading it")
        else:
            why = f"could not get {name!r} from the Hugging Face Hub ({type(err).__name__}: {err})"
        raise WeightsError(
            " ".join(why.split()) + ". Without Hub access, pass --model DIR with a local copy (config.json, "
            "model.safetensors, tokenizer.json); on this project's machines ../shared/tools/get-qwen-weights builds "
            "one."
        ) from None


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name → shard file name) of a sharded checkpoint's index file.

    Raises :class:`WeightsError` naming ``index`` when it is unreadable, not JSON, not an object, has no
    ``weight_map`` object of str → str, maps nothing, or names a shard outside the model directory.
    """
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{index}: not a valid safetensors index, cannot read it as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{index}: not a valid safetensors index, expected a JSON object, got {type(raw).__name__}")
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: not a valid safetensors index, 'weight_map' must be an object of "
                           f"tensor name -> shard file, got {type(weight_map).__name__}")
    if not weight_map:
        raise WeightsError(f"{index}: 'weight_map' is empty")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise WeightsError(f"{index}: 'weight_map' entry {name!r} must name a shard file, got {shard!r}")
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise WeightsError(f"{index}: shard {shard!r} (for {name!r}) is not a file inside the model directory")
    return weight_map


def _read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``.

    Every shard is checked to exist before any is read. Raises :class:`WeightsError` naming the file for a
    missing/unreadable/invalid index or shard, a tensor found in two shards, a tensor listed but absent, or a
    tensor that is not floating point.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_index(index)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise WeightsError(f"{index}: lists shard {shard!r}, but {model_dir / shard} does not exist")
    elif (model_dir / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise WeightsError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for shard in shards:
        file = model_dir / shard
        try:
            tensors = load_file(str(file))  # safetensors: plain tensors, no pickle
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{file}: cannot read safetensors ({err})") from None
        twice = sorted(set(tensors) & set(state))
        if twice:
            raise WeightsError(f"{file}: {len(twice)} tensors also found in an earlier shard: {twice[:10]}")
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise WeightsError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected floating point "
                                   "(quantized or corrupt weights?)")
            bad = _count_non_finite(tensor)
            if bad:
                raise WeightsError(f"{file}: tensor {name} holds {bad} NaN or infinite values of "
                                   f"{tensor.numel()} (corrupt weights?)")
        state.update(tensors)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise WeightsError(f"{index}: {len(absent)} tensors listed but not found in shards: {absent[:10]}")
    return state


def _count_non_finite(tensor: torch.Tensor, block: int = 1 << 24) -> int:
    """How many NaN/inf values ``tensor`` holds. A finite sum proves there are none (one fast reduction; NaN and inf
    propagate into it); otherwise they are counted in blocks (a sum can also overflow on finite values)."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return 0
    flat = tensor.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), block):
        part = flat[start:start + block]
        if not bool(torch.isfinite(part).all()):
            bad += int((~torch.isfinite(part)).sum())
    return bad


def _regular_file(path: Path) -> bool:
    """``path`` exists and is a regular file (following links): never a FIFO or device, which could block a read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file: the JSON header (tensor name -> dtype, shape, offsets) and
    the byte offset where the tensor data begins. Reads only the header. Raises WeightsError naming ``file``."""
    if not _regular_file(file):
        raise WeightsError(f"{file}: not a regular file (the weights must be a safetensors file)")
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit in the file ({size} bytes)")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise WeightsError(f"{file}: cannot read safetensors ({err})") from None
    return header, 8 + n


def weights_fingerprint(model_dir: str | os.PathLike, sample: int = 1 << 16) -> str:
    """SHA-256 that identifies a weights directory without reading the tensors: config.json's bytes, the tensor
    index of every safetensors file (names, dtypes, shapes, from the headers) and, per file, its size and the first
    and last ``sample`` bytes of its tensor data (so that two checkpoints of one architecture, e.g. another
    fine-tune or seed, differ). Renaming or moving the directory does not change it.

    Raises WeightsError / ConfigError naming the file for a missing config.json (or one that is not a regular
    file), no weights, or an unreadable safetensors header.
    """
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not _regular_file(config):
        raise ConfigError(f"{config}: missing or not a regular file")
    h = hashlib.sha256()
    h.update(b"config.json\0" + config.read_bytes())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
    elif (model_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise WeightsError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    for shard in shards:
        file = model_dir / shard
        header, start = _safetensors_header(file)
        tensors = sorted((k, v.get("dtype"), v.get("shape")) for k, v in header.items()
                         if k != "__metadata__" and isinstance(v, dict))
        size = file.stat().st_size
        h.update(json.dumps([shard, tensors, size]).encode())
        with open(file, "rb") as fh:
            fh.seek(start)
            h.update(fh.read(sample))
            fh.seek(max(start, size - sample))
            h.update(fh.read(sample))
    return h.hexdigest()


def describe_mismatch(expected: dict, state: dict, found: str = "file", wanted: str = "model",
                      limit: int = 8) -> list[str]:
    """Lines listing the missing keys, unexpected keys and shape mismatches of ``state`` against ``expected``
    (``{name: shape}``); empty when they agree. Used for every strict load (model weights, LoRA adapters)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: {found} {tuple(state[k].shape)} vs {wanted} {tuple(expected[k])}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:limit]) + (" …" if len(items) > limit else ""))
    return lines


def load_state_dict_strict(model: Qwen2ForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes exactly.

    A tied model (``tie_word_embeddings``) needs no ``lm_head.weight``; if the file has one anyway it is ignored,
    as transformers does. Raises :class:`WeightsError` listing missing keys, unexpected keys and shape mismatches
    (the usual sign of a config that does not match the weights).
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    problems = describe_mismatch(expected, state, "file", "config")
    if problems:
        raise WeightsError("\n".join([f"{source}: weights do not match the config", *problems]))
    if tied:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True replaced the Parameter objects: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight


def load_pretrained(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[Qwen2ForCausalLM, QwenTokenizer]:
    """Load a Qwen2/Qwen2.5 model and its tokenizer from a HF-layout directory or a Hub repo id.

    Args:
        name_or_path: local directory with ``config.json``, ``model.safetensors`` (or a sharded set with
            ``model.safetensors.index.json``) and ``tokenizer.json``; or a Hub id (default Qwen2.5-0.5B-Instruct).
        dtype: torch dtype or its name ("float32", "bfloat16", "float16"); None = float32 on every device, the
            checkpoint's values exactly. The precision a stage computes in (``--precision auto``) is
            :func:`miniqwen.device.default_compute_dtype`; callers pass it here.
        device: e.g. "cpu", "cuda"; None = CUDA if available, else CPU.

    Returns:
        ``(model, tokenizer)`` — the model in eval mode, keys loaded strictly without renaming.

    Raises:
        WeightsError: missing/unreadable/partial weights, an invalid sharded index, weights that do not match the
            config, or a missing/invalid tokenizer.json (the message names the file).
        ConfigError: missing, unreadable or invalid config.json (see :meth:`Qwen2Config.from_json`).
        ValueError: ``dtype`` is not a floating-point torch dtype or its name.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {name!r} (use e.g. 'float32', 'bfloat16', 'float16')")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    dtype = dtype or torch.float32
    model_dir = resolve_model_dir(name_or_path)
    config = Qwen2Config.from_json(model_dir / "config.json")
    tokenizer = QwenTokenizer.from_file(model_dir)
    state = _read_state_dict(model_dir)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    with torch.device("meta"):  # build without allocating: the real tensors are assigned below
        model = Qwen2ForCausalLM(config)
    load_state_dict_strict(model, state, source=str(model_dir))
    return model.eval(), tokenizer


__all__ = ["ConfigError", "WeightsError", "load_pretrained", "resolve_model_dir", "weights_fingerprint",
           "DEFAULT_MODEL"]
