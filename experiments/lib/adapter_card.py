"""What a trained adapter needs beside its weights: how its inputs were written (the LLMTIME scale, decimals,
encoding and prompt mode), the base model it was trained on, and any trained output-head bias.

:func:`runs.train_and_forecast` writes it as ``miniqwen_llmtime.json`` (:data:`CARD_FILE`) beside the PEFT files
of ``peft_adapter/`` (``lora.export_peft(..., extra=...)``), so that ``python -m experiments.forecast --adapter DIR``
— or anyone with transformers + peft — can use the adapter with nothing else::

    {"format": "miniqwen-llmtime", "version": 1,
     "llmtime_scale": 0.59954,     data units per text unit: a value x is written as x / llmtime_scale
     "decimals": 2, "encoding": "decimal" | "integer", "prompt": "raw" | "chat",
     "base_model": "Qwen2.5-Coder-0.5B-Instruct (...)",   the label of the weights it was trained on
     "head_bias": null | "<file in the directory>",       a trained bias of the output head (optional; none yet)
     "scale_fit": {"data": "lotka_volterra_data.h5", "split": "train", "quantile": 0.99, "target": 10.0},
     "usage": "<how to write a prompt and read the answer, in words>"}

The lora package gives the file no meaning (it writes what it is given); this module is the one place its fields are
defined, written and read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from data import ENCODINGS
from lora import AdapterError
from lora.io import PEFT_WEIGHTS

CARD_FILE = "miniqwen_llmtime.json"
FORMAT = "miniqwen-llmtime"
VERSION = 1
PROMPTS = ("raw", "chat")
USAGE = ("Divide each value (prey, predator) by llmtime_scale and write it with `decimals` decimals (encoding "
         "'decimal': 1.23; 'integer': the same digits without the point and leading zeros, 123), a time step as "
         "'prey,predator', steps joined by ';', and end the prompt with ';' (prompt 'raw': the model continues the "
         "text; 'chat': the text inside a Qwen chat turn asking for the next steps, see "
         "experiments.lib.evaluation.forecast_prompt). Read the generated steps back the same way and multiply by "
         "llmtime_scale. head_bias, if not null, names a file of this directory holding a bias added to the output "
         "logits.")


@dataclass(frozen=True)
class AdapterCard:
    """How an adapter's inputs are written (see the module docstring for the JSON form).

    Attributes:
        llmtime_scale: the LLMTIME scale α, data units per text unit (> 0, finite).
        decimals: decimals per value (0–8). encoding: one of :data:`data.ENCODINGS`. prompt: "raw" or "chat".
        base_model: label of the base weights (``session.weights_label``), or None if unknown.
        head_bias: file name (in the adapter directory) of a trained output-head bias, or None (no such bias).
        scale_fit: how the scale was fitted (data file name, split, quantile, target), or {} if not recorded.
    """

    llmtime_scale: float
    decimals: int
    encoding: str
    prompt: str
    base_model: str | None
    head_bias: str | None = None
    scale_fit: dict = field(default_factory=dict)

    @property
    def scale_target(self) -> float:
        """The value the scale maps its data's quantile to (10 unless recorded otherwise)."""
        target = self.scale_fit.get("target", 10.0)
        return float(target) if isinstance(target, (int, float)) and target > 0 else 10.0

    def to_json(self) -> dict:
        """The JSON object written as :data:`CARD_FILE`."""
        return {"format": FORMAT, "version": VERSION, "llmtime_scale": self.llmtime_scale,
                "decimals": self.decimals, "encoding": self.encoding, "prompt": self.prompt,
                "base_model": self.base_model, "head_bias": self.head_bias, "scale_fit": dict(self.scale_fit),
                "usage": USAGE}

    @classmethod
    def from_json(cls, obj, where: str = CARD_FILE) -> "AdapterCard":
        """Validate a card read from ``where``. Raises AdapterError (one line naming ``where`` and the field)."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise AdapterError(f"{where}: not a {FORMAT} card (\"format\" must be {FORMAT!r})")
        if obj.get("version") != VERSION:
            raise AdapterError(f"{where}: version {obj.get('version')!r} is not supported (only {VERSION})")
        scale, decimals = obj.get("llmtime_scale"), obj.get("decimals")
        checks = [
            ("llmtime_scale", isinstance(scale, (int, float)) and not isinstance(scale, bool)
             and math.isfinite(scale) and scale > 0, "a positive finite number"),
            ("decimals", isinstance(decimals, int) and not isinstance(decimals, bool) and 0 <= decimals <= 8,
             "an integer from 0 to 8"),
            ("encoding", obj.get("encoding") in ENCODINGS, " or ".join(ENCODINGS)),
            ("prompt", obj.get("prompt") in PROMPTS, " or ".join(PROMPTS)),
            ("base_model", obj.get("base_model") is None or isinstance(obj.get("base_model"), str),
             "a string or null"),
            ("head_bias", obj.get("head_bias") is None or (isinstance(obj.get("head_bias"), str)
                                                           and Path(obj["head_bias"]).name == obj["head_bias"]),
             "a file name in the adapter directory, or null"),
            ("scale_fit", isinstance(obj.get("scale_fit", {}), dict), "an object"),
        ]
        for key, ok, allowed in checks:
            if key not in obj and key not in ("head_bias", "scale_fit"):
                raise AdapterError(f"{where}: missing {key!r}")
            if not ok:
                raise AdapterError(f"{where}: {key} = {obj.get(key)!r} must be {allowed}")
        return cls(float(scale), decimals, obj["encoding"], obj["prompt"], obj["base_model"], obj.get("head_bias"),
                   dict(obj.get("scale_fit", {})))


def card_for(session, prompt: str, head_bias: str | None = None) -> AdapterCard:
    """The card of an adapter trained in ``session`` (an :class:`experiments.lib.session.Session`: its dataset's scale,
    decimals, encoding and file, how the scale was fitted, the weights' label) and forecast with ``prompt``;
    ``head_bias``: the file name of a trained output-head bias written beside it, if any."""
    ds, rule = session.dataset, session.data_settings
    return AdapterCard(ds.llmtime_scale, ds.decimals, ds.encoding, prompt, session.weights, head_bias,
                       {"data": ds.data.path.name, "split": "train", "quantile": rule.scale_quantile,
                        "target": rule.scale_target})


def read_card(adapter_dir: str | Path) -> AdapterCard | None:
    """The card beside the adapter in ``adapter_dir``; None if the directory has none (e.g. an adapter made before
    cards, or by someone else).

    Raises AdapterError: ``adapter_dir`` is not a directory; the card is unreadable, not JSON or invalid
    (:meth:`AdapterCard.from_json`); the head-bias file it names is not there; the directory holds tensors
    (``*.safetensors``) that are neither the PEFT weights nor the card's head bias — trained weights that a reader
    of the PEFT files and the card would silently leave out.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"--adapter {adapter_dir}: no such directory")
    path = adapter_dir / CARD_FILE
    card = None
    if path.exists():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise AdapterError(f"{path}: cannot read it ({err})") from None
        card = AdapterCard.from_json(obj, str(path))
        if card.head_bias and not (adapter_dir / card.head_bias).is_file():
            raise AdapterError(f"{path}: head_bias names {card.head_bias}, which is not in {adapter_dir}")
    known = {PEFT_WEIGHTS, card.head_bias if card else None}
    unknown = sorted(p.name for p in adapter_dir.glob("*.safetensors") if p.name not in known)
    if unknown:
        raise AdapterError(f"{adapter_dir}: {', '.join(unknown)} beside the adapter is named by no card "
                           f"({CARD_FILE}): the adapter would be used without it")
    return card
