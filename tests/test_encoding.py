"""The LLMTIME encodings (``data.llmtime.ENCODINGS``): "decimal" (today's text, unchanged) and "integer" (no decimal
point, Gruver et al. 2023, section 3) — round trips, exact formats, what the decoder refuses, and the option's path
through the settings, the Dataset, the forecaster's helpers and one tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data import ENCODINGS, decode, encode
from data.simulate import simulate

# ----------------------------------------------------------------------------- encode / decode


def random_values(seed: int, n: int = 400) -> np.ndarray:
    """[n, 2] non-negative values in text units (alpha = 1) covering 0, values < 0.1, values up to the scale's
    target (10) and a few with more integer digits (up to 999)."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 10.0, (n, 2))
    values[::7] = rng.uniform(0.0, 0.1, values[::7].shape)       # below 0.1: leading zeros in the decimal text
    values[::11] = rng.uniform(10.0, 999.0, values[::11].shape)  # two or three integer digits
    values[::13, 0] = 0.0
    values[5] = [0.0, 0.0]
    values[6] = [0.005, 0.0049]                                  # round to 0.01 and 0.00 at 2 decimals
    return values


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("decimals", [0, 1, 2, 3])
@pytest.mark.parametrize("alpha", [0.6, 1.0, 3.7])
def test_round_trip(encoding, decimals, alpha):
    trajectory = random_values(decimals) * alpha
    text = encode(trajectory, alpha, decimals, encoding)
    decoded = decode(text, alpha, expected_steps=len(trajectory), encoding=encoding, decimals=decimals)
    assert decoded.complete and decoded.values.shape == trajectory.shape
    bound = 0.5 * 10.0**-decimals * alpha * (1 + 1e-9) + 1e-12
    assert np.max(np.abs(decoded.values - trajectory)) <= bound
    # both encodings carry exactly the same numbers
    same = decode(encode(trajectory, alpha, decimals), alpha, expected_steps=len(trajectory))
    np.testing.assert_array_equal(decoded.values, same.values)


@pytest.mark.parametrize("decimals", [0, 1, 2, 3])
def test_integer_text_is_the_decimal_text_without_point_and_leading_zeros(decimals):
    trajectory = random_values(10 + decimals)
    integer = encode(trajectory, 1.0, decimals, "integer")
    decimal = encode(trajectory, 1.0, decimals, "decimal")
    assert "." not in integer
    for step_i, step_d in zip(integer.split(";"), decimal.split(";"), strict=True):
        for value_i, value_d in zip(step_i.split(","), step_d.split(","), strict=True):
            assert value_i == (value_d.replace(".", "").lstrip("0") or "0")
            assert value_i == "0" or not value_i.startswith("0")
            assert int(value_i) == round(float(value_d) * 10**decimals)
    if decimals == 0:
        assert integer == decimal


def test_decimal_text_is_byte_identical_to_before():
    # written by the encoder before the "integer" encoding existed; the default must not change
    example = np.array([[1.234, 0.45], [0.05, 12.3456], [0.0, 0.004999], [123.456, 7.0]])
    before_2 = "1.23,0.45;0.05,12.35;0.00,0.00;123.46,7.00"
    before_3 = "1.234,0.450;0.050,12.346;0.000,0.005;123.456,7.000"
    assert encode(example, 1.0) == before_2
    assert encode(example, 1.0, 2, "decimal") == before_2
    assert encode(example * 0.6, 0.6, 3) == before_3
    assert encode(example * 0.6, 0.6, decimals=3, encoding="decimal") == before_3


def test_integer_format():
    example = np.array([[1.23, 0.05], [0.0, 12.3], [0.45, 0.004], [-0.0, 999.999]])
    assert encode(example, 1.0, 2, "integer") == "123,5;0,1230;45,0;0,100000"
    assert encode(example, 1.0, 3, "integer") == "1230,50;0,12300;450,4;0,999999"
    assert encode(example, 1.0, 0, "integer") == "1,0;0,12;0,0;0,1000"
    assert encode(example * 2.0, 2.0, 1, "integer") == "12,1;0,123;5,0;0,10000"
    assert encode(np.zeros((0, 2)), 1.0, 2, "integer") == ""


