"""Training checkpoints — the only code that knows their layout. Safetensors and JSON only: no pickles.

    <run>/checkpoint/
        adapter.safetensors + adapter_config.json   LoRA weights, and the head bias if any (``lora.save_adapter``
                                                    format)
        optimizer.safetensors                       AdamW state per trainable parameter: "<i>.exp_avg", "<i>.step" …
        best_adapter.safetensors                    LoRA weights at the best validation loss (if any evaluation)
        rng.safetensors                             torch CPU (and CUDA) generator states
        state.json                                  loop state (step, data position, FLOPs and what was charged,
                                                    early stopping), settings, data fingerprints, Python/NumPy RNG
                                                    states, the SHA-256 of every file above and of
                                                    its own content (``state_sha256``)

A new checkpoint is written to ``checkpoint.tmp/``, read back and verified against its checksums, and only then
takes the place of the previous one (which is renamed ``checkpoint.old/`` for the moment of the swap and removed
after). A crash at any point leaves a complete, verified checkpoint. Loading verifies every checksum: a truncated or
altered file is a :class:`CheckpointError` naming it, never a silently wrong resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from data.chunks import Chunks
from lora import load_lora_state_dict, save_adapter
from miniqwen.atomic import atomic_write

from ..errors import CheckpointError
from .state import TrainState

CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
TENSOR_FILES = ("adapter.safetensors", "optimizer.safetensors", "best_adapter.safetensors", "rng.safetensors")
STATE_CHECKSUM = "state_sha256"  # state.json's checksum of its own content


@dataclass
class Checkpoint:
    """A verified checkpoint read from disk: ``state`` (state.json), and the tensors of each file."""

    path: Path
    state: dict
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    rng: dict[str, torch.Tensor]


def fingerprint(chunks: Chunks | None) -> str | None:
    """SHA-256 (first 16 hex digits) of the chunks' tokens and mask, to refuse resuming on different data."""
    if chunks is None:
        return None
    h = hashlib.sha256()
    h.update(str(tuple(chunks.input_ids.shape)).encode())
    h.update(chunks.input_ids.contiguous().numpy().tobytes())
    h.update(chunks.attention_mask.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat tensors ``"<param index>.<name>"`` (exp_avg, exp_avg_sq, step)."""
    index = {id(p): i for i, p in enumerate(params)}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} is not a tensor; cannot store it without pickle")
            out[f"{index[id(p)]}.{key}"] = value.detach().cpu().contiguous().clone()
    return out


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) capturing the torch CPU/CUDA, Python and NumPy generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def write_checkpoint(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                     best: dict[str, torch.Tensor] | None) -> Path:
    """Write the resumable state of a run (``state``: JSON-ready loop state, settings, fingerprints) and make it
    the run's checkpoint once it is complete and verified. Returns the checkpoint directory."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / CHECKPOINT_TMP, run_dir / CHECKPOINT, run_dir / CHECKPOINT_OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    params = [p for p in model.parameters() if p.requires_grad]
    save_file(_optimizer_tensors(optimizer, params), str(tmp / "optimizer.safetensors"))
    if best is not None:
        save_file(best, str(tmp / "best_adapter.safetensors"))
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    files = {name: _sha256(tmp / name) for name in TENSOR_FILES if (tmp / name).is_file()}
    body = json.loads(json.dumps({**state, "rng": rng_json, "files": files}))  # the checksum is of what is read back
    atomic_write(tmp / "state.json", json.dumps({**body, STATE_CHECKSUM: _state_checksum(body)}) + "\n")
    read_checkpoint(tmp)  # verify before it replaces the previous checkpoint
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def _state_checksum(body: dict) -> str:
    """SHA-256 of state.json's content (every key but the checksum itself), in a canonical JSON form."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_state(file: Path, state: dict) -> None:
    """Refuse a state.json that was edited by hand or does not fit its own tensors: its checksum, the keys a resume
    needs and the loop counters (integers >= 0, no unknown field)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: {why} — the checkpoint cannot be trusted; start again with --overwrite")

    if STATE_CHECKSUM not in state:
        raise bad(f"no checksum ({STATE_CHECKSUM})")
    if state[STATE_CHECKSUM] != _state_checksum({k: v for k, v in state.items() if k != STATE_CHECKSUM}):
        raise bad("checksum does not match its content (edited or damaged)")
    missing = [k for k in ("loop", "rng", "settings", "files") if k not in state]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    rng = state["rng"]
    if not (isinstance(rng, dict) and isinstance(rng.get("python"), list) and isinstance(rng.get("numpy"), list)):
        raise bad("'rng' must hold the python and numpy generator states")
    if not isinstance(state["settings"], dict):
        raise bad("'settings' must be an object")
    loop = state["loop"]
    if not isinstance(loop, dict):
        raise bad("'loop' must be an object")

    known = {f for f in TrainState.__dataclass_fields__}
    unknown = sorted(set(loop) - known)
    if unknown:
        raise bad(f"unknown loop field(s) {', '.join(map(repr, unknown))}")
    for key in ("step", "epoch", "position", "train_flops", "eval_flops", "charged_train", "charged_eval",
                "evals_since_best"):
        value = loop.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"loop.{key} = {value!r} must be an integer >= 0")


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``run_dir/checkpoint`` if it has a state.json, else ``checkpoint.old`` (a crash during the swap), else None."""
    for name in (CHECKPOINT, CHECKPOINT_OLD):
        path = Path(run_dir) / name
        if (path / "state.json").is_file():
            return path
    return None


def checkpoint_step(run_dir: str | os.PathLike, precision: str | None = None) -> int:
    """The step a resumed run of ``run_dir`` would start from: its checkpoint's, or 0 if it has none. Raises
    CheckpointError if the checkpoint is damaged (see :func:`read_checkpoint`) or, when ``precision`` (the compute
    dtype as resolved) is given, was trained in another dtype — so that a stage refuses before it spends anything."""
    path = find_checkpoint(run_dir)
    if path is None:
        return 0
    state = read_checkpoint(path).state
    if precision is not None and (why := precision_change(state, precision)):
        raise CheckpointError(f"{path}: cannot resume with different settings: {why}")
    return int(state["loop"]["step"])


def precision_change(saved: dict, precision: str | None) -> str | None:
    """Why a checkpoint's state (``saved``) cannot be continued in the compute dtype ``precision``, or None. A
    checkpoint written before the dtype was recorded cannot be checked (None)."""
    if saved.get("precision", precision) == precision:
        return None
    return (f"precision: checkpoint {saved['precision']} vs now {precision} (steps in another dtype would not "
            f"continue the run exactly; pass --precision {saved['precision']}, or start a new run)")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint directory.

    Raises:
        CheckpointError: state.json unreadable or not a checkpoint's, a file missing, or a file whose SHA-256
            differs from the one recorded (truncated, altered) — the message names the file.
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        files = state["files"]
        int(state["loop"]["step"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable or not a checkpoint state ({err})") from None
    tensors = {}
    for name in TENSOR_FILES:
        if name not in files:
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if _sha256(file) != files[name]:
            raise CheckpointError(f"{file}: checksum does not match state.json (truncated or altered)")
        try:
            tensors[name] = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    for name in ("adapter.safetensors", "optimizer.safetensors", "rng.safetensors"):
        if name not in tensors:
            raise CheckpointError(f"{path}: the checkpoint has no {name}")
    _check_state(path / "state.json", state)
    return Checkpoint(path, state, tensors["adapter.safetensors"], tensors["optimizer.safetensors"],
                      tensors.get("best_adapter.safetensors"), tensors["rng.safetensors"])


def restore(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put a checkpoint's LoRA weights, optimizer state and RNG states back (the loop state is the caller's)."""
    load_lora_state_dict(model, checkpoint.adapter, source=str(checkpoint.path))
    state_dict = optimizer.state_dict()  # param_groups of this run (lr etc.), params numbered 0..n-1
    per_param: dict[int, dict] = {}
    for key, value in checkpoint.optimizer.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    state_dict["state"] = per_param
    optimizer.load_state_dict(state_dict)
    rng = checkpoint.rng
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = checkpoint.state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = checkpoint.state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
