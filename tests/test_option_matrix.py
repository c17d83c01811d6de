"""Issue 35, item 10: a standing matrix. Every numeric command-line option of every stage (read from the stage's own
parser, so that a new one is covered the day it is added) × the bad numbers {negative, 0, 1e30, 1e400, nan, inf,
other scripts' digits, full-width digits, hex, empty}, and damaged inputs (weights, tokenizer, a LoRA adapter, a
finished training run resumed). Each case ends in exit status 2 and one line on stderr naming the problem, with
nothing written to ``--out`` and nothing charged to the ledger — or, where the value is legal (:data:`LEGAL`,
decided from the option's help and its validation in ``experiments/lib/cli.py`` and ``settings.py``), in what it
means. Nothing here runs a forecast or a training step where a refusal is expected: the model's load is replaced by
a stop (:class:`ReachedTheModel`), so a legal value shows that it passed every check that comes before the model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
from safetensors.torch import load_file, save_file

import experiments
from experiments.lib import cli
from experiments.lib.cli import run_cli
from conftest import lora_args, refused, snapshot

#: the bad numbers, by name (the test ids)
BAD_VALUES = {"negative": "-1", "zero": "0", "1e30": "1e30", "1e400": "1e400", "nan": "nan", "inf": "inf",
              "arabic-indic 1e-4": "\u0661e-4", "arabic-indic 3": "\u0663", "full-width 3": "\uff13", "hex": "0x10",
              "empty": ""}

#: the (option's dest, value) pairs of the matrix that are legal, with the value they must parse to and why; every
#: other (stage, option, bad value) must be refused
LEGAL = {
    ("seed", "0"): (0, "any seed 0 .. 2**32 - 1"),
    ("decimals", "0"): (0, "0 .. 8 decimals: whole numbers"),
    ("plots", "0"): (0, "--plots 0 draws no PNG"),
    ("loss_limit", "0"): (0, "--loss-limit 0 skips the validation loss"),
    ("eval_every", "0"): (0, "0 = start and end only (early stopping, which needs more, is off in every base "
                             "command here)"),
    ("eval_batches", "0"): (0, "0 = every validation chunk"),
    ("early_stop_patience", "0"): (0, "--early-stop 0 = off"),
    ("warmup_steps", "0"): (0, "no warm-up"),
    ("weight_decay", "0"): (0.0, "AdamW without decay (0 <= wd < 1)"),
    ("temperature", "1e30"): (1e30, "finite and > 0, no upper bound: sampling near-uniform over the numeric "
                                    "alphabet — large, not wrong"),
    ("max_grad_norm", "1e30"): (1e30, "finite and > 0: a clipping that never clips"),
    # _none_or: "none" and "all" mean unset; an empty value is refused (an empty shell variable widens nothing)
    ("peer_indices", ""): ("", "empty = the default (850-999 on a 1,000-trajectory file, else none)"),
    ("index", "0"): (0, "the HDF5 file's first trajectory"),
    ("loss_chunks", "0"): (0, "benchmark: 0 = every chunk"),
    ("batch1_sample", "0"): (0, "benchmark: no batch-1 timing"),
    ("kill_rank", "0"): (0, "experiments.train: rank 0"),
}

#: cases that are not refused properly (real bugs): expected to fail until fixed
KNOWN_BUGS: dict = {}  # none known: each found one was fixed (final --peer-indices, train --kill-*)

#: options that take numbers but are read as text by the stage (no argparse type to find them by)
EXTRA_NUMERIC = {"sweep": ("--shard",)}
#: options a value is tested together with (the option does nothing without them)
COMPANIONS = {("forecast", "backtest_step"): ["--backtest", "2"]}
LEDGER_LINE = '{"time": "2026-01-01T00:00:00+00:00", "stage": "earlier", "kind": "train", "flops": 12345}\n'


# ------------------------------------------------------------------------------------------- the stages' options

class _Captured(Exception):
    pass


class ReachedTheModel(Exception):
    """Raised where a stage would load the model (or start its work): every check before it has passed. Not one of
    the errors :func:`run_cli` reports, so it reaches the test."""


def all_stages() -> list[str]:
    """Every module of ``experiments`` with a ``main``: the stages."""
    names = [m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.ispkg]
    return sorted(n for n in names if callable(getattr(importlib.import_module(f"experiments.{n}"), "main", None)))


def stage_parser(stage: str):
    """The parser ``experiments.<stage>.main`` parses its command line with (caught at its ``parse_args``)."""
    main, caught = importlib.import_module(f"experiments.{stage}").main, []

    def capture(self, *args, **kwargs):
        caught.append(self)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main([])
        except _Captured:
            pass
    return caught[0] if caught else None


def numeric_options(stage: str, parser) -> list[tuple[str, str]]:
    """``(flag, dest)`` of every option of ``parser`` that takes a number or a list of numbers: an int or float type
    (also ``_none_or`` ones and ``--llmtime-scale``'s), a number default, a list option of ``cli.NUMBER_LISTS``,
    or :data:`EXTRA_NUMERIC`."""
    found = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        kind = getattr(action.type, "__name__", None)
        number_default = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
        if (kind in ("int", "float", "number_or_fit") or number_default or action.dest in cli.NUMBER_LISTS
                or action.option_strings[0] in EXTRA_NUMERIC.get(stage, ())):
            found.append((action.option_strings[0], action.dest))
    return found


STAGES = all_stages()
PARSERS = {stage: stage_parser(stage) for stage in STAGES}


#: the study stages: their options of the settings groups are lora_default's (the same parser code, the same
#: validation), so those cases are marked slow (the whole matrix takes about a minute; -m "not slow" still covers
#: every option once, and each study's own options)
STUDIES = ("sweep", "context_length", "search", "final")


def matrix():
    shared = {dest for _, dest in numeric_options("lora_default", PARSERS["lora_default"])}
    for stage in STAGES:
        for flag, dest in numeric_options(stage, PARSERS[stage]) if PARSERS[stage] else []:
            for name, value in BAD_VALUES.items():
                bug = KNOWN_BUGS.get((stage, dest, value))
                marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
                marks += [pytest.mark.slow] if stage in STUDIES and dest in shared else []
                yield pytest.param(stage, flag, dest, value, marks=marks, id=f"{stage} {flag} {name}")


CASES = list(matrix())


# ------------------------------------------------------------------------------------------- running a stage

@pytest.fixture(scope="module")
def inputs(env, tmp_path_factory):
    """The tiny model and simulated data of ``env``, and a chunk file for experiments.train (read only)."""
    import torch

    from data.chunks import make_chunks
    from experiments.train import save_chunks

    chunks = tmp_path_factory.mktemp("matrix") / "chunks.safetensors"
    g = torch.Generator().manual_seed(2)
    save_chunks(make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16), chunks)
    return {**env, "chunks": chunks}


def base_argv(stage: str, inputs: dict, out: Path, ledger: Path) -> list[str]:
    """A command line of ``stage`` that passes every check (on the tiny model and data), into ``out``."""
    model, data = str(inputs["model"]), str(inputs["data"])
    common = ["--model", model, "--data", data, "--out", str(out), "--ledger", str(ledger), "--device", "cpu",
              "--precision", "float32", "--limit", "2", "--context-steps", "8", "--horizon", "3", "--plots", "0"]
    lora = ["--gen-batch-size", "2", "--batch-size", "2", "--context-length", "48", "--eval-batches", "1",
            "--eval-every", "0", "--checkpoint-every", "1", "--no-progress", "--max-steps", "2"]
    chosen = ["--lr", "1e-3", "--rank", "2"]
    return {
        "baseline": common + ["--gen-batch-size", "2", "--loss-limit", "0", "--no-progress"],
        "classical": common + ["--orders", "1,2", "--no-ode"],
        "lora_default": common + lora,
        "sweep": common + lora + ["--lrs", "1e-3", "--ranks", "2"],
        "context_length": common + lora + chosen + ["--contexts", "32,48"],
        "search": common + lora + ["--lrs", "1e-3", "--ranks", "2", "--min-steps", "1", "--eta", "2", "--rungs",
                                   "1"],
        "final": common + lora + chosen + ["--orders", "1,2", "--early-stop", "0", "--score-limit", "2",
                                           "--peer-indices", "none"],
        "forecast": ["--model", model, "--data", data, "--index", "1", "--out", str(out), "--device", "cpu",
                     "--precision", "float32", "--context-steps", "8", "--horizon", "3", "--no-progress"],
        "flops": ["--model", model, "--out", str(out), "--ledger", str(ledger)],
        "benchmark": ["--model", model, "--data", data, "--out", str(out), "--device", "cpu", "--sections", "peak",
                      "--repeats", "1", "--peak-size", "8", "--bandwidth-mib", "1"],
        "train": ["--model", model, "--train-chunks", str(inputs["chunks"]), "--out", str(out), "--ledger",
                  str(ledger), "--context-length", "16", "--batch-size", "2", "--max-steps", "2", "--device", "cpu",
                  "--precision", "float32", "--no-progress"],
        "report": ["--results", str(out.parent), "--ledger", str(ledger), "--out", str(out / "REPORT.md")],
    }[stage]


@pytest.fixture
def stop_at_the_model(monkeypatch):
    """Every stage stops (:class:`ReachedTheModel`) where it would load the model or start its work."""
    def reached(*args, **kwargs):
        raise ReachedTheModel

    import miniqwen.loading

    load_pretrained = miniqwen.loading.load_pretrained
    for name, module in list(sys.modules.items()):  # wherever it was imported to
        if name.split(".")[0] in ("miniqwen", "lora", "experiments") and \
                getattr(module, "load_pretrained", None) is load_pretrained:
            monkeypatch.setattr(module, "load_pretrained", reached)
    for target in ("experiments.benchmark.run_section", "experiments.classical.validated_forecasters"):
        monkeypatch.setattr(target, reached)  # the stages that run no model: where their work starts


def run_stage(stage: str, argv: list[str], capsys, monkeypatch=None):
    """``(outcome, stderr, the parsed namespace)`` of ``stage`` run as the command line runs it; the outcome is the
    exit status, or "reached the model"."""
    parsed = []
    if monkeypatch is not None:
        parse_args = argparse.ArgumentParser.parse_args

        def recording(self, *args, **kwargs):
            parsed.append(parse_args(self, *args, **kwargs))
            return parsed[-1]

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    main = importlib.import_module(f"experiments.{stage}").main
    capsys.readouterr()
    try:
        run_cli(lambda: main(argv))
        outcome = None  # run_cli always exits
    except SystemExit as exit_info:
        outcome = exit_info.code
    except ReachedTheModel:
        outcome = "reached the model"
    return outcome, capsys.readouterr().err, parsed[0] if parsed else None


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# --------------------------------------------------------------------------------------------- the matrix

def test_every_stage_has_a_command_line_here_and_parses_with_the_projects_parser(inputs, tmp_path):
    """A new stage needs a base command line in :func:`base_argv` (and then its numbers are in the matrix); every
    stage's parser is ``cli.ArgumentParser`` (one-line errors, no abbreviations)."""
    assert {"baseline", "classical", "lora_default", "sweep", "context_length", "search", "final", "forecast",
            "flops", "benchmark", "train", "report"} <= set(STAGES)
    for stage in STAGES:
        assert isinstance(PARSERS[stage], cli.ArgumentParser), stage
        base_argv(stage, inputs, tmp_path / "out", tmp_path / "ledger.jsonl")


def test_the_matrix_covers_the_options_it_should():
    """The enumeration finds the numeric options (a guard against it silently finding none), and the tables name
    only options that exist."""
    options = {(s, dest) for s in STAGES for _, dest in numeric_options(s, PARSERS[s])}
    for stage, dest in [("baseline", "loss_limit"), ("lora_default", "lr"), ("sweep", "lrs"), ("search", "eta"),
                        ("context_length", "contexts"), ("final", "peer_indices"), ("forecast", "llmtime_scale"),
                        ("benchmark", "counting_lengths"), ("train", "kill_rank"), ("classical", "orders"),
                        ("sweep", "shard")]:
        assert (stage, dest) in options
    dests = {dest for _, dest in options}
    assert {dest for dest, _ in LEGAL} <= dests and {(s, d) for s, d, _ in KNOWN_BUGS} <= options
    assert len(CASES) == len(options) * len(BAD_VALUES)


@pytest.mark.parametrize("stage,flag,dest,value", CASES)
def test_a_bad_number_is_refused_or_means_what_it_says(inputs, tmp_path, capsys, monkeypatch, stop_at_the_model,
                                                       stage, flag, dest, value):
    """``python -m experiments.<stage> <a base command line> <flag> <value>``: refused in one line naming the
    option, before --out is made or the ledger touched — or, for a :data:`LEGAL` value, parsed to what it means and
    accepted up to the model's load."""
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    ledger.write_text(LEDGER_LINE)
    before = snapshot(tmp_path)
    argv = base_argv(stage, inputs, out, ledger) + COMPANIONS.get((stage, dest), []) + [flag, value]
    outcome, err, parsed = run_stage(stage, argv, capsys, monkeypatch)
    if (dest, value) in LEGAL:  # accepted, with its meaning, and on to the model (or the work)
        expected, why = LEGAL[(dest, value)]
        assert outcome in (0, "reached the model"), f"{flag} {value!r} ({why}): {outcome!r}, {err!r}"
        assert parsed is not None and same(getattr(parsed, dest), expected), (getattr(parsed, dest, None), why)
        assert ledger.read_text() == LEDGER_LINE
    else:
        assert outcome == 2, f"{flag} {value!r}: {outcome!r}, {err!r}"
        refused(outcome, err, flag)  # one line "error: …" naming the option
        assert snapshot(tmp_path) == before  # --out never made, the ledger as it was


# ------------------------------------------------------------------------------------- damaged weights

def _edit_weights(model: Path, edit) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def _drop(tensors):
    del tensors["model.norm.weight"]


def _narrow(tensors):
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()


def _nan(tensors):
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")


WEIGHT_DAMAGE = {  # name: (damage to a copy of the model directory, words the error names)
    "missing key": (lambda m: _edit_weights(m, _drop), ["model.norm.weight", "missing"]),
    "wrong shape": (lambda m: _edit_weights(m, _narrow), ["model.layers.0.mlp.down_proj.weight", "shape"]),
    "nan": (lambda m: _edit_weights(m, _nan), ["model.layers.1.self_attn.q_proj.weight", "NaN"]),
    "no tokenizer.json": (lambda m: (m / "tokenizer.json").unlink(), ["tokenizer.json"]),
}

@pytest.fixture(scope="module")
def damaged_models(inputs, tmp_path_factory):
    """{damage: a copy of the tiny model with that damage} (read only)."""
    models = {}
    for name, (damage, _) in WEIGHT_DAMAGE.items():
        models[name] = tmp_path_factory.mktemp("damaged") / "model"
        shutil.copytree(inputs["model"], models[name])
        damage(models[name])
    return models


@pytest.mark.parametrize("stage", ["baseline", "train", "forecast"])
@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE))
def test_damaged_weights_are_one_line_and_change_nothing(inputs, damaged_models, tmp_path, capsys, damage, stage):
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    ledger.write_text(LEDGER_LINE)
    before = snapshot(tmp_path)
    argv = base_argv(stage, {**inputs, "model": damaged_models[damage]}, out, ledger)
    outcome, err, _ = run_stage(stage, argv, capsys)
    refused(outcome, err, *WEIGHT_DAMAGE[damage][1])
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------- a damaged adapter

