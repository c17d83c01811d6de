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
                   (+ "scaling": "series", "beta": 0.3, "fit_steps": 80 for an adapter trained with --scaling series:
                    each trajectory written at data.llmtime.fit_series_scale of its own context, not llmtime_scale)
     "usage": "<how to write a prompt and read the answer, in words>"}

The lora package gives the file no meaning (it writes what it is given); this module is the one place its fields are
defined, written and read. It also makes the directory Hub-ready (:func:`peft_export_args`): ``README.md``, a model
card with Hugging Face front matter (:func:`model_card`), and a Hub id as PEFT's ``base_model_name_or_path``
(:func:`hub_model_id`), while the card's ``base_model`` names the weights actually trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from data import ENCODINGS, max_tokens_per_step
from data.llmtime import SERIES_OFFSET_BETA
from lora import AdapterError
from lora.io import PEFT_README, PEFT_WEIGHTS

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


def card_for(ds, rule, weights: str, prompt: str, head_bias: str | None = None) -> AdapterCard:
    """The card of an adapter trained on the dataset ``ds`` (a :class:`experiments.lib.dataset.Dataset`: its scale,
    decimals, encoding and file) with the scale fitted by ``rule`` (its :class:`settings.DataSettings`), on the
    weights labelled ``weights``, and forecast with ``prompt``; ``head_bias``: the file name of a trained
    output-head bias written beside it, if any."""
    from .settings import SERIES_FIT_STEPS

    series = {} if ds.scaling == "dataset" else {"scaling": "series", "beta": SERIES_OFFSET_BETA,
                                                 "fit_steps": SERIES_FIT_STEPS}
    return AdapterCard(ds.llmtime_scale, ds.decimals, ds.encoding, prompt, weights, head_bias,
                       {"data": ds.data.path.name, "split": "train", "quantile": rule.scale_quantile,
                        "target": rule.scale_target, **series})


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


# ------------------------------------------------------------------------------------------- the Hub model card
README_FILE = PEFT_README  # "README.md", what export_peft(readme=...) writes
DEFAULT_HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
#: official Qwen2.5 Instruct repos by architecture: (hidden_size, num_hidden_layers, num_key_value_heads) of a
#: "qwen2" config.json -> (Hub id, license of its weights); the Coder and base models of a size share it
QWEN25_HUB_IDS = {(896, 24, 2): (DEFAULT_HUB_ID, "apache-2.0"),
                  (1536, 28, 2): ("Qwen/Qwen2.5-1.5B-Instruct", "apache-2.0"),
                  (3584, 28, 4): ("Qwen/Qwen2.5-7B-Instruct", "apache-2.0")}
HUB_LICENSES = dict(QWEN25_HUB_IDS.values())
TAGS = ("lora", "peft", "time-series", "forecasting", "llmtime", "lotka-volterra", "predator-prey", "qwen2")


def is_hub_id(name) -> bool:
    """True for a string of the form ``owner/name`` that is no existing path (what :func:`hub_model_id` keeps)."""
    name = str(name or "")
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and all(part and all(c.isalnum() or c in "-_." for c in part) for part in name.split("/"))
            and not Path(name).expanduser().exists())


