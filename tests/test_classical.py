"""Tests for the classical forecasters (experiments/lib/classical_forecasters.py, lotka_volterra_fit.py,
parroting.py). Small numpy/scipy problems only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from experiments import classical

from experiments.lib import cli, errors
from experiments.lib.classical_forecasters import (AR, VAR, ClassicalForecaster, Persistence, fit_ar, fit_var,
                                                  select_order)
from experiments.lib.lotka_volterra_fit import LotkaVolterraODE, fit_lotka_volterra
from experiments.lib.parroting import ContextParroting, parrot_lengths_for, parrot_match
from experiments.lib.side_by_side import validated_forecasters

DT = 200 / 99  # the coursework grid: 100 steps over t = 0..200


def simulate_var(A, c, steps, noise, rng, burn=200):
    """y_t = c + sum_i A[i] y_{t-i} + noise * N(0, I); A [p, k, k]. Returns [steps, k]."""
    A, c = np.asarray(A, float), np.asarray(c, float)
    p, k = A.shape[0], A.shape[1]
    y = np.zeros((steps + burn, k))
    y[:p] = np.linalg.solve(np.eye(k) - A.sum(0), c)  # start at the mean
    for t in range(p, steps + burn):
        y[t] = c + sum(A[i] @ y[t - 1 - i] for i in range(p)) + noise * rng.standard_normal(k)
    return y[burn:]


def simulate_var_from(start, A, c, steps):
    """Noise-free continuation of ``start`` [p, k] by y_t = c + sum_i A[i] y_{t-i}; returns [steps, k]."""
    A, c = np.asarray(A, float), np.asarray(c, float)
    p = A.shape[0]
    y = np.zeros((steps, A.shape[1]))
    y[:p] = start
    for t in range(p, steps):
        y[t] = c + sum(A[i] @ y[t - 1 - i] for i in range(p))
    return y


def simulate_lv(rates, state0, steps, dt=DT):
    a, b, c, d = rates
    t = dt * np.arange(steps)
    sol = solve_ivp(lambda _, z: [a * z[0] - b * z[0] * z[1], c * z[0] * z[1] - d * z[1]], (0, t[-1]), state0,
                    t_eval=t, rtol=1e-11, atol=1e-12)
    return sol.y.T


AR2 = ([0.5, -0.3], 0.4)  # stationary (roots of 1 - 0.5 z + 0.3 z^2 outside the unit circle)
VAR2_A = [[[0.5, 0.1], [-0.2, 0.4]], [[-0.2, 0.05], [0.1, -0.1]]]
VAR2_C = [1.0, 2.0]


def test_fit_ar_recovers_coefficients():
    rng = np.random.default_rng(0)
    x = simulate_var(np.array(AR2[0])[:, None, None], [AR2[1]], 5000, 0.1, rng)[:, 0]
    coef, intercept = fit_ar(x, 2)
    np.testing.assert_allclose(coef, AR2[0], atol=0.02)
    assert intercept == pytest.approx(AR2[1], abs=0.02)
    coef0, intercept0 = fit_ar(x - x.mean(), 2, intercept=False)
    np.testing.assert_allclose(coef0, AR2[0], atol=0.02)
    assert intercept0 == 0.0


@pytest.mark.parametrize("p", [1, 2])
def test_fit_var_recovers_coefficients(p):
    rng = np.random.default_rng(1)
    A_true = np.array(VAR2_A[:p])
    y = simulate_var(A_true, VAR2_C, 5000, 0.1, rng)
    A, c = fit_var(y, p)
    assert A.shape == (p, 2, 2) and c.shape == (2,)
    np.testing.assert_allclose(A, A_true, atol=0.03)
    np.testing.assert_allclose(c, VAR2_C, atol=0.1)


def test_ar_and_var_continue_noise_free_series():
    y = simulate_var_from([[2.0, 1.0], [1.5, 3.0]], VAR2_A, VAR2_C, 60)  # a transient towards the mean
    var = VAR(2)
    np.testing.assert_allclose(var.predict(y[None, :40], 20)[0], y[40:], rtol=1e-8, atol=1e-8)
    assert var.n_fallback == 0 and var.name == "var(2)"
    # per-species AR(2) series, one coefficient set per species
    x = np.stack([simulate_var_from(np.array([[1.0], [1.5]]), np.array(a)[:, None, None], [c], 60)[:, 0]
                  for a, c in [([0.5, -0.3], 0.4), ([1.2, -0.5], 0.3)]], axis=1)
    ar = AR(2)
    np.testing.assert_allclose(ar.predict(x[None, :40], 20)[0], x[40:], rtol=1e-8, atol=1e-8)
    # the log variant continues exp(AR) exactly
    ar_log = AR(2, log=True)
    np.testing.assert_allclose(ar_log.predict(np.exp(x)[None, :40], 20)[0], np.exp(x[40:]), rtol=1e-7)
    assert ar_log.name == "ar(2)-log"


def test_lotka_volterra_recovers_clean_trajectory():
    rates, state0 = (0.2, 0.3, 0.1, 0.15), (1.0, 1.0)
    y = simulate_lv(rates, state0, 100)
    fitted_rates, fitted_state0, rms = fit_lotka_volterra(y[:80], DT)
    np.testing.assert_allclose(fitted_rates, rates, rtol=1e-3)
    np.testing.assert_allclose(fitted_state0, state0, rtol=1e-3)
    assert rms < 1e-3
    second = simulate_lv((0.25, 0.45, 0.12, 0.18), (1.1, 0.9), 100)
    model = LotkaVolterraODE(dt=DT)
    forecast = model.predict(np.stack([y[:80], second[:80]]), 20)
    truth = np.stack([y[80:], second[80:]])
    assert model.n_fallback == 0
    assert np.mean(np.abs(forecast - truth)) / np.mean(np.abs(truth)) < 0.05
    # relative-error (log) residuals recover it too
    log_model = LotkaVolterraODE(dt=DT, log_residuals=True)
    relative = np.abs(log_model.predict(y[None, :80], 20)[0] - y[80:]) / y[80:]
    assert relative.mean() < 0.05
    assert json.loads(json.dumps(log_model.settings()))["log_residuals"] is True


def test_persistence():
    contexts = np.random.default_rng(3).uniform(0.1, 5, size=(4, 10, 2))
    model = Persistence()
    out = model.predict(contexts, 7)
    assert out.shape == (4, 7, 2) and out.dtype == np.float64
    np.testing.assert_array_equal(out, np.repeat(contexts[:, -1:], 7, axis=1))
    assert model.n_fallback == 0 and model.settings() == {"name": "persistence"}


def test_select_order_does_not_underfit():
    rng = np.random.default_rng(4)
    coef = np.array([0.6, -0.4, 0.5])  # AR(3) with a strong third lag
    contexts, truth = [], []
    for _ in range(20):
        species = [simulate_var(coef[:, None, None], [1.0], 90, 0.05, rng)[:, 0] for _ in range(2)]
        y = np.stack(species, axis=1)
        contexts.append(y[:80])
        truth.append(y[80:])
    best, scores = select_order(lambda p: AR(p), [1, 2, 3, 4, 5], np.array(contexts), np.array(truth))
    assert set(scores) == {1, 2, 3, 4, 5}
    assert best >= 3
    assert scores[3] < min(scores[1], scores[2])
    tie, _ = select_order(lambda p: Persistence(), [4, 2, 3], np.array(contexts), np.array(truth))
    assert tie == 2  # equal scores: the smallest order


def test_degenerate_contexts_give_finite_forecasts():
    constant = np.full((1, 30, 2), 1.5)
    models = [Persistence(), AR(3), AR(3, log=True), VAR(2), VAR(2, log=True), LotkaVolterraODE(DT)]
    for model in models:
        out = model.predict(constant, 10)
        assert out.shape == (1, 10, 2) and np.isfinite(out).all(), model.name
        np.testing.assert_allclose(out, 1.5, rtol=1e-6, err_msg=model.name)
    # a zero population cannot be fitted in log space / by the ODE: persistence, counted
    zero = np.abs(np.random.default_rng(5).normal(1, 0.3, size=(2, 30, 2)))
    zero[0, 5, 1] = 0.0
    for model in [AR(2, log=True), VAR(1, log=True), LotkaVolterraODE(DT)]:
        out = model.predict(zero, 5)
        assert np.isfinite(out).all()
        assert model.n_fallback >= 1, model.name
        np.testing.assert_array_equal(out[0], np.repeat(zero[0, -1:], 5, axis=0))


def test_explosive_fit_falls_back():
    growth = np.exp(0.5 * np.arange(30))[None, :, None].repeat(2, axis=2)  # AR(1) with a = e^0.5
    model = AR(1, intercept=False)
    out = model.predict(growth, 20)  # exceeds 100x the context max by step 10
    assert model.n_fallback == 1
    np.testing.assert_array_equal(out[0], np.repeat(growth[0, -1:], 20, axis=0))
    model.predict(growth, 5)  # within 100x: no fallback, and the count is per call
    assert model.n_fallback == 0


@pytest.mark.parametrize("model", [Persistence(), AR(2), VAR(2), LotkaVolterraODE(), ContextParroting(3)])
def test_bad_shapes_raise(model):
    with pytest.raises(ValueError, match=r"\[n, C, 2\]"):
        model.predict(np.ones((10, 2)), 5)
    with pytest.raises(ValueError, match=r"\[n, C, 2\]"):
        model.predict(np.ones((1, 10, 3)), 5)
    with pytest.raises(ValueError, match="NaN"):
        model.predict(np.full((1, 20, 2), np.nan), 5)
    with pytest.raises(ValueError, match="horizon"):
        model.predict(np.ones((1, 20, 2)), 0)


def test_too_short_contexts_raise():
    with pytest.raises(ValueError, match="at least 8 time steps"):  # AR(3): 2p + intercept + 1
        AR(3).predict(np.ones((1, 7, 2)), 5)
    AR(3).predict(np.ones((1, 8, 2)), 5)
    with pytest.raises(ValueError, match="at least 8 time steps"):  # VAR(2): 3p + intercept + 1
        VAR(2).predict(np.ones((1, 7, 2)), 5)
    with pytest.raises(ValueError, match="at least 4"):
        LotkaVolterraODE().predict(np.ones((1, 3, 2)), 5)
    with pytest.raises(ValueError, match=r"AR\(3\) needs at least 8"):
        fit_ar(np.ones(5), 3)
    with pytest.raises(ValueError, match="shape"):
        fit_var(np.ones(20), 1)
    with pytest.raises(ValueError, match="p must be"):
        AR(0)
    with pytest.raises(ValueError, match="truth"):
        select_order(AR, [1], np.ones((2, 20, 2)), np.ones((3, 5, 2)))


def test_api_surface():
    for model in [Persistence(), AR(3), VAR(2, log=True), LotkaVolterraODE(DT), ContextParroting(4)]:
        assert isinstance(model, ClassicalForecaster)
        json.dumps(model.settings())
    assert AR(3).settings() == {"name": "ar", "p": 3, "intercept": True, "log": False}
    assert VAR(2, log=True).name == "var(2)-log"
    assert LotkaVolterraODE().name == "lv_ode"
    assert ContextParroting(4).settings() == {"name": "parrot", "m": 4, "min_lag": 4}
    assert ContextParroting(4).name == "parrot(4)" and ContextParroting(1).min_lag == 2
    assert ContextParroting(4, min_lag=1).name == "parrot(4, lag>=1)"


# ----------------------------------------------------------------------------- context parroting


@pytest.mark.parametrize("period, m", [(7, 1), (7, 3), (12, 5), (5, 12)])
def test_parroting_continues_a_periodic_series_exactly(period, m):
    rng = np.random.default_rng(6)
    pattern = rng.uniform(0.5, 3.0, size=(period, 2))  # one period, distinct values
    series = np.tile(pattern, (140 // period + 1, 1))[:140]
    contexts, truth = np.stack([series[:80], series[3:83]]), np.stack([series[80:130], series[83:133]])
    model = ContextParroting(m)
    out = model.predict(contexts, 50)  # 50 > period: the copy wraps round several times
    np.testing.assert_array_equal(out, truth)
    lag = period * -(-max(m, 2) // period)  # the most recent exact match outside the Theiler window
    assert model.lags.tolist() == [lag, lag] and model.n_fallback == 0
    assert model.fallback_counts() == {"persistence": 0, "short_period": 0}
    np.testing.assert_array_equal(model.last_prediction, out)


def test_parroting_period_of_a_float_periodic_series():
    t = np.arange(120)
    series = np.stack([2 + np.sin(2 * np.pi * t / 10), 2 + np.cos(2 * np.pi * t / 10 + 0.3)], axis=1)
    model = ContextParroting(3)
    out = model.predict(series[None, :80], 40)
    assert model.lags.tolist() == [10]  # rounding ties go to the most recent match, not 20, 30, ...
    np.testing.assert_allclose(out[0], series[80:], rtol=0, atol=1e-12)


def test_parrot_match_by_hand():
    context = np.array([[1, 1], [5, 5], [2, 2], [9, 9], [1.1, 1], [4, 4], [1, 1.2]], dtype=float)
    # m = 1: the last step (1, 1.2) is nearest to (1, 1) at j = 0 (distance 0.2) -> lag 6
    j, lag, distance = parrot_match(context, 1)
    assert (j, lag) == (0, 6) and distance == pytest.approx(0.2)
    np.testing.assert_array_equal(ContextParroting(1).predict(context[None], 8)[0],
                                  context[[1, 2, 3, 4, 5, 6, 1, 2]])  # what followed, then wrapped with period 6
    # a constant series matches its most recent window outside the Theiler window (lag >= m = 4)
    j, lag, distance = parrot_match(np.ones((10, 2)), 4)
    assert (j, lag, distance) == (5, 4, 0.0)
    assert parrot_match(np.ones((10, 2)), 4, min_lag=1)[:2] == (8, 1)  # without it: the adjacent window
    with pytest.raises(ValueError, match="at least 8 time steps"):
        parrot_match(np.ones((7, 2)), 4)
    with pytest.raises(ValueError, match="at least 8 time steps"):
        ContextParroting(4).predict(np.ones((1, 7, 2)), 3)
    with pytest.raises(ValueError, match="m must be"):
        ContextParroting(0)


def damped_oscillation(steps, period=17.0, decay=0.03):
    """Two species oscillating a quarter period apart around (2, 1.5) with an amplitude that decays by
    ``exp(-decay)`` per step: the shape of the coursework's damped trajectories."""
    t = np.arange(steps)
    envelope = np.exp(-decay * t)
    return np.stack([2 + envelope * np.sin(2 * np.pi * t / period),
                     1.5 + 0.5 * envelope * np.cos(2 * np.pi * t / period)], axis=1)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_parroting_continues_a_damped_oscillation_as_an_oscillation(m):
    series = damped_oscillation(100)
    model = ContextParroting(m)
    out = model.predict(series[None, :80], 20)[0]
    assert model.lags[0] >= max(m, 2) and model.fallback_counts() == {"persistence": 0, "short_period": 0}
    assert 16 <= model.lags[0] <= 18  # one cycle back
    assert np.ptp(out[:, 0]) > 0.5 * np.ptp(series[80:, 0])  # it oscillates (persistence: ptp 0)
    persistence = np.abs(series[79] - series[80:]).mean()
    assert np.abs(out - series[80:]).mean() < persistence  # the previous cycle, larger by exp(0.03 * 17)
    # without the Theiler window the query shifted by one step is nearest: period 1, the persistence forecast
    adjacent = ContextParroting(m, min_lag=1)
    np.testing.assert_array_equal(adjacent.predict(series[None, :80], 20)[0], np.repeat(series[79:80], 20, 0))
    assert adjacent.fallback_counts()["persistence"] == 1