@pytest.fixture(scope="module")
def adapter(lora_run):
    """The PEFT adapter of the finished toy LoRA run, with its card and README (read only)."""
    return lora_run / "peft_adapter"


def _config(edit):
    def damage(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    return damage


def _other_base(path: Path) -> None:
    """The same card, LoRA of the same rank and targets, on a base twice as wide."""
    from lora import apply_lora, export_peft
    from miniqwen import Qwen2Config, Qwen2ForCausalLM

    card = json.loads((path / "miniqwen_llmtime.json").read_text())
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    config = json.loads((path / "adapter_config.json").read_text())
    apply_lora(model, rank=config["r"], targets=tuple(config["target_modules"]))
    shutil.rmtree(path)
    export_peft(model, path, "another-base", extra={"miniqwen_llmtime.json": card})


def _chop(path: Path, keep: float | None = None, drop: int = 0) -> None:
    """Cut ``path`` to the fraction ``keep`` of its bytes, or drop its last ``drop`` bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep is not None else data[:-drop])


def _garble_header(path: Path) -> None:
    data = bytearray((path / "adapter_model.safetensors").read_bytes())
    data[8:16] = b"garbage!"
    (path / "adapter_model.safetensors").write_bytes(bytes(data))


ADAPTER_DAMAGE = {  # name: (damage to a copy of the adapter directory, words the error names)
    "no weights file": (lambda a: (a / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors"]),
    "no adapter_config.json": (lambda a: (a / "adapter_config.json").unlink(), ["adapter_config.json"]),
    "another rank": (_config({"r": 8, "lora_alpha": 8}), ["adapter_model.safetensors", "do not fit"]),
    "another base": (_other_base, ["adapter_model.safetensors", "do not fit"]),
    "truncated safetensors": (lambda a: _chop(a / "adapter_model.safetensors", keep=0.5),
                              ["adapter_model.safetensors"]),
    "garbled safetensors header": (_garble_header, ["adapter_model.safetensors"]),
    "no card": (lambda a: (a / "miniqwen_llmtime.json").unlink(), ["miniqwen_llmtime.json", "--llmtime-scale"]),
}


def forecast_argv(inputs, adapter_dir: Path, out: Path) -> list[str]:
    """experiments.forecast of trajectory 1 with the adapter ``adapter_dir`` into ``out`` (it takes no ledger)."""
    return base_argv("forecast", inputs, out, ledger=Path("unused")) + ["--adapter", str(adapter_dir)]


@pytest.mark.parametrize("damage", list(ADAPTER_DAMAGE))
def test_a_damaged_adapter_is_one_line_and_writes_nothing(inputs, adapter, tmp_path, capsys, damage):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    ADAPTER_DAMAGE[damage][0](copy)
    before = snapshot(tmp_path)
    outcome, err, _ = run_stage("forecast", forecast_argv(inputs, copy, tmp_path / "out"), capsys)
    refused(outcome, err, *ADAPTER_DAMAGE[damage][1])
    assert snapshot(tmp_path) == before


def test_an_adapter_without_its_readme_forecasts_as_with_it(inputs, adapter, tmp_path, capsys):
    """The README.md (the Hub model card) is documentation: without it the adapter gives the same forecast."""
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    (copy / "README.md").unlink()
    for source, out in ((adapter, tmp_path / "with"), (copy, tmp_path / "without")):
        outcome, err, _ = run_stage("forecast", forecast_argv(inputs, source, out), capsys)
        assert outcome == 0, err
    assert (tmp_path / "with" / "forecast.csv").read_text() == (tmp_path / "without" / "forecast.csv").read_text()


# ------------------------------------------------------------------------------ a damaged finished training run

def _replace(args: list[str], option: str, value: str) -> list[str]:
    i = args.index(option)
    return args[:i + 1] + [value] + args[i + 2:]


def _garbage(path: Path) -> None:
    path.write_bytes(b"{not json")


def _edited_step(path: Path) -> None:
    state = json.loads(path.read_text())
    state["loop"]["step"] = 1000
    path.write_text(json.dumps(state))


def _garbage_line(index: int):
    def damage(path: Path) -> None:
        lines = path.read_bytes().splitlines(keepends=True)
        lines[index] = b"{not json\n"
        path.write_bytes(b"".join(lines))
    return damage


RUN_DAMAGE = {  # name: (file, damage, words the error names); file "LEDGER" is the ledger
    "state.json garbled": ("training/checkpoint/state.json", _garbage, ["state.json"]),
    "state.json edited": ("training/checkpoint/state.json", _edited_step, ["state.json", "checksum"]),
    "optimizer truncated": ("training/checkpoint/optimizer.safetensors", lambda p: _chop(p, keep=0.5),
                            ["optimizer.safetensors", "checksum"]),
    "run.json garbled": ("run.json", _garbage, ["run.json"]),
    "run.json a list": ("run.json", lambda p: p.write_text("[]"), ["run.json"]),
    "ledger line garbled": ("LEDGER", _garbage_line(0), ["ledger.jsonl:1", "not JSON"]),
    "ledger last line torn": ("LEDGER", lambda p: _chop(p, drop=10), ["ledger.jsonl", "torn"]),
}


@pytest.fixture
def run_copy(env, lora_run, tmp_path):
    """A copy of the finished toy run (2 steps) and of its ledger, and the command line that resumes it to 3."""
    out, ledger = tmp_path / "run", tmp_path / "ledger.jsonl"
    shutil.copytree(lora_run, out)
    shutil.copy(env["ledger"], ledger)
    return out, ledger, _replace(lora_args(env, out), "--ledger", str(ledger)) + ["--max-steps", "3", "--resume"]


@pytest.mark.parametrize("damage", list(RUN_DAMAGE))
def test_a_damaged_run_is_not_resumed(run_copy, tmp_path, capsys, damage):
    out, ledger, argv = run_copy
    name, edit, words = RUN_DAMAGE[damage]
    edit(ledger if name == "LEDGER" else out / name)
    before = snapshot(tmp_path)
    outcome, err, _ = run_stage("lora_default", argv, capsys)
    refused(outcome, err, *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", [
    "last line torn",
    "a middle line garbled",  # not what a kill leaves: refused, naming the log
])
def test_a_damaged_log_is_resumed_to_a_whole_log_or_refused(run_copy, capsys, damage):
    """A torn last line is what a kill leaves: the resume drops it and goes on. The resumed run is right: three
    steps, a log of readable lines with every step once, and only step 3 charged."""
    out, ledger, argv = run_copy
    log = out / "training" / "log.jsonl"
    if damage == "last line torn":
        _chop(log, drop=10)
    else:
        _garbage_line(1)(log)
    spent = ledger.read_text()
    outcome, err, _ = run_stage("lora_default", argv, capsys)
    if outcome == 2:  # refused: one line naming the log, nothing charged
        refused(outcome, err, "log.jsonl")
        assert ledger.read_text() == spent
        return
    assert outcome == 0, err
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries if e["kind"] == "train"] == [1, 2, 3]
    assert json.loads((out / "training" / "summary.json").read_text())["steps"] == 3
    charged = ledger.read_text()
    assert charged.startswith(spent)
    new = [json.loads(line) for line in charged[len(spent):].splitlines()]
    assert new and all(e.get("step") in (None, 3) and e.get("what") != "untrained forecast" for e in new), new