def hub_model_id(model) -> str | None:
    """The Hub id an adapter trained on ``model`` (a stage's ``--model``) names as its base: what PEFT's
    ``base_model_name_or_path`` and the card's ``base_model`` hold, so that ``AutoPeftModelForCausalLM`` finds a
    model it fits on any machine. The weights actually used are named by the card's ``base_model`` label.

    Rule: a Hub id (``owner/name``, not an existing path) as given; a snapshot folder of the Hugging Face cache
    (``…/models--owner--name/snapshots/<rev>``) its repo's id; another local directory the official Qwen2.5
    Instruct id of its architecture, read from its ``config.json`` (:data:`QWEN25_HUB_IDS`: a "qwen2" config of
    hidden size 896, 24 layers, 2 key/value heads -> "Qwen/Qwen2.5-0.5B-Instruct", e.g. the offline
    Qwen2.5-Coder-0.5B-Instruct build, same architecture and tokenizer); a directory of no known architecture its
    path as given (as PEFT records it: the adapter then loads only where that path exists); None for None.
    """
    if model is None or is_hub_id(model):
        return None if model is None else str(model)
    path = Path(model).expanduser()
    cached = path.resolve().parent.parent.name if path.resolve().parent.name == "snapshots" else ""
    if cached.startswith("models--") and cached.count("--") == 2:
        return "/".join(cached.split("--")[1:])
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        key = (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"])
        if config.get("model_type") == "qwen2" and key in QWEN25_HUB_IDS:
            return QWEN25_HUB_IDS[key][0]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        pass
    return str(model)


def evaluation_metrics(evaluation: dict) -> tuple[dict[str, float], str]:
    """``(metrics, what they were measured on)`` of an evaluation record (``results.json``'s
    ``evaluations[name]``, :class:`experiments.lib.results.Evaluation`): R², MSE and MAE per species (data units),
    and the fraction of forecasts that parsed completely, for :func:`model_card`. Raises KeyError if a field is
    missing."""
    m = evaluation["metrics"]
    metrics = {f"{name} {species}": m[species][key] for name, key in (("R²", "r2"), ("MSE", "mse"), ("MAE", "mae"))
               for species in ("prey", "predator")}
    metrics["fraction of forecasts parsed completely"] = evaluation["parsed_fraction"]
    n = len(evaluation["trajectories"])
    return metrics, (f"the {evaluation['split']} split ({n} trajectories), {evaluation['context_steps']} steps of "
                     f"context → {evaluation['horizon']} forecast steps")


def _yaml(value) -> str:
    """A YAML scalar: JSON's string quoting is valid YAML."""
    return json.dumps(value, ensure_ascii=False)


def model_card(card: AdapterCard, base_model_id: str | None, lora: dict | None = None,
               metrics: dict[str, float] | None = None, evaluated_on: str | None = None) -> str:
    """The ``README.md`` of an exported adapter directory: a Hugging Face model card (YAML front matter
    ``base_model``, ``library_name: peft``, ``license`` where :data:`HUB_LICENSES` knows the base, ``tags``), then
    what it was trained on, the LLMTIME text format and scale of ``card`` (dataset or per-series scaling), the
    restricted decoding, ``metrics`` if given (label -> value, measured on ``evaluated_on``, with the weights label
    ``card.base_model``) and a transformers + peft snippet that forecasts with it.

    Args: ``base_model_id``: the Hub id of the base (:func:`hub_model_id`; a path or None leaves ``base_model``
    out of the front matter); ``lora``: ``{"rank", "alpha", "targets"}`` (:func:`lora.lora_settings`) or None.
    Imports neither transformers nor peft.
    """
    fit, hub = card.scale_fit, is_hub_id(base_model_id)
    series = fit.get("scaling") == "series"
    front = ["---"] + ([f"base_model: {_yaml(base_model_id)}"] if hub else []) + ["library_name: peft"]
    front += [f"license: {HUB_LICENSES[base_model_id]}"] if base_model_id in HUB_LICENSES else []
    front += ["pipeline_tag: text-generation", "tags:", *(f"- {t}" for t in TAGS), "---", ""]
    base = base_model_id or "its base model"
    lines = ["# LLMTIME LoRA adapter: Lotka–Volterra predator–prey forecasting", "",
             f"A LoRA adapter for `{base}`" + (f" (rank {lora['rank']}, alpha {lora['alpha']:g}, on "
                                               f"{', '.join(lora['targets'])})" if lora else "")
             + " that forecasts two-species predator–prey time series written as text in the LLMTIME style "
             "(Gruver et al. 2023), trained with miniqwen, a from-scratch Qwen2.5 in PyTorch.", ""]
    if card.base_model and card.base_model != base_model_id:
        lines += [f"**Trained on the weights of {card.base_model}**, not on `{base}` itself: the same "
                  "architecture and tokenizer, which is why `base_model` names it."
                  + (f" Every number below was measured with {card.base_model}." if metrics else ""), ""]
    data, split = fit.get("data"), fit.get("split", "train")
    split = "training split" if split == "train" else f"`{split}` split"
    lines += ["## Training data", "",
              f"The {split} of `{data}` (trajectories 0–799; validation 800–899 and test 900–999 were not trained "
              "on): the coursework's Lotka–Volterra data set, 1,000 simulated trajectories of 100 time steps of "
              "(prey, predator) population." if data == "lotka_volterra_data.h5" else
              f"The {split} (the first 80 % of the trajectories) of " + (f"`{data}`" if data else "its data")
              + ", a Lotka–Volterra predator–prey data set in the coursework's layout.", "",
              "## Input format (LLMTIME)", ""]
    point = "with the decimal point" if card.encoding == "decimal" else "as whole numbers (no decimal point)"
    if series:
        q, target, beta = fit.get("quantile", 0.99), card.scale_target, fit.get("beta", SERIES_OFFSET_BETA)
        lines += [f"* **Scale, per series**: each trajectory is scaled on its own context, per species: offset = "
                  f"max(min − {beta:g}·(max − min), 0), scale = {q:g}-quantile(context − offset) / {target:g}; a "
                  "value x is written as (x − offset) / scale (0 below the offset) and read back as text · scale + "
                  f"offset (`data.llmtime.fit_series_scale`). Training texts were scaled on their first "
                  f"{fit.get('fit_steps', 80)} steps."]
    else:
        lines += [f"* **Scale**: one scale α = {card.llmtime_scale:.6g} for every series: the "
                  f"{fit.get('quantile', 0.99):g} quantile of the training split's values (both species) mapped to "
                  f"{card.scale_target:g}. A value x is written as x / α and read back as text · α."]
    lines += [f"* **Text**: {card.decimals} decimals, written {point} (encoding \"{card.encoding}\"); a time step "
              "is `prey,predator`, steps are joined by `;` and the prompt ends with `;`, e.g. "
              f"`{'1.38,1.76;0.86,1.49;' if card.encoding == 'decimal' else '138,176;86,149;'}`. Qwen's tokenizer "
              "writes every digit as its own token.",
              "* **Prompt**: " + ("\"raw\": the model simply continues the text." if card.prompt == "raw" else
                                  "\"chat\": the series inside a Qwen chat turn asking for the next steps in the same "
                                  "format (`experiments.lib.evaluation.forecast_prompt`)."),
              "* **Decoding** is restricted to the digits, " + ("`.`, " if card.encoding == "decimal" else "")
              + "`,` and `;` (and the end tokens), greedy for a point forecast; the forecast is the first `horizon` "
              "steps, a step that does not parse is missing (NaN).", ""]
    if card.head_bias:
        lines += [f"The output head has a trained bias, `{card.head_bias}`, that PEFT does not load: add it to the "
                  "logits (`lora.head_bias`).", ""]
    if metrics:
        lines += ["## Results", "", f"Forecasts of {evaluated_on or 'held-out trajectories'}"
                  + (f", with the weights of {card.base_model}" if card.base_model else "") + ":", "",
                  "| metric | value |", "| --- | --- |",
                  *(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()),
                  ""]
    lines += ["## Use", "", f"With transformers + peft (`{CARD_FILE}` holds the format above as JSON):", "",
              "```python", *_snippet(card, base), "```", ""]
    return "\n".join(front + lines)


def _snippet(card: AdapterCard, base: str) -> list[str]:
    """The lines of :func:`model_card`'s forecasting example for ``card``'s format."""
    fit, d = card.scale_fit, card.decimals
    if fit.get("scaling") == "series":
        scale = ["lo, hi = x.min(0), x.max(0)  # per-series scaling fitted on the context",
                 f"offset = np.maximum(lo - {fit.get('beta', SERIES_OFFSET_BETA):g} * (hi - lo), 0)",
                 f"scale = np.quantile(x - offset, {fit.get('quantile', 0.99):g}, axis=0) / {card.scale_target:g}"]
    else:
        scale = [f"offset, scale = 0.0, {card.llmtime_scale!r}  # the dataset's LLMTIME scale"]
    write = (f"f'{{v:.{d}f}}'" if card.encoding == "decimal" else f"str(round(v * {10 ** d}))")
    read = "number(v)" if card.encoding == "decimal" else f"number(v) / {10 ** d}"
    prompt = [f"prompt = ';'.join(','.join({write} for v in row) for row in np.maximum(x - offset, 0) / scale) + ';'"]
    if card.prompt == "chat":
        prompt += ["# prompt 'chat': wrap it in a chat turn as experiments.lib.evaluation.forecast_prompt does",
                   "prompt = tok.apply_chat_template([{'role': 'user', 'content': '...' + prompt}], tokenize=False, "
                   "add_generation_prompt=True)"]
    chars = "0123456789,;" + ("." if card.encoding == "decimal" else "")
    per_step = max_tokens_per_step(d, card.encoding)
    return ["import numpy as np, torch",
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer", "",
            "adapter = 'peft_adapter'  # this directory, or its Hub repo id",
            "model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()",
            f"tok = AutoTokenizer.from_pretrained('{base}')",
            "x = np.array([[1.2, 0.8], [1.0, 0.9], [0.8, 1.0], [0.7, 1.0]])  # (T, 2) prey, predator",
            "horizon = 20", *scale, *prompt,
            f"allowed = tok.convert_tokens_to_ids(list('{chars}')) + [tok.eos_token_id]",
            "enc = tok(prompt, return_tensors='pt')",
            "with torch.no_grad():",
            f"    out = model.generate(**enc, max_new_tokens={per_step} * horizon, do_sample=False,",
            "                         prefix_allowed_tokens_fn=lambda batch, sent: allowed)",
            "text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)", "",
            "def number(v):",
            "    try:",
            "        return float(v)",
            "    except ValueError:",
            "        return np.nan", "",
            "steps = (text.split(';') + [''] * horizon)[:horizon]",
            "values = [s.split(',') if s.count(',') == 1 else ['', ''] for s in steps]",
            f"forecast = np.array([[{read} for v in s] for s in values]) * scale + offset  # (horizon, 2)"]


def peft_export_args(model, model_path, card: AdapterCard) -> dict:
    """The keyword arguments of ``lora.export_peft`` for the adapter on ``model`` with its ``card``
    (:func:`card_for`): ``base_model_name_or_path`` (:func:`hub_model_id` of ``model_path``, the ``--model`` given),
    ``extra`` (the card as :data:`CARD_FILE`) and ``readme`` (:func:`model_card`, without metrics: the adapter is
    exported before it is tested)."""
    from lora import lora_settings

    hub_id = hub_model_id(model_path)
    return {"base_model_name_or_path": hub_id, "extra": {CARD_FILE: card.to_json()},
            "readme": model_card(card, hub_id, lora_settings(model))}
