"""One results schema for every stage: a dataclass written as ``results.json`` and read back by the report.

    results.json = {
      "schema": 1, "stage": "baseline", "seed": 0,
      "settings": {"run": {...}, "data": {...}, "forecast": {...}, "lora": {...}, "train": {...}},
      "weights": "Qwen2.5-Coder-0.5B-Instruct (AWQ, GGUF ...) dequantized to float32.",
      "data": {"file": "lotka_volterra_data.h5", "sha256": "...", "llmtime_scale": 0.5995, "n_trajectories": 1000},
      "evaluations": {"zero-shot": Evaluation, "persistence": Evaluation, ...},
      "flops": {"generate": int, "eval": int, "train": int, "total": int, "planned": int},
      "seconds": {"forecast": float, ...},
      "details": {...stage-specific: training summary, tokenized examples, tables...}
    }

No machine paths: files are named by their base name and checksum.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miniqwen.atomic import atomic_write

from .errors import UsageError

SCHEMA = 1
FLOP_KINDS = ("generate", "eval", "train")


@dataclass
class Evaluation:
    """Scores of one forecaster on one set of trajectories (data units; see :func:`evaluation.forecast_metrics`).

    Attributes:
        forecaster: its name, e.g. "zero-shot", "lora", "persistence", "var(2)".
        split: "validation" or "test"; trajectories: their indices in the data file.
        context_steps, horizon: time steps observed and forecast.
        metrics: ``{species: {"mse", "mae", "r2", "mse_by_step" [H], "mae_by_step" [H]}}`` for prey and predator.
        parsed_fraction: fraction of forecasts whose text parsed completely (1 for classical forecasters).
        steps_invalid, steps_missing: unparseable / missing forecast steps (filled by persistence in the metrics).
        flops: FLOPs spent forecasting (forward only; 0 for classical forecasters).
        validation_loss: token-level loss (nats/token) of the model on validation chunks, where measured.
        seconds: wall time of the forecast. settings: the forecaster's own settings (e.g. an AR order).
    """

    forecaster: str
    split: str
    trajectories: list[int]
    context_steps: int
    horizon: int
    metrics: dict
    parsed_fraction: float = 1.0
    steps_invalid: int = 0
    steps_missing: int = 0
    flops: int = 0
    validation_loss: float | None = None
    seconds: float | None = None
    settings: dict = field(default_factory=dict)


@dataclass
class Results:
    """What one stage produced and what produced it (see the module docstring for the JSON layout).

    ``flops`` holds FLOPs by kind ("generate", "eval", "train"; already multiplied: training 3× forward), their
    ``total`` and the ``planned`` upper bound that was checked against the budget before the run.
    """

    stage: str
    settings: dict
    weights: str | None
    data: dict
    seed: int
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    schema: int = SCHEMA

    def add_flops(self, kind: str, flops: int) -> None:
        """Add ``flops`` of ``kind`` (one of :data:`FLOP_KINDS`) and update the total."""
        if kind not in FLOP_KINDS:
            raise ValueError(f"FLOP kind must be one of {FLOP_KINDS}, got {kind!r}")
        self.flops[kind] = self.flops.get(kind, 0) + int(flops)
        self.flops["total"] = sum(self.flops.get(k, 0) for k in FLOP_KINDS)

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    def write(self, path: str | Path) -> Path:
        """Write as indented JSON, atomically. Returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict) -> "Results":
        raw = dict(raw)
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"results schema {raw.get('schema')!r} is not {SCHEMA}")
        raw["evaluations"] = {k: valid_evaluation(v) for k, v in raw.get("evaluations", {}).items()}
        for name in ("settings", "data", "flops", "seconds", "details"):  # the shapes the report reads
            if not isinstance(raw.get(name, {}), dict):
                raise ValueError(f"{name!r} is {type(raw[name]).__name__}, not an object")
        if not isinstance(raw.get("stage"), str):
            raise ValueError("'stage' is not a string")
        return cls(**raw)

    @classmethod
    def load(cls, path: str | Path) -> "Results":
        """Read a ``results.json``. Raises ValueError naming the file if it is not one of this schema."""
        try:
            if not Path(path).is_file():  # a FIFO would block the read
                raise ValueError("not a regular file")
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a results.json of schema {SCHEMA}: {err}") from None


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` (dicts, lists, dataclasses, NumPy values; NaN becomes null) as indented JSON, atomically."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    atomic_write(path, json.dumps(_jsonable(obj), indent=2) + "\n")
    return Path(path)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, Path):
        return x.name
    return x


def find_results(root: str | Path) -> dict[str, Results]:
    """Every ``results.json`` under ``root`` (any depth) that follows this schema: ``{relative dir: Results}``,
    sorted by directory. Other files are skipped: another tool's results.json (a JSON object with neither "schema"
    nor "stage") silently, a damaged one (not JSON, not a regular file, or a stage's that fails the schema) with a
    one-line warning on stderr naming it."""
    root = Path(root)
    found = {}
    for path in sorted(root.rglob("results.json")):
        try:
            found[str(path.parent.relative_to(root))] = Results.load(path)
        except ValueError as err:
            if not _another_tools(path):
                print(f"warning: skipped {err}", file=sys.stderr)
    return found


def _another_tools(path: Path) -> bool:
    """Whether ``path`` is a readable JSON object that claims no stage and no schema: the results.json of another
    tool (``scripts/reforecast.py`` writes one), skipped without a warning; a damaged file is warned about."""
    try:
        raw = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "schema" not in raw and "stage" not in raw


def read_record(path: Path, valid, advice: str) -> dict:
    """The JSON object a stage wrote in ``path`` (point.json, a rung record, untrained.json), once ``valid(record)``
    has read what the stage needs from it (raising KeyError, TypeError or ValueError where it cannot).

    Raises UsageError naming the file, what is wrong with it (empty, not JSON, not an object, a field missing or
    malformed) and ``advice`` (what to do), never a traceback."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text, why = None, "not UTF-8 text"
    except OSError as err:
        raise UsageError(f"{path}: cannot read it ({err.strerror or err})") from None
    if text is not None:
        try:
            record = json.loads(text) if text.strip() else None
        except ValueError:
            record, why = None, "not JSON"
        else:
            why = "empty" if not text.strip() else None
        if why is None and not isinstance(record, dict):
            why = f"a JSON {type(record).__name__}, not an object"
        if why is None:
            try:
                valid(record)
                return record
            except KeyError as err:
                why = f"it has no {err.args[0]!r}"
            except (TypeError, ValueError, AttributeError, IndexError) as err:
                why = f"malformed ({' '.join(str(err).split())})"
    raise UsageError(f"{path}: not a readable record ({why}; damaged or edited by hand): {advice}")


def valid_evaluation(value) -> Evaluation:
    """``value`` as an :class:`Evaluation` with the scores tables read (for :func:`read_record` validators)."""
    evaluation = Evaluation(**value)
    for species in ("prey", "predator"):
        for key in ("mse", "mae", "r2"):
            evaluation.metrics[species][key]
    return evaluation


@dataclass
class Forecasts:
    """Forecasts of n trajectories.

    Attributes:
        values: [n, horizon, 2] in data units; the median over samples (NaN where no sample gave a value).
        samples: [n, num_samples, horizon, 2] every sample (NaN where unparsed or missing).
        texts: generated text per trajectory and sample (empty lists for forecasters that write no text).
        n_invalid, n_missing: [n] per trajectory, summed over samples (see :func:`data.llmtime.decode`).
        complete: [n] True if every sample parsed completely.
        flops: FLOPs counted while forecasting (coursework rules, forward only).
        prompt_tokens: prompt length per trajectory (LLM forecasters).
    """

    values: np.ndarray
    samples: np.ndarray
    texts: list[list[str]]
    n_invalid: np.ndarray
    n_missing: np.ndarray
    complete: np.ndarray
    flops: int = 0
    prompt_tokens: list[int] = field(default_factory=list)

    @classmethod
    def from_values(cls, values: np.ndarray) -> "Forecasts":
        """Forecasts of a forecaster that outputs numbers directly: ``values`` [n, H, 2], one sample, all complete."""
        n = len(values)
        return cls(values, values[:, None], [[] for _ in range(n)], np.zeros(n, int), np.zeros(n, int),
                   np.ones(n, bool))