def test_parrot_lengths_for_a_context():
    assert parrot_lengths_for(80, [1, 2, 3, 5, 8, 12, 16, 20, 40, 41]) == [1, 2, 3, 5, 8, 12, 16, 20, 40]
    assert parrot_lengths_for(3, [1, 2]) == [1]


def figure_eight(steps, shift, period=20):
    """A Lissajous figure of eight (2 + sin θ, 2 + sin 2θ), ``period`` steps per loop: it passes (2, 2) twice per
    loop, going different ways, so one step cannot tell where the trajectory goes next."""
    theta = 2 * np.pi * (np.arange(steps) + shift) / period
    return np.stack([2 + np.sin(theta), 2 + np.sin(2 * theta)], axis=1)


def test_parroting_match_length_chosen_on_validation():
    rng = np.random.default_rng(7)
    # half the contexts end exactly on the crossing, where one step (m = 1) matches the wrong branch half a loop back
    shifts = [1, 11] * 8 + list(range(2, 10))
    series = np.stack([figure_eight(100, s) for s in shifts]) + 1e-3 * rng.standard_normal((len(shifts), 100, 2))
    contexts, truth = series[:, :80], series[:, 80:]
    best, scores = select_order(ContextParroting, [1, 2, 3, 5, 8], contexts, truth)
    assert best >= 2 and scores[1] > 10 * scores[best]
    model = ContextParroting(best)
    model.predict(contexts, 20)
    assert (model.lags % 20 == 0).all()  # whole loops back (with noise, not always the most recent one)
    forecasters, search = validated_forecasters(contexts, truth, [1, 2], DT, ode=False, parrot_lengths=[1, 2, 3])
    assert search["parrot"]["chosen"] >= 2 and set(search["parrot"]["mse_by_order"]) == {1, 2, 3}
    assert forecasters[-1].name == f"parrot({search['parrot']['chosen']})"
    assert "parrot" not in validated_forecasters(contexts, truth, [1], DT, ode=False)[1]  # opt-in


