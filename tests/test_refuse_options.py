"""Option parsing and values: a bad, abbreviated or out-of-range command-line value (a scalar or an element of a
list), a batch the chunks or the processes cannot share, and a bad SLURM array variable end in one line (exit status
2) before any model is loaded or any FLOP is spent, and nothing already on disk (results, ledger, checkpoints)
changes; the choices that options make (--split, --plots 0, --no-progress) are honoured."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import (checksums, cli, error_line, exit_err, exit_err_out, lora_args, refused, snapshot,
                      stage_args)
from data.chunks import make_chunks
from experiments import baseline, benchmark, classical, context_length, final, lora_default, search, sweep
from experiments.lib.budget import Ledger
from experiments.lib.errors import UsageError


# ------------------------------------------------------------------------------------- scalar values, stage by stage

BASELINE = [
    (["--gen-batch-size", "-1"], "--gen-batch-size"), (["--gen-batch-size", "0"], "--gen-batch-size"),
    (["--decimals", "-1"], "--decimals"), (["--samples", "0"], "--samples"), (["--samples", "-2"], "--samples"),
    (["--loss-context-length", "0"], "--loss-context-length"), (["--loss-batch-size", "0"], "--loss-batch-size"),
    (["--top-p", "0"], "--top-p"), (["--scale-quantile", "2"], "--scale-quantile"),
    (["--scale-target", "0"], "--scale-target"), (["--device", "banana"], "--device"), (["--seed", "-1"], "--seed"),
    (["--plots", "-1"], "--plots"), (["--limit", "-1"], "--limit"), (["--loss-limit", "-1"], "--loss-limit"),
    (["--temperature", "-1", "--samples", "3"], "--temperature"), (["--context-steps", "0"], "--context-steps"),
    (["--horizon", "0"], "--horizon"), (["--temperature", "nan", "--samples", "2"], "--temperature"),
]
if not torch.cuda.is_available():
    BASELINE.append((["--device", "cuda"], "--device"))


LORA = [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--rank", "0"], "--rank"), (["--rank", "-2"], "--rank"),
    (["--lora-alpha", "0"], "--lora-alpha"), (["--context-length", "1"], "--context-length"),
    (["--batch-size", "0"], "--batch-size"), (["--max-steps", "0"], "--max-steps"), (["--stride", "0"], "--stride"),
    (["--stride", "-5"], "--stride"), (["--targets", "nonsense"], "--targets"), (["--targets", ","], "--targets"),
    (["--eval-every", "-1"], "--eval-every"), (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--gen-batch-size", "0"], "--gen-batch-size"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"), (["--train-limit", "-1"], "--train-limit"),
    (["--limit", "-1"], "--limit"), (["--early-stop", "2", "--eval-every", "0"], "--early-stop"),
    (["--max-steps", "\u0662"], "--max-steps"), (["--lr", "\u0661e-4"], "--lr"),  # other scripts' digits
]


@pytest.mark.parametrize("stage,argv,option", [(baseline, a, o) for a, o in BASELINE] +
                         [(lora_default, a, o) for a, o in LORA],
                         ids=[f"baseline{' '.join(a)}" for a, _ in BASELINE] + [f"lora{' '.join(a)}" for a, _ in LORA])
def test_bad_option_is_one_line_before_any_work(setup, tmp_path, capsys, stage, argv, option):
    ledger_before = (setup / "ledger.jsonl").read_text()
    out = tmp_path / "out"
    # the model does not exist: an error about it would mean the option was not checked first
    code, err = exit_err(stage.main, ["--model", str(tmp_path / "no-model"), "--data", str(setup / "lv.h5"),
                                      "--out", str(out), "--ledger", str(setup / "ledger.jsonl"), *argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], err
    assert "no-model" not in err
    assert (setup / "ledger.jsonl").read_text() == ledger_before
    assert not out.exists()


BEFORE_ANY_WORK = [
    (lora_default, ["--lora-alpha", "1e30"], "--lora-alpha"),
    (lora_default, ["--rank", "1", "--lora-alpha", "20000"], "--lora-alpha"),
    (sweep, ["--lora-alpha", "30000", "--ranks", "2,4"], "--lora-alpha"),
    (lora_default, ["--seed", "4294967296"], "--seed"),
    (baseline, ["--seed", str(2**40)], "--seed"),
    (final, ["--orders", "1,-2"], "--orders"), (final, ["--orders", "1.5,2"], "--orders"),
    (final, ["--orders", "1,,2"], "--orders"), (final, ["--orders", "1,٢"], "--orders"),
    (final, ["--orders", "0"], "--orders"), (classical, ["--orders", "1,-2"], "--orders"),
    (classical, ["--orders", "+2"], "--orders"), (classical, ["--parrot-lengths", "1_0"], "--parrot-lengths"),
    (classical, ["--split", "train", "--splits", "test"], "--split"),
    (context_length, ["--lr", "0"], "--lr"), (final, ["--rank", "0"], "--rank"),
    (context_length, ["--contexts", "0"], "--contexts"), (context_length, ["--contexts", "1"], "--contexts"),
    (context_length, ["--contexts", "64,٢"], "--contexts"),
    (final, ["--eval-every", "0"], "--eval-every"),
]


@pytest.mark.parametrize("stage,argv,option", BEFORE_ANY_WORK,
                         ids=[f"{s.__name__.split('.')[-1]} {' '.join(a)}" for s, a, _ in BEFORE_ANY_WORK])
def test_refused_before_any_work(setup, tmp_path, capsys, stage, argv, option):
    before = checksums(setup)
    out = tmp_path / "out"
    code, err, _ = exit_err_out(stage.main, ["--model", str(tmp_path / "no-model"), "--data", str(setup / "lv.h5"),
                                             "--out", str(out), "--ledger", str(setup / "ledger.jsonl"), *argv],
                                capsys)
    line = error_line(code, err, option)
    assert "no-model" not in err and not out.exists()
    assert checksums(setup) == before
    if option == "--lr":
        assert "lr=" not in line  # the option, not the field
    if option == "--eval-every":
        assert line.startswith("error: --eval-every 0")  # what the user gave, not --early-stop (a stage default)


def test_contexts_0_and_1_get_one_wording(setup, tmp_path, capsys):
    lines = []
    for value in ("0", "1"):
        code, err, _ = exit_err_out(context_length.main, ["--model", str(tmp_path / "m"), "--data",
                                                          str(setup / "lv.h5"), "--out", str(tmp_path / "o"),
                                                          "--contexts", value], capsys)
        lines.append(error_line(code, err, "--contexts").replace(value, "N"))
    assert lines[0] == lines[1]


def test_lora_scale_limit_accepts_ordinary_alphas():
    from experiments.lib.settings import LoRASettings

    for rank, alpha in ((1, 1.0), (8, 16.0), (4, 0.5), (1, 1e4)):
        LoRASettings(rank=rank, lora_alpha=alpha).validate()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("option,value", [("--weight-decay", "1"), ("--weight-decay", "5"),
                                          ("--scale-target", "1e30"), ("--scale-target", "1e10")])
def test_weight_decay_and_scale_target_out_of_range_are_refused(env, tmp_path, capsys, option, value):
    out = tmp_path / "out"
    before = snapshot(env["ledger"])
    refused(*cli(lora_default.main, lora_args(env, out) + [option, value], capsys), option)
    assert snapshot(env["ledger"]) == before and not out.exists()


@pytest.mark.filterwarnings("ignore")
def test_a_context_longer_than_the_models_positions_is_refused(env, tmp_path, capsys):
    out = tmp_path / "out"
    positions = json.loads((env["model"] / "config.json").read_text())["max_position_embeddings"]
    before = snapshot(env["ledger"])
    line = refused(*cli(context_length.main, lora_args(env, out) + ["--contexts", f"32,{positions + 1}"], capsys),
                   "--contexts", str(positions))
    assert "max_position_embeddings" in line
    assert snapshot(env["ledger"]) == before and not out.exists()


@pytest.mark.parametrize("argv,option", [
    (["--threads", "0"], "--threads"), (["--threads", "-2"], "--threads"),
    (["--throughput-batches", "0"], "--throughput-batches"), (["--counting-lengths", "0"], "--counting-lengths"),
    (["--counting-lengths", "-4"], "--counting-lengths"), (["--loss-context", "1"], "--loss-context"),
    (["--device", "banana"], "--device"), (["--thread", "2"], "--thread"),
] + ([(["--device", "cuda"], "--device")] if not __import__("torch").cuda.is_available() else []))
def test_benchmark_refuses_bad_options_before_any_work(tmp_path, capsys, monkeypatch, argv, option):
    import time

    started = time.perf_counter()
    monkeypatch.setattr(benchmark, "matmul_peak", lambda *a, **k: pytest.fail("a section ran"))
    out = tmp_path / "bench"
    code, err = cli(benchmark.main, ["--model", str(tmp_path / "no-model"), "--out", str(out),
                                     "--sections", "peak", *argv], capsys)
    refused(code, err, option)
    assert not out.exists() and time.perf_counter() - started < 30


# ------------------------------------------------------------------------------------------- abbreviations and lists

@pytest.mark.parametrize("stage,argv,option", [
    ("final", ["--context-len", "40"], "--context-len"), ("final", ["--max-step", "3"], "--max-step"),
    ("baseline", ["--lim", "3"], "--lim"), ("lora_default", ["--pre", "cpu"], "--pre"),
    ("report", ["--led", "x.jsonl"], "--led"),
])
def test_abbreviated_options_are_refused_not_guessed(setup, tmp_path, capsys, stage, argv, option):
    import importlib

    main = importlib.import_module(f"experiments.{stage}").main
    ledger_before = (setup / "ledger.jsonl").read_text()
    out = tmp_path / "out"
    common = ["--results", str(tmp_path)] if stage == "report" else [
        "--model", str(tmp_path / "no-model"), "--data", str(setup / "lv.h5"), "--ledger",
        str(setup / "ledger.jsonl")]
    code, err = exit_err(main, [*common, "--out", str(out), *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], err
    assert "no-model" not in err and not out.exists()
    assert (setup / "ledger.jsonl").read_text() == ledger_before


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("stage,option,value", [
    (search, "--lrs", "\u0661e-4"), (search, "--ranks", "2,\u0664"), (sweep, "--lrs", "1e-4,\u0665e-5"),
    (context_length, "--contexts", "32,\u0664\u0668"), (search, "--lrs", "1e-4,nan"), (sweep, "--lrs", "inf"),
    (context_length, "--contexts", "32,1e3"),
])
def test_list_options_refuse_what_a_scalar_option_refuses(env, tmp_path, capsys, stage, option, value):
    out = tmp_path / "out"
    before = snapshot(tmp_path, env["ledger"])
    refused(*cli(stage.main, lora_args(env, out) + [option, value], capsys), option)
    assert snapshot(tmp_path, env["ledger"]) == before and not out.exists()


# ------------------------------------------------------------------ batches the chunks or the processes cannot share

def test_a_batch_larger_than_the_chunks_is_refused_before_the_untrained_forecast(tiny_full_vocab, sim_file,
                                                                                 tmp_path, capsys):
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    Ledger(ledger).charge("earlier", 777, "train")
    argv = stage_args(tiny_full_vocab, sim_file, out, ledger) + ["--batch-size", "1000", "--context-length", "48",
                                                                  "--max-steps", "2"]
    code, err, _ = exit_err_out(lora_default.main, argv, capsys)
    error_line(code, err, "--batch-size 1000", "chunks")
    assert Ledger(ledger).total() == 777 and not (out / "untrained.json").exists()


def test_a_batch_torchrun_cannot_share_is_refused(monkeypatch):
    chunks = make_chunks([list(range(1, 40))] * 4, 8)
    from experiments.lib.settings import TrainSettings
    from experiments.lib.training.loop import check_chunks

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"--batch-size 3: .* 2 processes .* divisible by 2"):
        check_chunks(chunks, None, TrainSettings(batch_size=3, context_length=8))
    check_chunks(chunks, None, TrainSettings(batch_size=4, context_length=8))


# --------------------------------------------------------------------------------------------------- the environment

@pytest.mark.parametrize("environ", [{"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "2"},
                                     {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "two"},
                                     {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                                      "SLURM_ARRAY_TASK_MIN": "x"}])
def test_a_bad_slurm_array_variable_is_one_line(setup, tmp_path, capsys, monkeypatch, environ):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    bad = next(name for name, value in environ.items() if not value.isdigit())
    code, err, _ = exit_err_out(sweep.main, ["--model", str(tmp_path / "m"), "--data", str(setup / "lv.h5"), "--out",
                                             str(tmp_path / "out"), "--ledger", str(setup / "ledger.jsonl")], capsys)
    error_line(code, err, bad, "SLURM")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- choices are honoured

def test_classical_honours_split(setup, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--data", str(setup / "lv.h5"), "--out", str(out), "--ledger", str(setup / "ledger.jsonl"), "--split",
            "train", "--limit", "3", "--context-steps", "12", "--horizon", "3", "--orders", "1,2", "--no-ode",
            "--plots", "0"]
    assert classical.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert {k.split("/")[1] for k in results["evaluations"]} == {"train"}
    assert results["settings"]["forecast"]["split"] == "train" and results["settings"]["splits"] == ["train"]


def test_baseline_plots_0_says_no_png_and_no_progress_shows_no_bars(tiny_full_vocab, sim_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = stage_args(tiny_full_vocab, sim_file, out, tmp_path / "ledger.jsonl") + ["--plots", "0", "--loss-limit",
                                                                                      "0"]
    assert baseline.main(argv) == 0
    captured = capsys.readouterr()
    wrote = [line for line in captured.out.splitlines() if line.startswith("wrote ")]
    assert wrote and "forecasts.png" not in wrote[-1] and "results.json" in wrote[-1]
    assert not (out / "forecasts.png").exists()
    assert "forecasting (" not in captured.err and "decoding" not in captured.err


@pytest.mark.parametrize("main", [lora_default.main, sweep.main, context_length.main])
def test_select_by_forecast_is_offered_only_where_the_stage_scores_forecasts(env, tmp_path, capsys, main):
    """Only the final stage scores validation forecasts while it trains: elsewhere --select-by forecast is refused
    when the options are read, before any forecast is run or charged, and nothing is written."""
    before = snapshot(tmp_path, env["ledger"])
    args = lora_args(env, tmp_path / "run") + ["--max-steps", "2", "--select-by", "forecast"]
    refused(*cli(main, args, capsys), "--select-by", "forecast")
    assert snapshot(tmp_path, env["ledger"]) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--limit", "--loss-limit", "--train-limit", "--stride", "--max-grad-norm"])
def test_an_empty_value_is_refused_not_read_as_all(env, tmp_path, capsys, option):
    """An empty shell variable must not widen a run to the whole split: '' is refused; 'all' / 'none' say it."""
    args = lora_args(env, tmp_path / "run") + ["--max-steps", "2", option, ""]
    refused(*cli(lora_default.main, args, capsys), option)
    assert not (tmp_path / "run").exists()


def test_orders_that_no_context_can_fit_name_the_context_option(env, tmp_path, capsys):
    """With too few observed steps for any VAR order the refusal says which option to change."""
    args = ["--data", str(env["data"]), "--out", str(tmp_path / "c"), "--ledger", str(env["ledger"]),
            "--context-steps", "1", "--horizon", "2", "--orders", "1,2", "--plots", "0"]
    refused(*cli(classical.main, args, capsys), "--context-steps")


@pytest.mark.parametrize("argv", [["--counting-lengths", "1,,2"], ["--throughput-batches", ",4"]])
def test_benchmark_list_options_refuse_an_empty_element(tmp_path, capsys, argv):
    refused(*cli(benchmark.main, ["--out", str(tmp_path / "b"), *argv], capsys), argv[0])
    assert not (tmp_path / "b").exists()


def test_a_training_context_past_the_models_positions_is_refused_before_work(env, tmp_path, capsys):
    """The tiny model has 256 positions: a --context-length of 100000 is refused from config.json alone."""
    before = snapshot(tmp_path, env["ledger"])
    args = lora_args(env, tmp_path / "run") + ["--max-steps", "2", "--context-length", "100000"]
    refused(*cli(lora_default.main, args, capsys), "--context-length 100000", "positions")
    assert snapshot(tmp_path, env["ledger"]) == before and not (tmp_path / "run").exists()


def test_benchmark_loss_context_past_the_models_positions_is_refused(env, tmp_path, capsys):
    args = ["--out", str(tmp_path / "b"), "--model", str(env["model"]), "--data", str(env["data"]), "--sections",
            "loss", "--loss-context", "100000"]
    refused(*cli(benchmark.main, args, capsys), "--loss-context 100000", "positions")
    assert not (tmp_path / "b").exists()


def test_train_refuses_an_empty_ledger_stage_name(env, tmp_path, capsys):
    from experiments import train

    args = ["--model", str(env["model"]), "--train-chunks", str(tmp_path / "none.safetensors"), "--out",
            str(tmp_path / "t"), "--stage", ""]
    refused(*cli(train.main, args, capsys), "--stage")
    assert not (tmp_path / "t").exists()



def test_an_explicit_loss_context_past_the_models_positions_is_refused_before_work(env, tmp_path, capsys):
    from conftest import baseline_args

    args = baseline_args(env, tmp_path / "b") + ["--loss-limit", "1", "--loss-context-length", "100000"]
    refused(*cli(baseline.main, args, capsys), "--loss-context-length 100000", "positions")
    assert not (tmp_path / "b").exists()