def test_unknown_encoding_and_missing_decimals_raise():
    with pytest.raises(ValueError, match="encoding"):
        encode(np.ones((2, 2)), 1.0, 2, "binary")
    with pytest.raises(ValueError, match="encoding"):
        decode("1,2", 1.0, encoding="binary")
    with pytest.raises(ValueError, match="decimals"):
        decode("123,45", 1.0, encoding="integer")  # without decimals the scale of the text is unknown
    for bad in (-1, 1.5, True, 301):
        with pytest.raises(ValueError, match="decimals"):
            decode("123,45", 1.0, encoding="integer", decimals=bad)


def test_integer_decoder_reads_digits_only():
    assert decode("123,45;5,0", 2.0, encoding="integer", decimals=2).values.tolist() == [[2.46, 0.9], [0.1, 0.0]]
    ok = decode(" 123 , 45 ;045,0007; ", 1.0, encoding="integer", decimals=2)  # whitespace, leading zeros, trailing ;
    assert ok.complete and ok.values.tolist() == [[1.23, 0.45], [0.45, 0.07]]
    invalid = ["1.23,45", "12.,5", ".5,5", "+12,5", "-12,5", "1e2,5", "1 2,5", ",5", "5,", "1,2,3", "12", "abc,1",
               "\u0661\u0662,5",  # Arabic-Indic digits: float() would read them, the encoding never writes them
               "9" * 400 + ",1", "nan,1", "inf,1", "0x1f,1"]
    decoded = decode(";".join(invalid), 1.0, encoding="integer", decimals=2)
    assert decoded.n_invalid == len(invalid) and np.isnan(decoded.values).all()
    # a mix, with expected steps: invalid rows are NaN, absent ones missing, extra ones dropped
    mixed = decode("100,200;1.5,2;300,400", 1.0, expected_steps=5, encoding="integer", decimals=2)
    assert (mixed.n_invalid, mixed.n_missing) == (1, 2)
    np.testing.assert_array_equal(mixed.values[[0, 2]], [[1.0, 2.0], [3.0, 4.0]])
    assert np.isnan(mixed.values[[1, 3, 4]]).all()
    assert decode("1,2;3,4;5,6", 1.0, expected_steps=2, encoding="integer", decimals=0).complete


def test_decimal_decoder_unchanged_and_ignores_decimals():
    text = "1.23,0.45;12,7;1.2.3,4"
    for kwargs in ({}, {"encoding": "decimal"}, {"encoding": "decimal", "decimals": 5}):
        decoded = decode(text, 1.0, **kwargs)
        assert decoded.n_invalid == 1
        assert decoded.values[:2].tolist() == [[1.23, 0.45], [12.0, 7.0]]


# ----------------------------------------------------------------------------- settings, Dataset, forecaster helpers


def test_settings_option_validation_and_record():
    from experiments.lib.settings import DataSettings, as_record
    from experiments.lib.cli import parse, parser
    from experiments.lib.errors import OptionError, UsageError

    with pytest.raises(OptionError):
        DataSettings(encoding="binary").validate()
    p = parser("x", "test", "data")
    assert parse(p, [])["data"].encoding == "decimal"
    assert parse(p, ["--encoding", "integer"])["data"].encoding == "integer"
    with pytest.raises((SystemExit, UsageError)):
        parse(p, ["--encoding", "binary"])
    # the default is left out of records, so keys made before the option existed still match
    assert "encoding" not in as_record(data=DataSettings())["data"]
    assert as_record(data=DataSettings(encoding="integer"))["data"]["encoding"] == "integer"


