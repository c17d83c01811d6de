"""One loader (issue 34, item 1): every stage loads the base model through ``experiments.lib.loader.load_model``,
and computes inside ``loader.emulation``, a ``with`` block that runs bf16 matmuls in float32 kernels where bf16 is
emulated (its note printed once) and is left when the stage's work is done, also when it fails. bf16 emulation is
forced here on any CPU by replacing ``loader.emulated_precision``; the emulation is a counting
:class:`miniqwen.emulation.Float32Matmuls`, so that the tests see the matmuls it reroutes."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode, _get_current_dispatch_mode_stack

from conftest import REPO, run_forecast, toy_lora_argv
from experiments import baseline, context_length, final, lora_default, search, sweep, train
from experiments import forecast as forecast_stage
from experiments.lib import loader
from experiments.lib.errors import UsageError
from miniqwen.emulation import MATMUL_OPS, Float32Matmuls

NOTE = "note: bf16 is emulated here (test)"


@pytest.fixture
def emulated(monkeypatch):
    """bf16 on the CPU is emulated, whatever this CPU has; returns the list of matmuls the emulation rerouted."""
    rerouted = []

    class Counting(Float32Matmuls):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in MATMUL_OPS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
                rerouted.append(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

    def emulated_precision(device, precision):
        return NOTE if torch.device(device).type == "cpu" and precision == "bfloat16" else None

    monkeypatch.setattr(loader, "emulated_precision", emulated_precision)
    monkeypatch.setattr(loader, "Float32Matmuls", Counting)
    assert _get_current_dispatch_mode() is None
    yield rerouted
    assert _get_current_dispatch_mode() is None  # nothing left entered for the rest of the process


def matmul_bf16():
    a = torch.ones(2, 3, dtype=torch.bfloat16)
    return a @ a.T


# ------------------------------------------------------------------------------------------- the block itself

def test_the_emulation_block_is_entered_once_printed_once_and_left(emulated, capsys):
    with loader.emulation("cpu", "bfloat16") as on:
        assert on and isinstance(_get_current_dispatch_mode(), Float32Matmuls)
        with loader.emulation(torch.device("cpu"), "bfloat16") as inner:  # nested: no second mode, no second note
            assert inner and len(_get_current_dispatch_mode_stack()) == 1
            matmul_bf16()
    assert _get_current_dispatch_mode() is None
    assert emulated == [torch.ops.aten.mm.default]
    assert capsys.readouterr().err.count(NOTE) == 1
    with pytest.raises(RuntimeError, match="boom"), loader.emulation("cpu", "bfloat16"):
        raise RuntimeError("boom")
    assert _get_current_dispatch_mode() is None and loader._emulating == 0  # left on the way out of a failure
    capsys.readouterr()
    with loader.emulation("cpu", "float32") as on:  # nothing emulated: nothing entered, nothing said
        assert not on and _get_current_dispatch_mode() is None
    assert NOTE not in capsys.readouterr().err


def test_without_emulation_the_block_is_a_no_op(capsys):
    with loader.emulation("cpu", "float32") as on:
        assert not on and _get_current_dispatch_mode() is None
    assert capsys.readouterr().err == ""


def test_load_model_resolves_the_device_and_dtype_and_refuses_a_foreign_tokenizer(tiny_full_vocab, tmp_path):
    loaded = loader.load_model(str(tiny_full_vocab), "cpu", "bfloat16")
    assert loaded.device == torch.device("cpu") and loaded.precision == "bfloat16"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16 and not loaded.model.training
    assert loaded.weights == tiny_full_vocab.name
    assert loader.load_model(str(tiny_full_vocab), "cpu", "auto").precision == loader.resolve_precision(
        "auto", torch.device("cpu"))
    master = loader.load_model(str(tiny_full_vocab), "cpu", "bfloat16", weights_dtype="float32")
    assert master.precision == "bfloat16" and next(master.model.parameters()).dtype == torch.float32
    # a config whose vocabulary is smaller than its tokenizer's ids: refused, unless the caller tokenizes nothing
    small = tmp_path / "small"
    small.mkdir()
    for f in tiny_full_vocab.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config = json.loads((small / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(small / "model.safetensors"))
    weights = {k: (v[:1000].contiguous() if "embed_tokens" in k or "lm_head" in k else v) for k, v in weights.items()}
    save_file(weights, str(small / "model.safetensors"), metadata={"format": "pt"})
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    from miniqwen import WeightsError

    with pytest.raises(WeightsError, match="vocab_size 1000 is smaller"):
        loader.load_model(str(small), "cpu", "float32")
    assert loader.load_model(str(small), "cpu", "float32", check_tokenizer=False).model.config.vocab_size == 1000


# ------------------------------------------------------------------------------- the stages hold it and leave it

def baseline_argv(model, data, out, *extra):
    return [str(a) for a in ("--model", model, "--data", data, "--out", out, "--ledger", out.parent / "ledger.jsonl",
                             "--device", "cpu", "--limit", "2", "--context-steps", "8", "--horizon", "2",
                             "--gen-batch-size", "2", "--loss-limit", "0", "--plots", "0", "--no-progress", *extra)]


@pytest.fixture
def inside(monkeypatch):
    """Wrap ``module.name`` so that each call records whether it ran inside the emulation; returns the records."""
    seen = []

    def wrap(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen.append((name, isinstance(_get_current_dispatch_mode(), Float32Matmuls)))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    return seen, wrap


def test_baseline_forecasts_inside_the_emulation_and_leaves_it(emulated, inside, tiny_full_vocab, sim_file,
                                                               tmp_path, capsys):
    from experiments.lib import runs

    seen, wrap = inside
    wrap(runs, "forecast_and_save")
    assert baseline.main(baseline_argv(tiny_full_vocab, sim_file, tmp_path / "run", "--precision", "bfloat16")) == 0
    assert seen == [("forecast_and_save", True)] and emulated
    assert capsys.readouterr().err.count(NOTE) == 1


def test_lora_default_trains_and_forecasts_inside_the_emulation_and_leaves_it(emulated, inside, tiny_full_vocab,
                                                                              tmp_path, capsys):
    from experiments.lib import runs

    seen, wrap = inside
    wrap(runs, "train_lora")
    wrap(runs, "forecast_and_save")
    assert lora_default.main(toy_lora_argv(tiny_full_vocab, tmp_path, "1e-3", "--precision", "bfloat16")) == 0
    assert seen == [("forecast_and_save", True), ("train_lora", True), ("forecast_and_save", True)]
    assert emulated and capsys.readouterr().err.count(NOTE) == 1
    assert json.loads((tmp_path / "run" / "training" / "summary.json").read_text())["steps"] == 2


def test_a_stage_that_fails_inside_the_block_leaves_it(emulated, tiny_full_vocab, tmp_path):
    argv = toy_lora_argv(tiny_full_vocab, tmp_path, "1e-3", "--precision", "bfloat16")
    i = argv.index("--batch-size")
    argv[i + 1] = "1000"  # more than the training chunks: refused inside the block, before anything is spent
    with pytest.raises(UsageError, match="--batch-size 1000"):
        lora_default.main(argv)


def series_csv(path, n=30):
    t = np.arange(n)
    rows = "".join(f"{i},{2 + np.sin(i / 3):.4f},{2 + np.cos(i / 3):.4f}\n" for i in t)
    path.write_text("time,prey,predator\n" + rows)
    return path


def test_the_forecast_stage_runs_the_llm_inside_the_emulation(emulated, tiny_full_vocab, tmp_path, capsys):
    data = series_csv(tmp_path / "s.csv")
    code, out, err = run_forecast(["--data", data, "--model", tiny_full_vocab, "--method", "llm", "--device", "cpu",
                                   "--precision", "bfloat16", "--context-steps", "12", "--horizon", "2",
                                   "--out", tmp_path / "f", "--no-progress"], capsys)
    assert code == 0, err
    assert emulated, "the forecast's bf16 matmuls did not run in the emulation"
    assert err.count(NOTE) == 1  # the stage's block, not again by the forecast inside it
    assert "computing on cpu in bfloat16" in out


def test_the_forecast_api_runs_the_llm_inside_the_emulation(emulated, tiny_full_vocab, capsys):
    t = np.arange(20)
    x = np.c_[2 + np.sin(t / 3), 2 + np.cos(t / 3)]
    result = forecast_stage.forecast(x, 2, model=str(tiny_full_vocab), device="cpu", precision="bfloat16",
                                     progress=False)
    assert result.values.shape == (2, 2) and emulated
    assert capsys.readouterr().err.count(NOTE) == 1


def test_experiments_train_trains_inside_the_emulation(emulated, inside, tiny_full_vocab, tmp_path, capsys):
    from data.chunks import Chunks

    seen, wrap = inside
    wrap(train, "train_lora")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (6, 16), generator=g)
    train.save_chunks(Chunks(ids, torch.ones_like(ids)), tmp_path / "train.safetensors")
    argv = ["--model", str(tiny_full_vocab), "--out", str(tmp_path / "t"), "--train-chunks",
            str(tmp_path / "train.safetensors"), "--context-length", "16", "--batch-size", "2", "--max-steps", "2",
            "--no-ledger", "--no-progress", "--device", "cpu", "--precision", "bfloat16"]
    assert train.main(argv) == 0
    assert seen == [("train_lora", True)]
    assert torch.ops.aten.mm.default in emulated  # float32 weights autocast to bf16: its matmuls are rerouted
    assert capsys.readouterr().err.count(NOTE) == 1


# ------------------------------------------------------------------------------------ every stage, one loader

class Loaded(Exception):
    """Raised by the test's load_model once it has recorded the call: the stage stops where it loads."""


