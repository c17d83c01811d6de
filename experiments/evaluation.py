"""Forecast evaluation shared by every stage: prompts, constrained generation, decoding, metrics and plots."""

from __future__ import annotations

import argparse
import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data import decode, encode
from miniqwen import FlopCounter, chat_prompt, generate, token_ids_for
from miniqwen.flops import generation_flops
from miniqwen.tokenizer import END_OF_TEXT, IM_END

NUMERIC_ALPHABET = list("0123456789") + [".", ",", ";"]
SPECIES = ("prey", "predator")


def add_forecast_args(parser: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """Forecast options shared by the stages (the generation batch size is ``args.gen_batch_size``, spelled
    ``batch_flag`` on the command line, since training stages use ``--batch-size`` for training)."""
    parser.add_argument("--context-steps", type=int, default=80, help="observed time steps in the prompt (default 80)")
    parser.add_argument("--horizon", type=int, default=20, help="time steps to forecast (default 20)")
    parser.add_argument("--prompt", default="raw", choices=["raw", "chat"],
                        help="raw LLMTIME continuation, or an instruction in the Qwen chat format (default raw)")
    parser.add_argument("--samples", type=int, default=1, help="1 = greedy (default); N = median of N samples")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when --samples > 1")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when --samples > 1")
    parser.add_argument(batch_flag, dest="gen_batch_size", type=int, default=8,
                        help="prompts per generation batch (default 8)")
    parser.add_argument("--plots", type=int, default=4, help="forecasts drawn per PNG (default 4)")


def forecast_set(ds, args: argparse.Namespace, split: str = "validation"):
    """The trajectories to forecast: ``(indices (n,), trajectories [n, T, 2], contexts [n, C, 2],
    truth [n, H, 2] float64)`` for the first ``args.limit`` of ``split``.

    Raises ``common.UsageError`` if the context and horizon do not fit in the data or the split is empty.
    """
    from .common import UsageError

    T = ds.data.n_steps
    if args.context_steps < 1 or args.horizon < 1 or args.context_steps + args.horizon > T:
        raise UsageError(f"--context-steps + --horizon must be <= {T} time steps and both >= 1")
    indices, trajectories = ds.trajectories(split, args.limit)
    if len(indices) == 0:
        raise UsageError(f"split {split!r} is empty")
    contexts = trajectories[:, : args.context_steps]
    truth = trajectories[:, args.context_steps : args.context_steps + args.horizon].astype(np.float64)
    return indices, trajectories, contexts, truth


def forecast_prompt(context: np.ndarray, alpha: float, decimals: int, horizon: int, mode: str) -> str:
    """The text the model continues for one trajectory.

    ``context`` [C, 2] in data units. ``mode="raw"``: the LLMTIME string of the context followed by ";" — the
    model simply continues the sequence (Gruver et al. 2023). ``mode="chat"``: the same string inside a Qwen chat
    turn that asks for the next ``horizon`` steps in the same format; the assistant's answer is the forecast.
    """
    series = encode(context, alpha, decimals) + ";"
    if mode == "raw":
        return series
    if mode == "chat":
        return chat_prompt(
            "Below is a predator-prey time series: one time step per ';'-separated entry, each written as "
            f"'prey,predator' with {decimals} decimals. Continue it with the next {horizon} time steps in exactly "
            f"the same format. Answer with the numbers only.\n\n{series}"
        )
    raise ValueError(f"unknown prompt mode {mode!r} (raw or chat)")


@dataclass
class Forecasts:
    """Decoded forecasts of n trajectories.

    Attributes:
        values: [n, horizon, 2] in data units; the median over samples (NaN where no sample gave a value).
        samples: [n, num_samples, horizon, 2] every decoded sample (NaN where unparsed or missing).
        texts: generated text per trajectory and sample.
        n_invalid, n_missing: per trajectory, summed over samples (see :func:`data.llmtime.decode`).
        complete: per trajectory, True if every sample parsed completely.
        flops: FLOPs counted while generating (coursework rules, forward only).
    """

    values: np.ndarray
    samples: np.ndarray
    texts: list[list[str]]
    n_invalid: np.ndarray
    n_missing: np.ndarray
    complete: np.ndarray
    flops: int = 0
    prompt_tokens: list[int] = field(default_factory=list)


def max_tokens_per_step(decimals: int) -> int:
    """Generous token budget for one "prey,pred;" step: up to 3 integer digits, the point and decimals per value
    (Qwen tokenizes digits one by one), plus "," and ";"."""
    return 2 * (3 + 1 + decimals) + 2