def test_dataset_texts_and_record_follow_the_encoding(sim_file):
    from experiments.lib.dataset import load_dataset
    from experiments.lib.settings import DataSettings

    integer = load_dataset(DataSettings(data=str(sim_file), encoding="integer"))
    decimal = load_dataset(DataSettings(data=str(sim_file)))
    texts = integer.texts("train")
    assert texts and not any("." in t for t in texts)
    assert all("." in t for t in decimal.texts("train"))
    assert integer.record()["encoding"] == "integer" and decimal.record()["encoding"] == "decimal"
    for t_int, t_dec in zip(texts, decimal.texts("train"), strict=True):
        n = t_dec.count(";") + 1
        a = decode(t_int, integer.llmtime_scale, n, encoding="integer", decimals=2).values
        np.testing.assert_array_equal(a, decode(t_dec, decimal.llmtime_scale, n).values)


def test_forecaster_helpers():
    from experiments.lib.costs import Sizes
    from data import NUMERIC_ALPHABET, max_tokens_per_step, numeric_alphabet
    from experiments.lib.evaluation import forecast_prompt

    assert numeric_alphabet() == numeric_alphabet("decimal") == NUMERIC_ALPHABET
    assert numeric_alphabet("integer") == [c for c in NUMERIC_ALPHABET if c != "."]
    assert max_tokens_per_step(2) == max_tokens_per_step(2, "decimal") == 14
    assert max_tokens_per_step(2, "integer") == 12
    with pytest.raises(ValueError):
        max_tokens_per_step(2, "binary")
    context = simulate(n_systems=1, n_steps=6, t_max=10.0, seed=0)[0][0]
    raw = forecast_prompt(context, 0.5, 2, 3, "raw", "integer")
    assert raw == encode(context, 0.5, 2, "integer") + ";" and "." not in raw
    assert forecast_prompt(context, 0.5, 2, 3, "raw") == encode(context, 0.5, 2) + ";"
    chat = forecast_prompt(context, 0.5, 2, 3, "chat", "integer")
    assert "100 times the value" in chat and encode(context, 0.5, 2, "integer") + ";" in chat
    assert "with 2 decimals" in forecast_prompt(context, 0.5, 2, 3, "chat")
    sizes = Sizes(2, "integer")
    assert (sizes.per_step, sizes.head_rows) == (12, 14)
    assert (Sizes().per_step, Sizes().head_rows) == (14, 15)


def test_allowed_token_ids_drop_the_point_for_integer(tokenizer_dir):
    from experiments.lib.evaluation import allowed_token_ids
    from miniqwen.tokenizer import QwenTokenizer

    tok = QwenTokenizer.from_file(tokenizer_dir)
    decimal, integer = allowed_token_ids(tok), allowed_token_ids(tok, "integer")
    point = tok.token_to_id(".")
    assert point in decimal and point not in integer
    assert set(decimal) - set(integer) == {point}


def test_baseline_end_to_end_with_integer_encoding(tiny_full_vocab, sim_file, tmp_path, capsys):
    from experiments import baseline

    out = tmp_path / "out"
    code = baseline.main([
        "--model", str(tiny_full_vocab), "--data", str(sim_file), "--limit", "2", "--context-steps", "8",
        "--horizon", "3", "--gen-batch-size", "2", "--loss-limit", "0", "--plots", "0", "--encoding", "integer",
        "--out", str(out), "--ledger", str(tmp_path / "ledger.jsonl"), "--device", "cpu",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    text_lines = [line for line in printed.splitlines() if "preprocessed text" in line]
    assert text_lines and not any("." in line.split(":", 1)[1] for line in text_lines)
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["encoding"] == "integer"
    assert results["settings"]["data"]["encoding"] == "integer"
    assert results["flops"]["total"] <= results["flops"]["planned"]
    for line in (out / "generations.jsonl").read_text().splitlines():
        assert all("." not in text for text in json.loads(line)["texts"])  # "." is not in the allowed tokens