@pytest.fixture
def one_loader(monkeypatch):
    """Replace ``loader.load_model`` by one that records its call and stops the stage, and fail on any read of
    weights outside it (a second load path)."""
    calls = []
    import miniqwen.loading

    real_read = miniqwen.loading._read_state_dict

    def read_state_dict(*args, **kwargs):
        frames = [(f.function, f.filename) for f in inspect.stack()]
        assert ("load_model", loader.__file__) in frames, "weights read outside loader.load_model"
        return real_read(*args, **kwargs)

    def load_model(model, device=None, precision="auto", **kwargs):
        calls.append((str(model), loader.placement(device, precision), kwargs))
        raise Loaded

    monkeypatch.setattr(miniqwen.loading, "_read_state_dict", read_state_dict)
    monkeypatch.setattr(loader, "load_model", load_model)
    return calls


def stage_argv(stage, model, data, out):
    argv = ["--model", model, "--data", data, "--out", out, "--ledger", out.parent / "l.jsonl", "--device", "cpu",
            "--precision", "float32", "--limit", "2", "--context-steps", "8", "--horizon", "2", "--gen-batch-size", "2"]
    if stage != "baseline":
        argv += ["--batch-size", "2", "--context-length", "48", "--eval-batches", "1", "--max-steps", "1",
                 "--no-progress"]
    return [str(a) for a in argv + STAGES[stage][1]]