def forecast(
    model,
    tokenizer,
    contexts: np.ndarray,
    horizon: int,
    alpha: float,
    decimals: int = 2,
    prompt: str = "raw",
    samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> Forecasts:
    """Forecast ``horizon`` steps after each context with constrained generation and decode them.

    Args:
        contexts: [n, C, 2] observed steps in data units.
        samples: 1 = greedy decoding; N > 1 = N samples at ``temperature``/``top_p`` per trajectory, combined by
            the element-wise median (the LLMTIME point forecast, Gruver et al. 2023, section 3).
        batch_size: prompts per generation batch (each expands to ``samples`` rows).

    Generation may emit only digits, ".", ",", ";" and the end tokens, and stops each row after ``horizon`` ";"
    (or ``max_tokens_per_step(decimals) · horizon`` tokens). Unparseable output is counted, never raised.

    Returns:
        :class:`Forecasts`.
    """
    allowed = token_ids_for(tokenizer, NUMERIC_ALPHABET) + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    semicolon = tokenizer.token_to_id(";")
    eos = [tokenizer.eos_token_id, tokenizer.token_to_id(END_OF_TEXT), tokenizer.token_to_id(IM_END)]
    prompts = [tokenizer.encode(forecast_prompt(c, alpha, decimals, horizon, prompt)) for c in contexts]
    n = len(prompts)
    out = np.full((n, samples, horizon, 2), np.nan)
    texts: list[list[str]] = [[] for _ in range(n)]
    n_invalid, n_missing = np.zeros(n, int), np.zeros(n, int)
    counter = FlopCounter()
    # batch prompts of similar length together: less left padding, so less wasted compute
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    with counter, tqdm(total=n, desc=f"forecasting ({prompt}, {samples} sample{'s' * (samples > 1)})",
                       unit="traj") as bar:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            batch = [prompts[i] for i in rows]
            generated = generate(
                model, batch, max_tokens_per_step(decimals) * horizon, pad_token_id=tokenizer.pad_token_id,
                eos_token_ids=eos, temperature=0.0 if samples == 1 else temperature, top_p=top_p,
                num_samples=samples, seed=seed + start, allowed_token_ids=allowed, stop_token_id=semicolon,
                stop_count=horizon, progress=True,
            )
            for j, i in enumerate(rows):
                for s in range(samples):
                    text = tokenizer.decode(generated[j * samples + s])
                    decoded = decode(text, alpha, expected_steps=horizon)
                    out[i, s] = decoded.values
                    n_invalid[i] += decoded.n_invalid
                    n_missing[i] += decoded.n_missing
                    texts[i].append(text)
            bar.update(len(batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN median (nothing parsed) is expected
        values = np.nanmedian(out, axis=1)
    return Forecasts(values, out, texts, n_invalid, n_missing, (n_invalid == 0) & (n_missing == 0),
                     counter.total, [len(p) for p in prompts])


def forecast_plan(config, tokenizer, contexts: np.ndarray, alpha: float, args: argparse.Namespace,
                  lora_rank: int = 0, lora_targets=("q_proj", "v_proj")) -> int:
    """Closed-form FLOPs of :func:`forecast` on ``contexts`` [n, C, 2] with the options of
    :func:`add_forecast_args`: prompts batched by length as :func:`forecast` does, each batch costed with
    :func:`miniqwen.flops.generation_flops` at its longest prompt. An upper bound: every row is assumed to generate
    the full ``max_tokens_per_step · horizon`` tokens. LoRA of ``lora_rank`` on ``lora_targets`` if > 0."""
    lens = sorted(len(tokenizer.encode(forecast_prompt(c, alpha, args.decimals, args.horizon, args.prompt)))
                  for c in contexts)
    max_new = max_tokens_per_step(args.decimals) * args.horizon
    total = 0
    for start in range(0, len(lens), args.gen_batch_size):
        batch = lens[start : start + args.gen_batch_size]
        total += generation_flops(config, max(batch), max_new, len(batch), lora_rank, tuple(lora_targets),
                                  num_samples=args.samples)
    return total


def evaluate_forecasts(model, tokenizer, args: argparse.Namespace, alpha: float, contexts: np.ndarray,
                       truth: np.ndarray):
    """Forecast every context with the options of :func:`add_forecast_args` and score it.

    Returns ``(Forecasts, pred [n, H, 2] with missing values filled, scores)``; scores holds ``metrics``
    (:func:`forecast_metrics`), ``parsed_fraction``, ``steps_invalid``, ``steps_missing`` and ``flops``.
    """
    fc = forecast(model, tokenizer, contexts, args.horizon, alpha, args.decimals, args.prompt, args.samples,
                  args.gen_batch_size, args.seed, args.temperature, args.top_p)
    pred = fill_missing(fc.values, contexts.astype(np.float64))
    scores = {
        "metrics": forecast_metrics(pred, truth),
        "parsed_fraction": float(fc.complete.mean()),
        "steps_invalid": int(fc.n_invalid.sum()),
        "steps_missing": int(fc.n_missing.sum()),
        "flops": int(fc.flops),
    }
    return fc, pred, scores


def persistence_metrics(contexts: np.ndarray, truth: np.ndarray) -> dict:
    """:func:`forecast_metrics` of repeating the last observed value (a reference for the scale of the errors)."""
    return forecast_metrics(fill_missing(np.full_like(truth, np.nan), contexts.astype(np.float64)), truth)


def fill_missing(pred: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """Replace NaN forecast values by the last observed value of the context (a persistence fallback), so that
    every trajectory counts in the metrics. ``pred`` [n, H, 2], ``contexts`` [n, C, 2]."""
    last = np.broadcast_to(contexts[:, -1:, :], pred.shape)
    return np.where(np.isnan(pred), last, pred)


def forecast_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Errors of ``pred`` against ``truth`` (both [n, H, 2], data units, no NaN), per species.

    MSE and MAE are means over all trajectories and horizon steps; R² = 1 − SS_res / SS_tot with SS_tot taken
    around the mean of the true values over all trajectories and steps (so R² compares against predicting one
    constant); ``mae_by_step`` is the MAE at each horizon step (length H).
    """
    if pred.shape != truth.shape or np.isnan(pred).any():
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must match and pred must have no NaN")
    result = {}
    for k, name in enumerate(SPECIES):
        p, t = pred[..., k], truth[..., k]
        err = p - t
        ss_tot = float(((t - t.mean()) ** 2).sum())
        result[name] = {
            "mse": float((err**2).mean()),
            "mae": float(np.abs(err).mean()),
            "r2": float(1.0 - (err**2).sum() / ss_tot) if ss_tot > 0 else float("nan"),
            "mae_by_step": np.abs(err).mean(axis=0).tolist(),
        }
    return result


def per_trajectory_rows(indices, pred: np.ndarray, truth: np.ndarray, fc: Forecasts) -> list[dict]:
    """One CSV row per trajectory: its index, MSE/MAE per species, parse counts."""
    rows = []
    for i, idx in enumerate(indices):
        row = {"trajectory": int(idx)}
        for k, name in enumerate(SPECIES):
            err = pred[i, :, k] - truth[i, :, k]
            row[f"mse_{name}"] = float((err**2).mean())
            row[f"mae_{name}"] = float(np.abs(err).mean())
        row.update(complete=bool(fc.complete[i]), n_invalid=int(fc.n_invalid[i]), n_missing=int(fc.n_missing[i]))
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write dict rows (same keys) to ``path`` as CSV."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_forecasts(path: Path, time: np.ndarray, indices, trajectories: np.ndarray, fc: Forecasts,
                   context_steps: int, horizon: int, title: str, count: int = 4) -> bool:
    """Draw the first ``count`` forecasts (median and samples) against the truth as one PNG.

    Returns False (and draws nothing) when matplotlib is not installed (``pip install .[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    count = min(count, len(indices))
    fig, axes = plt.subplots(count, 1, figsize=(9, 2.6 * count), squeeze=False)
    t_all = time[: context_steps + horizon]
    t_future = time[context_steps : context_steps + horizon]
    for ax, i in zip(axes[:, 0], range(count)):
        for k, (name, colour) in enumerate(zip(SPECIES, ("tab:blue", "tab:red"))):
            ax.plot(t_all, trajectories[i, : context_steps + horizon, k], color=colour, lw=1.2, label=f"{name} (true)")
            for s in range(fc.samples.shape[1] if fc.samples.shape[1] > 1 else 0):
                ax.plot(t_future, fc.samples[i, s, :, k], color=colour, lw=0.5, alpha=0.35)
            ax.plot(t_future, fc.values[i, :, k], color=colour, ls="--", lw=1.6, label=f"{name} (forecast)")
        ax.axvline(time[context_steps - 1], color="grey", lw=0.8, ls=":")
        ax.set_title(f"trajectory {int(indices[i])}", fontsize=9)
        ax.set_ylabel("population")
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper left")
    axes[-1, 0].set_xlabel("time")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