@pytest.mark.parametrize("value", ["0", "1,x", "", "80"])
def test_parrot_lengths_option_is_validated(value, capsys):
    argv = ["--context-steps", "80", "--parrot-lengths", value]
    with pytest.raises(errors.UsageError, match=r"^--parrot-lengths .*between 1 and 40"):
        classical.main(argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: classical.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --parrot-lengths") and "\n" not in err


def test_report_tells_classical_forecasters_from_the_llm():
    """The report's verdict ranks the best *LLM* forecast: no name a classical forecaster gives itself is one of
    the LLM forecasters (so a final run's var(11) or parrot(8) column is never taken for the LLM), the LLM's are."""
    from experiments.lib.classical_forecasters import AR, VAR, Persistence
    from experiments.lib.lotka_volterra_fit import LotkaVolterraODE
    from experiments.lib.parroting import ContextParroting
    from experiments.lib.reporting import LLM_FORECASTERS

    names = [Persistence().name, AR(3).name, VAR(11).name, LotkaVolterraODE(dt=0.1).name, ContextParroting(8).name,
             ContextParroting(8, min_lag=3).name]
    assert not any(n in LLM_FORECASTERS for n in names), names
    assert all(n in LLM_FORECASTERS for n in ("lora", "untrained", "zero-shot"))