STAGES = {
    "baseline": (baseline.main, ["--loss-limit", "0"]),
    "lora_default": (lora_default.main, []),
    "sweep": (sweep.main, ["--lrs", "1e-3", "--ranks", "2"]),
    "context_length": (context_length.main, ["--contexts", "48", "--lr", "1e-3", "--rank", "2"]),
    "search": (search.main, ["--lrs", "1e-3", "--ranks", "2", "--min-steps", "1", "--rungs", "1"]),
    "final": (final.main, ["--lr", "1e-3", "--rank", "2", "--orders", "1,2", "--peer-indices", "none"]),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_loads_through_the_one_loader(one_loader, tiny_full_vocab, sim_file, tmp_path, stage):
    with pytest.raises(Loaded):
        STAGES[stage][0](stage_argv(stage, tiny_full_vocab, sim_file, tmp_path / stage))
    assert one_loader == [(str(tiny_full_vocab), (torch.device("cpu"), "float32"), {})]
    assert _get_current_dispatch_mode() is None


def test_forecast_and_train_load_through_the_one_loader(one_loader, tiny_full_vocab, tmp_path):
    with pytest.raises(Loaded):
        forecast_stage.main([str(a) for a in ("--data", series_csv(tmp_path / "s.csv"), "--model", tiny_full_vocab,
                                              "--device", "cpu", "--precision", "float32", "--out", tmp_path / "f",
                                              "--context-steps", "12", "--horizon", "2")])
    from data.chunks import Chunks

    ids = torch.ones(4, 16, dtype=torch.long)
    train.save_chunks(Chunks(ids, torch.ones_like(ids)), tmp_path / "c.safetensors")
    with pytest.raises(Loaded):
        train.main(["--model", str(tiny_full_vocab), "--out", str(tmp_path / "t"), "--train-chunks",
                    str(tmp_path / "c.safetensors"), "--context-length", "16", "--no-ledger"])
    # experiments.train keeps float32 weights, tokenizes nothing and defaults to the CPU and float32
    assert one_loader == [(str(tiny_full_vocab), (torch.device("cpu"), "float32"), {}),
                          (str(tiny_full_vocab), (torch.device("cpu"), "float32"),
                           {"weights_dtype": "float32", "check_tokenizer": False})]


def test_reforecast_loads_through_the_one_loader(one_loader, tiny_full_vocab, sim_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {s: {"mse": 1.0, "mae": 1.0, "r2": 0.0} for s in ("prey", "predator")}
    (run / "results.json").write_text(json.dumps({
        "settings": {"run": {"precision": "float32", "seed": 0}, "data": {"scale_quantile": 0.99, "scale_target": 10},
                     "forecast": {"samples": 1, "temperature": 0.7, "top_p": 0.9, "gen_batch_size": 2,
                                  "prompt": "raw"}},
        "evaluations": {"lora": {"trajectories": [32, 33], "split": "validation", "context_steps": 8, "horizon": 2,
                                 "metrics": metrics}}}))
    spec = importlib.util.spec_from_file_location("reforecast", REPO / "scripts" / "reforecast.py")
    reforecast = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reforecast)
    monkeypatch.setattr(sys, "argv", ["reforecast.py", "--run", str(run), "--model", str(tiny_full_vocab), "--data",
                                      str(sim_file), "--out", str(tmp_path / "out"), "--ledger",
                                      str(tmp_path / "l.jsonl")])
    with pytest.raises(Loaded):
        reforecast.main()
    assert one_loader == [(str(tiny_full_vocab), loader.placement(None, "float32"), {})]
