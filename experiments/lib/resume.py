"""What a ``--resume`` must give again: the settings that define a run (:data:`RUN_DEFINING`), compared with what
the run recorded — its run record, its results.json, its training checkpoint — before the model loads and before
anything is written or charged, so that a refused resume leaves the run exactly as it was."""

from __future__ import annotations

import dataclasses

from .errors import UsageError
from .run_directory import Contents, dig, read_json
from .settings import GROUPS, TrainSettings
from .training.checkpoint import find_checkpoint, read_checkpoint


#: The settings that define a run, by group: ``--resume`` must give the same ones, and :class:`Session` compares
#: them with what the run recorded before the model loads and before anything is written or charged. The weights
#: and the data are compared by identity (sha256, not by name), the compute dtype as resolved (``--precision auto``
#: picks by device), and with the cosine learning-rate schedule also ``max_steps``. ``gen_batch_size`` is one of
#: them: the rows batched together (their padding, the sampling seeds per batch) change the forecasts. Everything
#: else may differ on a resume: where to compute (``--device``), the ledger, ``--force``, progress bars, ``--plots``
#: (figures only), how long to train (``--max-steps``), when to evaluate, checkpoint or stop early, whether to
#: restore the best weights and what "best" means (``--select-by``), ``--compile``.
RUN_DEFINING = {
    "run": ("seed",),
    "data": ("decimals", "encoding", "scaling", "scale_quantile", "scale_target"),
    "forecast": ("split", "limit", "context_steps", "horizon", "prompt", "samples", "temperature", "top_p",
                 "gen_batch_size"),
    "lora": ("rank", "lora_alpha", "targets", "head_bias"),
    "train": tuple(k for k in TrainSettings.RESUME_FIXED if k not in TrainSettings.RESELECTABLE),
}



def _option(field: str) -> str:
    """A settings field's command-line option: ``gen_batch_size`` -> ``--gen-batch-size``."""
    return "--" + field.replace("_", "-")



def comparable(value):
    """A setting as JSON reads it back (tuples are lists): as a record keeps it, to compare with one given now."""
    return list(value) if isinstance(value, tuple) else value



def _spelled(option: str, value) -> str:
    """``option`` with ``value`` as it is typed: ``--seed 0``, ``--targets q_proj,v_proj``, ``--limit none``,
    ``--head-bias`` / ``--no-head-bias``."""
    if isinstance(value, bool):
        return option if value else "--no-" + option[2:]
    if isinstance(value, (list, tuple)):
        return f"{option} {','.join(map(str, value))}"
    return f"{option} {'none' if value is None else value}"


def check_same_settings(found: Contents, now: dict, *, varies: tuple = (), study: dict | None = None,
                        max_steps: int | None = None, precision: str, asked_precision: str) -> None:
    """Refuse (UsageError, one line naming each option that differs) to resume the run ``found`` with other settings
    that define it (:data:`RUN_DEFINING`, of the groups in ``now``, the settings record of this command, but for
    the fields its points vary, ``varies``; the stage's own ``study`` options; the compute dtype as resolved,
    ``precision``, asked for as ``asked_precision``) than the run was made with. What it was made with is what it
    recorded: its run record's settings, its results.json's and, for a stage that trains (``max_steps`` given), its
    training checkpoint (``training/``: the training and LoRA settings, seed and dtype its steps were taken with; a
    damaged checkpoint is refused here too, naming the file; ``max_steps`` below its step is refused: a resume cannot
    take steps back), else the dtype of its untrained forecast (untrained.json). Reads only."""
    out, study = found.path, {k: comparable(v) for k, v in (study or {}).items()}
    record, results = dig(found.record, "settings"), dig(found.results, "settings")
    sources = [s for s in (record, results) if isinstance(s, dict)]
    dtypes = [dig(record, "run", "precision"), dig(results, "run", "precision")]  # as given: "auto" says nothing
    ckpt = find_checkpoint(out / "training") if max_steps is not None else None
    if ckpt is not None:  # the dtype the steps were taken in, as resolved
        state = read_checkpoint(ckpt).state
        done = dig(state, "loop", "step")
        if isinstance(done, int) and done > max_steps:
            raise UsageError(f"--max-steps {max_steps}: the run in {out} has already taken {done} steps; "
                             f"resume with --max-steps {done} or more, or choose another --out")
        sources.append({"train": state.get("settings"), "lora": state.get("lora"),
                        "run": {"seed": state["seed"]} if "seed" in state else None})
        dtypes.append(state.get("precision"))
    else:  # the untrained forecast's, as resolved
        dtypes.append(dig(read_json(out / "untrained.json"), "settings", "run", "precision"))
    changed: dict[str, tuple] = {}  # option -> (its value now, the run's)
    cosine = dig(now, "train", "lr_schedule") == "cosine"  # TrainSettings.schedule_depends_on_max_steps
    for source in sources:
        for group, fields in RUN_DEFINING.items():
            saved = source.get(group)
            if group not in now or not isinstance(saved, dict):
                continue
            defaults = {f.name: f.default for f in dataclasses.fields(GROUPS[group])}
            for name in fields + (("max_steps",) if group == "train" and cosine else ()):
                if name in varies:
                    continue
                was, is_ = saved.get(name, defaults[name]), now[group].get(name, defaults[name])
                if comparable(was) != comparable(is_):
                    changed.setdefault(_option(name), (is_, was))
    recorded = dig(record, "study")
    for name, value in study.items():  # the stage's own options (a study's grid), as its record kept them
        if isinstance(recorded, dict) and name in recorded and recorded[name] != value:
            changed.setdefault(_option(name), (value, recorded[name]))
    for dtype in dtypes:
        if isinstance(dtype, str) and dtype != "auto" and dtype != precision:
            changed.setdefault("--precision", (asked_precision if asked_precision == precision else
                                               f"{asked_precision} ({precision} here)", dtype))
    if changed:
        options = list(changed)
        raise UsageError(f"{', '.join(_spelled(o, changed[o][0]) for o in options)}: the run in {out} was "
                         f"made with {', '.join(_spelled(o, changed[o][1]) for o in options)}; resume with the "
                         f"same {' and '.join(options)}, or choose another --out")
