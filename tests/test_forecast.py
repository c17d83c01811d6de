"""``python -m experiments.forecast`` on anyone's series: a CSV and the HDF5 trajectory it was written from give the
same forecast; the adapter carries its LLMTIME format (card round trip) and the PEFT export loads back into the model
that wrote it; every bad CSV is one line naming the file (and row), exit status 2, nothing written; the classical
methods and --samples' quantile columns."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import run_forecast, toy_lora_argv
from data import SeriesError, load_trajectories, read_series_csv
from experiments import forecast
from experiments.lib.adapter_card import CARD_FILE, AdapterCard, card_for, read_card
from experiments.lib.classical_forecasters import VAR
from experiments.lib.series_forecast import TextFormat, check_digits, forecast_rows
from experiments.lib.dataset import load_dataset
from experiments.lib.settings import DataSettings
from experiments.lib.errors import UsageError
from lora import AdapterError, apply_lora, export_peft, load_peft, lora_modules, lora_state_dict, save_adapter
from miniqwen import Qwen2Config, Qwen2ForCausalLM, load_pretrained

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


run = run_forecast


def write_series(path, sim_file, index, rows=None, header="time,prey,predator"):
    """Trajectory ``index`` of ``sim_file`` as a CSV (every float exactly as stored: repr round-trips)."""
    data = load_trajectories(sim_file)
    lines = [header] + [f"{float(t)!r},{float(x)!r},{float(y)!r}"
                        for t, (x, y) in zip(data.time[:rows], data.trajectories[index][:rows])]
    path.write_text("\n".join(lines) + "\n")
    return path


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def adapter(tiny_full_vocab, sim_file, tmp_path_factory):
    """A random rank-2 adapter of the tiny full-vocabulary model, exported with its card (scale of ``sim_file``)."""
    model, _ = load_pretrained(tiny_full_vocab, dtype="float32", device="cpu")
    apply_lora(model, rank=2, targets=("q_proj", "v_proj"))
    randomize_lora(model)
    card = card_for(load_dataset(DataSettings(data=str(sim_file))), DataSettings(), "tiny", "raw")
    out = tmp_path_factory.mktemp("adapter") / "peft_adapter"
    return export_peft(model, out, "tiny", extra={CARD_FILE: card.to_json()})


# ------------------------------------------------------------------------------------------------ same forecast

@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_csv_and_hdf5_give_the_same_forecast(tiny_full_vocab, sim_file, adapter, tmp_path, capsys, with_adapter):
    # the context: the first 20 steps of the HDF5 trajectory, the last 20 rows of the CSV (which has those 20)
    series = write_series(tmp_path / "series.csv", sim_file, 7, rows=20)
    common = ["--model", tiny_full_vocab, "--context-steps", 20, "--horizon", 4]
    common += ["--adapter", adapter] if with_adapter else []
    assert run(["--data", sim_file, "--index", 7, "--out", tmp_path / "h5", *common], capsys)[0] == 0
    assert run(["--data", series, "--out", tmp_path / "csv", *common], capsys)[0] == 0
    h5, csv_ = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("h5", "csv"))
    assert (tmp_path / "h5" / "forecast.csv").read_text() == (tmp_path / "csv" / "forecast.csv").read_text()
    assert h5["texts"] == csv_["texts"] and h5["texts"][0] and h5["text_format"] == csv_["text_format"]
    assert h5["text_format"]["source"].startswith("the adapter's" if with_adapter else "fitted on the 20")
    header = (tmp_path / "csv" / "forecast.csv").read_text().splitlines()[0]
    assert header == "step,time,prey,predator" and (tmp_path / "csv" / "forecast.png").is_file()


# ------------------------------------------------------------------------------------------------ the adapter

def test_adapter_card_round_trip(adapter, sim_file, tmp_path):
    card = read_card(adapter)
    assert card.llmtime_scale == load_dataset(DataSettings(data=str(sim_file))).llmtime_scale
    assert (card.decimals, card.encoding, card.prompt, card.base_model, card.head_bias) == (2, "decimal", "raw",
                                                                                          "tiny", None)
    assert card.scale_fit == {"data": sim_file.name, "split": "train", "quantile": 0.99, "target": 10.0}
    raw = json.loads((adapter / CARD_FILE).read_text())
    assert "head_bias" in raw and raw["head_bias"] is None and "usage" in raw
    other = AdapterCard(0.25, 3, "integer", "chat", None, None, {"target": 5.0})
    assert AdapterCard.from_json(json.loads(json.dumps(other.to_json()))) == other and other.scale_target == 5.0

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / name).write_bytes((adapter / name).read_bytes())
    assert read_card(bad) is None  # an adapter without a card
    for edit, field in [({"llmtime_scale": -1}, "llmtime_scale"), ({"decimals": 2.5}, "decimals"),
                        ({"encoding": "hex"}, "encoding"), ({"prompt": "poem"}, "prompt"), ({"version": 9}, "version"),
                        ({"head_bias": "../x.safetensors"}, "head_bias"), ({"head_bias": "hb.safetensors"}, "hb")]:
        (bad / CARD_FILE).write_text(json.dumps({**raw, **edit}))
        with pytest.raises(AdapterError) as err:
            read_card(bad)
        assert str(bad / CARD_FILE) in str(err.value) and field in str(err.value) and "\n" not in str(err.value)
    (bad / CARD_FILE).write_text(json.dumps(raw))
    (bad / "head_bias.safetensors").write_bytes(b"x")  # trained weights no card names: never silently left out
    with pytest.raises(AdapterError, match="head_bias.safetensors"):
        read_card(bad)


def test_export_refuses_bad_extra_files_before_writing(tmp_path):
    model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    apply_lora(model, rank=2)
    for extra in ({"adapter_config.json": {}}, {"../card.json": {}}, {"card.txt": {}}, {"card.json": [1]},
                  {"card.json": {"x": float("nan")}}):
        with pytest.raises(ValueError):
            export_peft(model, tmp_path / "out", None, extra=extra)
        assert not (tmp_path / "out").exists()


def test_peft_export_loads_back_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    apply_lora(model, rank=3, alpha=6, targets=("q_proj", "v_proj", "o_proj", "gate_proj"))
    randomize_lora(model)
    export_peft(model, tmp_path / "peft", "tiny")
    torch.manual_seed(0)
    fresh = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()  # the same base weights, no adapter yet
    load_peft(fresh, tmp_path / "peft")
    assert all(torch.equal(a, lora_state_dict(fresh)[k]) for k, a in lora_state_dict(model).items())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))
    load_peft(fresh, tmp_path / "peft")  # a model with the same LoRA layers takes it again

    other = Qwen2ForCausalLM(Qwen2Config(**TINY))
    apply_lora(other, rank=2, targets=("q_proj",))
    with pytest.raises(AdapterError, match="differ"):
        load_peft(other, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for edit in ({"use_dora": True}, {"use_rslora": True}, {"target_modules": "q_proj|v_proj"}, {"r": 0},
                 {"peft_type": "IA3"}, {"rank_pattern": {"q_proj": 8}}):
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(AdapterError) as err:
            load_peft(Qwen2ForCausalLM(Qwen2Config(**TINY)), tmp_path / "peft")
        assert "adapter_config.json" in str(err.value) and next(iter(edit)) in str(err.value)
    save_adapter(model, tmp_path / "ours")  # our own format is named, not misread
    with pytest.raises(AdapterError, match="load_adapter"):
        load_peft(Qwen2ForCausalLM(Qwen2Config(**TINY)), tmp_path / "ours")


# ------------------------------------------------------------------------------------------------ bad input

GOOD = ["time,prey,predator"] + [f"{t},{1 + 0.5 * np.sin(t / 3):.4f},{1 + 0.5 * np.cos(t / 3):.4f}"
                                  for t in range(30)]


def edited(row: int, text: str) -> list[str]:
    """GOOD with line ``row`` (1 = header) replaced by ``text``."""
    return GOOD[: row - 1] + [text] + GOOD[row:]


BAD_CSV = {  # name: (lines or None for no file, extra options, words the error must hold)
    "missing file": (None, [], ["no such file"]),
    "empty": ([], [], ["empty file"]),
    "header only": (GOOD[:1], [], ["no data rows"]),
    "missing column": (["time,prey,wolves"] + GOOD[1:], [], ["'predator'", "row 1"]),
    "--columns not there": (GOOD, ["--columns", "hares,lynx"], ["'hares' or 'lynx'"]),
    "text in a number": (edited(5, "4,abc,1.2"), [], ["row 5", "'prey'", "'abc'"]),
    "decimal comma": (edited(6, '5,"1,5",1.2'), [], ["row 6", "'1,5'"]),
    "Arabic-Indic digits": (edited(6, "5,\u0662.5,1.2"), [], ["row 6", "'\u0662.5'", "not a number"]),
    "NaN": (edited(7, "6,1.0,nan"), [], ["row 7", "'predator'", "not a finite number"]),
    "inf": (edited(8, "7,inf,1.0"), [], ["row 8", "not a finite number"]),
    "empty cell": (edited(9, "8,,1.0"), [], ["row 9", "empty cell"]),
    "negative": (edited(10, "9,-1.0,1.0"), [], ["row 10", "negative"]),
    "ragged row": (edited(11, "10,1.0"), [], ["row 11", "2 cells"]),
    "numbers for a header": (GOOD[1:], [], ["row 1", "not a header"]),
    "semicolons": ([line.replace(",", ";") for line in GOOD], [], ["row 1", "comma-separated"]),
    "time goes back": (edited(12, "3,1.0,1.0"), [], ["row 12", "'time'", "increasing"]),
    "fewer rows than the context": (GOOD, ["--context-steps", "40"], ["row 31", "--context-steps 40"]),
}


@pytest.mark.parametrize("case", list(BAD_CSV))
def test_a_bad_csv_is_one_line_naming_the_file_and_row(tmp_path, capsys, case):
    lines, options, words = BAD_CSV[case]
    path = tmp_path / "series.csv"
    if lines is not None:
        path.write_text("\n".join(lines) + ("\n" if lines else ""))
    out = tmp_path / "out"
    # the model does not exist: an error about it would mean the CSV was not checked first
    code, _, err = run(["--data", path, "--model", tmp_path / "no-model", "--out", out, *options], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert str(path) in err and all(w in err for w in words), err
    assert not out.exists() and "no-model" not in err


def test_read_series_csv_takes_named_columns_in_any_order(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("\ufeffLynx,T,Hare,note\n1.5,0,2.5,a\n\n1.25,1,2.0,b\n")
    series = read_series_csv(path, ("Hare", "Lynx"))
    assert series.values.tolist() == [[2.5, 1.5], [2.0, 1.25]] and series.time.tolist() == [0.0, 1.0]
    assert series.columns == ("Hare", "Lynx") and series.time_step() == 1.0
    with pytest.raises(SeriesError, match="--columns"):
        read_series_csv(path)


@pytest.mark.parametrize("argv, words", [
    (["--method", "var", "--adapter", "x"], ["--adapter", "--method llm only"]),
    (["--method", "ar", "--samples", "3"], ["--samples"]),
    (["--index", "3"], ["--index", "not an HDF5"]),
    (["--llmtime-scale", "0"], ["--llmtime-scale"]),
    (["--horizon", "0"], ["--horizon"]),
    (["--adapter", "{nocard}"], ["no miniqwen_llmtime.json", "--llmtime-scale"]),
    (["--adapter", "{adapter}", "--decimals", "3"], ["--decimals 3", "trained with decimals 2"]),
    (["--adapter", "{adapter}", "--scaled", "10000"], ["integer digits", "garbage"]),
])
def test_bad_options_and_unusable_series_are_one_line(sim_file, adapter, tmp_path, capsys, argv, words):
    nocard = tmp_path / "nocard"
    nocard.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (nocard / name).write_bytes((adapter / name).read_bytes())
    argv = [a.format(adapter=adapter, nocard=nocard) for a in argv]
    factor = float(argv.pop(argv.index("--scaled") + 1)) if "--scaled" in argv else 1.0
    argv = [a for a in argv if a != "--scaled"]
    path = write_series(tmp_path / "s.csv", sim_file, 2)
    if factor != 1.0:  # the same series in units 10,000 times smaller: 10,000 times larger numbers
        data = load_trajectories(sim_file)
        path.write_text("time,prey,predator\n" + "".join(f"{t},{x * factor},{y * factor}\n" for t, (x, y) in
                                                         zip(data.time, data.trajectories[2])))
    out = tmp_path / "out"
    code, _, err = run(["--data", path, "--model", tmp_path / "no-model", "--out", out, *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists()


def test_the_digit_check_warns_before_it_refuses():
    fmt = TextFormat(1.0, 2, "decimal", "raw", "test")
    assert check_digits(np.array([[0.5, 9.0]]), fmt, "s") is None
    assert "times the 10" in check_digits(np.array([[0.5, 250.0]]), fmt, "s")
    assert "significant digits" in check_digits(np.array([[0.01, 0.05]]), fmt, "s")
    for values in ([[0.5, 1000.0]], [[0.001, 0.004]]):
        with pytest.raises(UsageError):
            check_digits(np.array(values), fmt, "s")


# ------------------------------------------------------------------------------------------------ methods, samples

@pytest.mark.parametrize("method", ["var", "ar", "parrot", "persistence", "lv"])
def test_classical_methods_on_one_series(sim_file, tmp_path, capsys, method):
    out = tmp_path / "out"
    code, stdout, err = run(["--data", sim_file, "--index", 4, "--method", method, "--context-steps", 24,
                             "--horizon", 6, "--model", tmp_path / "no-model", "--out", out], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "forecast.csv").open()))
    assert [r["step"] for r in rows] == [str(h) for h in range(1, 7)]
    values = np.array([[float(r["prey"]), float(r["predator"])] for r in rows])
    assert np.isfinite(values).all()
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "forecast" and record["method"] == method and record["flops"] == 0
    if method == "var":  # the order chosen on the holdout, refitted on the whole context
        context = load_trajectories(sim_file).trajectories[4][:24]
        assert record["holdout_steps"] == 6 and set(record["mse_by_choice"]) == {str(p) for p in range(1, 6)}
        np.testing.assert_allclose(values, VAR(record["chosen"]).predict(context[None], 6)[0], rtol=1e-12)
    times = load_trajectories(sim_file).time
    np.testing.assert_allclose([float(r["time"]) for r in rows], times[24:30], rtol=1e-9)
    # the same --out again is refused; --overwrite replaces it
    args = ["--data", sim_file, "--index", 4, "--method", "persistence", "--out", out]
    code, _, err = run(args, capsys)
    assert code == 2 and "already holds a forecast run" in err
    assert run(args + ["--overwrite"], capsys)[0] == 0


def test_samples_write_the_quantile_columns(tiny_full_vocab, sim_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["--data", sim_file, "--index", 1, "--context-steps", 16, "--horizon", 3, "--samples", 3,
                        "--model", tiny_full_vocab, "--out", out], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "forecast.csv").open()))
    assert list(rows[0]) == ["step", "time", "prey", "predator", "prey_q10", "prey_q90", "predator_q10",
                             "predator_q90"]
    for r in rows:
        for name in ("prey", "predator"):
            if r[name]:
                assert float(r[f"{name}_q10"]) <= float(r[name]) <= float(r[f"{name}_q90"])
    assert len(json.loads((out / "run.json").read_text())["texts"]) == 3


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_quantile_columns_are_the_samples_10_and_90_percent_quantiles():
    samples = np.random.default_rng(0).uniform(0.5, 2.0, (1, 5, 3, 2))
    samples[0, :, 2, 1] = np.nan  # a step no sample parsed is left empty, never filled in
    rows = forecast_rows(forecast.Forecast.from_samples(samples[0], [], 0, {}, np.array([1.0, 2.0, 3.0])))
    assert rows[0]["prey_q10"] == np.quantile(samples[0, :, 0, 0], 0.1)
    assert rows[1]["predator_q90"] == np.quantile(samples[0, :, 1, 1], 0.9)
    assert rows[2]["prey"] == np.median(samples[0, :, 2, 0]) and rows[2]["time"] == 3.0
    assert rows[2]["predator"] == rows[2]["predator_q10"] == rows[2]["predator_q90"] == ""


def test_a_trained_adapter_carries_its_card_into_the_forecast(tiny_full_vocab, tmp_path, capsys):
    """A training stage (lora_default at toy scale) exports the adapter with its card; the forecast stage uses it
    with no other option than --adapter."""
    from experiments import lora_default

    argv = toy_lora_argv(tiny_full_vocab, tmp_path, "1e-3", "--encoding", "integer", "--decimals", "3")
    assert lora_default.main(argv) == 0
    assert "%|" not in capsys.readouterr().err  # --no-progress: no bar at all, the forecasts' included (tqdm's "%|")
    adapter = tmp_path / "run" / "peft_adapter"
    card = read_card(adapter)
    dataset = json.loads((tmp_path / "run" / "results.json").read_text())["data"]
    assert (card.llmtime_scale, card.decimals, card.encoding, card.prompt) == (dataset["llmtime_scale"], 3,
                                                                                "integer", "raw")
    assert card.head_bias is None and card.base_model == tiny_full_vocab.name
    code, stdout, err = run(["--data", tmp_path / "lv.h5", "--index", 19, "--context-steps", 12, "--horizon", 2,
                             "--adapter", adapter, "--model", tiny_full_vocab, "--out", tmp_path / "f"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "f" / "run.json").read_text())
    assert record["text_format"]["encoding"] == "integer" and record["text_format"]["decimals"] == 3
    assert record["text_format"]["llmtime_scale"] == card.llmtime_scale


def test_an_adapter_with_a_trained_head_bias_names_it_in_its_card_and_forecasts_with_it(tiny_full_vocab, tmp_path,
                                                                                         capsys):
    from experiments import lora_default

    argv = toy_lora_argv(tiny_full_vocab, tmp_path, "1e-2", "--head-bias")
    assert lora_default.main(argv) == 0
    adapter = tmp_path / "run" / "peft_adapter"
    assert read_card(adapter).head_bias == "head_bias.safetensors" and (adapter / "head_bias.safetensors").is_file()
    code, stdout, err = run(["--data", tmp_path / "lv.h5", "--index", 19, "--context-steps", 12, "--horizon", 2,
                             "--adapter", adapter, "--model", tiny_full_vocab, "--out", tmp_path / "f"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ --llmtime-scale fit

def series_card(adapter, where):
    """A copy of ``adapter`` whose card says it was trained with per-series scaling (``--scaling series``)."""
    where.mkdir()
    for path in adapter.iterdir():
        (where / path.name).write_bytes(path.read_bytes())
    card = json.loads((adapter / CARD_FILE).read_text())
    card["scale_fit"] |= {"scaling": "series", "beta": 0.3, "fit_steps": 80}
    (where / CARD_FILE).write_text(json.dumps(card))
    return where


@pytest.mark.parametrize("per_series", [False, True], ids=["dataset-card", "series-card"])
def test_fit_forecasts_a_series_in_any_units_as_in_the_adapters(tiny_full_vocab, sim_file, adapter, tmp_path,
                                                               monkeypatch, per_series):
    """c·x is written as the same prompt as x and gives exactly c times its forecast (c = 1024: exact in floating
    point). The tiny random model writes no numbers, so its continuation is fixed: "1.25,3.5;0.75,2.25;4,0.5;"."""
    from data import fit_series_scale
    from experiments.lib import evaluation

    _, tokenizer = load_pretrained(tiny_full_vocab, dtype="float32", device="cpu")
    answer, prompts = tokenizer.encode("1.25,3.5;0.75,2.25;4,0.5;"), []
    monkeypatch.setattr(evaluation, "generate", lambda model, batch, *a, num_samples=1, **k: prompts.append(batch)
                        or [answer] * (len(batch) * num_samples))
    adapter = series_card(adapter, tmp_path / "series") if per_series else adapter
    x = load_trajectories(sim_file).trajectories[3][:20].astype(np.float64)
    small, large = (forecast.forecast(c * x, 3, adapter=str(adapter), model=str(tiny_full_vocab),
                                      llmtime_scale="fit", progress=False) for c in (1.0, 1024.0))
    assert prompts[0] == prompts[1] and small.texts == large.texts and np.isfinite(small.values).all()
    np.testing.assert_array_equal(large.values, 1024.0 * small.values)
    scale = small.settings["text_format"]["llmtime_scale"]
    if per_series:
        fitted = fit_series_scale(x, 0.99, 10.0)
        assert scale == {"offset": list(fitted.offset), "scale": list(fitted.scale)}
        assert "scaling series" in small.settings["text_format"]["source"]
        # the card's scaling is used by default too, and a fixed scale contradicts it
        default = forecast.forecast(x, 3, adapter=str(adapter), model=str(tiny_full_vocab), progress=False)
        assert default.texts == small.texts and default.settings["text_format"] == small.settings["text_format"]
        with pytest.raises(UsageError, match="llmtime_scale=0.5: the adapter was trained with per-series"):
            forecast.forecast(x, 3, adapter=str(adapter), model=str(tiny_full_vocab), llmtime_scale=0.5)
    else:
        assert scale == np.quantile(x, 0.99) / 10.0 and large.settings["text_format"]["llmtime_scale"] == 1024 * scale
        assert "the adapter's rule" in small.settings["text_format"]["source"]
        card = forecast.forecast(x, 3, adapter=str(adapter), model=str(tiny_full_vocab), progress=False)
        assert card.settings["text_format"]["llmtime_scale"] == read_card(adapter).llmtime_scale  # default: card's


def test_fit_without_an_adapter_is_the_context_fit_and_the_cli_takes_it(tiny_full_vocab, sim_file, adapter,
                                                                        tmp_path, capsys):
    x = load_trajectories(sim_file).trajectories[5][:16]
    fit, default = (forecast.forecast(x, 2, model=str(tiny_full_vocab), llmtime_scale=s, progress=False)
                    for s in ("fit", None))
    assert fit.texts == default.texts and fit.settings["text_format"] == default.settings["text_format"]
    path = write_series(tmp_path / "s.csv", sim_file, 5, rows=16)
    code, stdout, err = run(["--data", path, "--adapter", adapter, "--llmtime-scale", "fit", "--horizon", 2,
                             "--model", tiny_full_vocab, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["text_format"]["llmtime_scale"] == np.quantile(x, 0.99) / 10.0
    assert "fitted on the 16 context steps" in stdout
    for argv, words in [(["--llmtime-scale", "abc"], ["--llmtime-scale", "'abc'"]),
                        (["--llmtime-scale", "fit", "--method", "var"], ["--llmtime-scale", "--method llm only"]),
                        (["--llmtime-scale", "-2"], ["--llmtime-scale -2.0", "or fit"])]:
        code, _, err = run(["--data", path, "--out", tmp_path / "bad", *argv], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "bad").exists()
