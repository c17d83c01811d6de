"""Forecast evaluation shared by every stage: prompts, constrained generation, decoding, metrics, plots, and the
token-level loss on validation chunks."""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data import Chunks, decode, encode
from miniqwen import FlopCounter, chat_prompt, generate, token_ids_for
from miniqwen.tokenizer import END_OF_TEXT, IM_END

NUMERIC_ALPHABET = list("0123456789") + [".", ",", ";"]
SPECIES = ("prey", "predator")


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
                stop_count=horizon,
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


@torch.no_grad()
def token_loss(model, chunks: Chunks, batch_size: int = 4, desc: str = "validation loss") -> tuple[float, int, int]:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on ``chunks``.

    Every position whose *target* is a real token counts once; padding (``attention_mask == 0``) is never a
    target. Returns ``(loss, n_tokens, flops)`` where flops is the counted forward cost (coursework rules).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with FlopCounter() as counter:
        for start in tqdm(range(0, len(chunks), batch_size), desc=desc, unit="batch", leave=False):
            ids = chunks.input_ids[start : start + batch_size].to(device)
            mask = chunks.attention_mask[start : start + batch_size].to(device)
            logits = model(ids, attention_mask=mask)[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / max(count, 1), count, counter.total
