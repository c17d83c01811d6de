"""Batched, KV-cached text generation: greedy or temperature / nucleus (top-p) sampling, with an optional
allowed-token constraint and per-row stopping."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .kv_cache import KVCache
from .model import Qwen2ForCausalLM
from .packing import packed_weights


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` option: True shows the bar, False hides it, None shows it only when
    stderr (tqdm's stream) is a terminal (tqdm's own ``disable=None``: a log file or a pipe gets no bar)."""
    return None if progress is None else not progress


def token_ids_for(tokenizer, pieces: Iterable[str]) -> list[int]:
    """Ids of vocabulary entries spelled exactly as ``pieces`` (e.g. the ten digits, ".", ",", ";").

    Raises ValueError naming any piece that is not a single token of the vocabulary.
    """
    ids, absent = [], []
    for piece in pieces:
        token_id = tokenizer.token_to_id(piece)
        (absent.append(piece) if token_id is None else ids.append(token_id))
    if absent:
        raise ValueError(f"not single tokens of this vocabulary: {absent}")
    return ids


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is sampled from: softmax(``logits`` / temperature) [B, V] (float32 logits; −inf
    = forbidden), cut to the top-p nucleus (Holtzman et al. 2020, section 3.1: the smallest set of most likely
    tokens whose mass reaches ``top_p``; never empty) when ``top_p`` < 1. Not renormalised (multinomial does it).
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def _next_token(logits, temperature, top_p, generator):
    """Pick one column per row of ``logits`` [B, V] (float32): argmax, or a sample from :func:`sampling_probs`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_token_id: int,
    eos_token_ids: Iterable[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int | None = None,
    allowed_token_ids: Iterable[int] | None = None,
    stop_token_id: int | None = None,
    stop_count: int = 1,
    progress: bool | None = False,
) -> list[list[int]]:
    """Continue every prompt with a KV cache: one forward per prompt (each alone, unpadded), then one token per
    step for all rows at once, each step attending over the whole pre-allocated cache (``KVCache(fixed_shape=True)``:
    the same shapes every step). On CPU in bf16 the projections are swapped for pre-packed ones meanwhile and put
    back afterwards (:func:`~miniqwen.packing.packed_weights`: the same tokens, faster decoding, a copy of the
    weights).

    Args:
        prompts: token ids per prompt; their caches are laid out left-padded for decoding (pad slots masked out,
            positions counted over real tokens, so each row gets what it would get alone).
        max_new_tokens: hard cap on generated tokens per row.
        eos_token_ids: a row stops after producing one of these (it is not included in the output).
        temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling mass (1 = off); used only when sampling.
        num_samples: continuations per prompt; the prompt is encoded once and its cache copied.
        seed: seeds the sampling generator (same seed, same samples on the same device).
        allowed_token_ids: if given, only these tokens can be produced (e.g. digits and separators). The model
            then computes logits for these K rows of ``lm_head`` only (:class:`~miniqwen.model.HeadRows`), not
            all V: greedy picks the same tokens as the full head with the other tokens masked to −inf, and a
            sample is drawn from the same distribution (the allowed tokens' probabilities are equal), though not
            from the same random stream, so a seed gives other samples than masking the full head would.
            Count the cost with :func:`miniqwen.flop_count.generation_flops` (``head_rows=K``, K distinct ids).
        stop_token_id, stop_count: a row also stops once it has produced ``stop_token_id`` this many times
            (e.g. the ";" that ends each forecast step, times the horizon); that token is kept in the output.
        progress: show a tqdm bar over decoding steps (None: only when stderr is a terminal, :func:`bar_disabled`).

    Returns:
        ``len(prompts) · num_samples`` lists of generated ids, prompt-major (prompt 0's samples first).

    Raises:
        ValueError: empty prompt list, an empty prompt, ``num_samples < 1``, or ``allowed_token_ids`` empty or
            outside the vocabulary.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    B, L = len(prompts), max(len(p) for p in prompts)
    # attention mask over prompt + generated tokens, allocated once: step i marks column L + i real
    attend = torch.zeros((B, L + max_new_tokens), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        attend[row, L - len(prompt):L] = True

    head = None if allowed_token_ids is None else model.head_rows(allowed_token_ids)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    eos = torch.as_tensor(sorted(set(eos_token_ids)) or [-1], device=device)

    # Prefill each prompt alone: no padding is computed and attention takes the plain causal pattern (SDPA's fast
    # path); on 2 CPU cores 10 forecast prompts took 17 % less time than as one left-padded batch (README, Speed).
    # Each prompt's keys and values then go into its row of the batch cache, right-aligned as left padding would
    # put them (the pad slots are masked by ``attend``), and decoding runs on all rows at once.
    with packed_weights(model, B * num_samples, lm_head=head is None):
        cache = KVCache(model.config, B, L + max_new_tokens, dtype=dtype, device=device, fixed_shape=True)
        logits = []
        for b, prompt in enumerate(prompts):
            row = KVCache(model.config, 1, len(prompt), dtype=dtype, device=device)
            ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
            logits.append(model(ids, None, row, logits_to_keep=1, head_rows=head)[:, -1])
            cache.put_row(b, row, L)
        logits = torch.cat(logits)  # [B, V or K]
        if num_samples > 1:  # encode each prompt once, then copy its cache for every sample
            cache.repeat_interleave(num_samples)
            attend = attend.repeat_interleave(num_samples, dim=0)
            logits = logits.repeat_interleave(num_samples, dim=0)
        rows = B * num_samples

        out = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        stops_seen = torch.zeros(rows, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        bar = tqdm(total=max_new_tokens, desc="decoding", unit="tok", leave=False,
                   disable=bar_disabled(progress))
        for step in range(max_new_tokens):
            bar.update()
            token = _next_token(logits.float(), temperature, top_p, generator)  # a column of logits
            if head is not None:
                token = head.ids[token]  # column -> vocabulary id
            is_eos = torch.isin(token, eos)
            keep = ~done & ~is_eos
            out[:, step] = torch.where(keep, token, out[:, step])
            lengths += keep.long()
            if stop_token_id is not None:
                stops_seen += (keep & (token == stop_token_id)).long()
                done |= stops_seen >= stop_count
            done |= is_eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            # Finished rows keep feeding a token; its output is discarded (cheaper than reshaping the batch).
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            attend[:, L + step] = True
            logits = model(token[:, None], attend[:, : L + step + 1], cache, head_rows=head)[:, -1]
        bar.close()
    return [out[r, : lengths[r]].tolist() for r in range(rows)]
