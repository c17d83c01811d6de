"""FLOP accounting by the coursework's rules, counted by the modules as they run.

The rules (coursework FLOP table):

    matmul (m×n)·(n×p)                    m·p·(2n−1)
    add, subtract, negate, multiply,
    divide, inverse, ReLU, abs            1 each
    exp, log                              10 each
    sqrt, sin, cos                        10 each
    indexing, memory, tokenization        0
    positional-encoding *computation*     0  (but applying it counts)
    GQA                                   costed as standard multi-head attention
    backward pass                         exactly 2× forward  (so a training step = 3× forward)

How each module applies them (B batch rows, T new tokens per row, N = B·T, S = keys attended to = cache_len + T,
d = hidden_size, Hq / Hkv query / key-value heads, D = head_dim, I = intermediate_size, V = vocab_size):

    component          FLOPs
    embedding          0                                   (a table lookup is indexing)
    norm               N·(4d + 11) per RMSNorm             square d, sum d−1, mean 1, +eps 1, sqrt 10,
                                                           divide d, scale by weight d
    attn.q_proj        N·Hq·D·(2d−1) + N·Hq·D              matmul + bias
    attn.k_proj        N·Hkv·D·(2d−1) + N·Hkv·D            (k/v projections are costed at their real,
    attn.v_proj        N·Hkv·D·(2d−1) + N·Hkv·D             grouped size: that matmul is what runs)
    attn.rope          (N·Hq + N·Hkv)·(3D + D/2)           x·cos, x·sin, add (3 per element) and the
                                                           negation of half of each vector in rotate_half
    attn.scores        B·Hq·T·S·(2D−1)                     QKᵀ for every *query* head (GQA as MHA)
    attn.scale         B·Hq·T·S                            × 1/√D
    attn.mask          B·Hq·T·S                            adding the causal/padding mask
    attn.softmax       B·Hq·(11·T·S + T·(S−1))             exp 10, row sum S−1, divide 1; the max
                                                           subtraction for numerical stability is an
                                                           implementation detail and not counted
    attn.values        B·Hq·T·D·(2S−1)                     probabilities × V
    attn.o_proj        N·d·(2·Hq·D−1)                      no bias
    residual           2·N·d per layer                     the two residual adds
    mlp.gate_proj      N·I·(2d−1)                          no bias
    mlp.up_proj        N·I·(2d−1)
    mlp.act            13·N·I                              SiLU as x / (1 + exp(−x)): negate, exp, add, divide
    mlp.mul            N·I                                 SiLU(gate) × up
    mlp.down_proj      N·d·(2I−1)
    lm_head            B·K·R·(2d−1)                        K = positions whose logits are computed
                                                           (T, or fewer with ``logits_to_keep``); R = rows
                                                           of lm_head used: V, or the allowed tokens'
                                                           count with ``head_rows`` (constrained decoding)
                       + B·K·R                             with a head bias (``lora.head_bias``): its add
    lora               per wrapped linear in→out, rank r: N·r·(2·in−1) + N·out·(2r−1) + N·out (scale)
                                                           + N·out (add to the base output)

Usage::

    with FlopCounter() as fc:
        model(input_ids)
    fc.total, fc.breakdown()

Counting only costs a few Python integer operations per module call and nothing at all when no counter is
active (modules check :func:`counting` first).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from .config import PROJECTIONS, projection_shapes

_ACTIVE: list["FlopCounter"] = []


def counting() -> bool:
    """True while at least one :class:`FlopCounter` is active (modules skip the arithmetic otherwise)."""
    return bool(_ACTIVE)


def count(component: str, flops: int) -> None:
    """Add ``flops`` (element-wise work, already costed by the rules above) to every active counter."""
    for counter in _ACTIVE:
        counter.counts[component] += flops


def count_matmul(component: str, m: int, n: int, p: int, batch: int = 1) -> None:
    """Record ``batch`` matmuls of (m×n)·(n×p): ``batch·m·p·(2n−1)`` FLOPs by the coursework rule.

    The same product is also tallied as ``2·m·n·p`` in :attr:`FlopCounter.matmul_2mnp`, the convention of
    ``torch.utils.flop_counter.FlopCounterMode``, so the two can be compared.
    """
    for counter in _ACTIVE:
        counter.counts[component] += batch * m * p * (2 * n - 1)
        counter.matmul_2mnp += batch * 2 * m * n * p


class FlopCounter:
    """Context manager that collects the FLOPs of every instrumented module run inside it.

    Attributes:
        counts: ``{component: FLOPs}`` — component names as in this module's docstring table.
        matmul_2mnp: the matmul part alone, counted as 2·m·n·p (torch's FlopCounterMode convention).

    Counters nest: an outer counter sees everything an inner one sees.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.matmul_2mnp = 0

    def __enter__(self) -> "FlopCounter":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    @property
    def total(self) -> int:
        """All FLOPs counted so far (forward only; a training step costs 3× this)."""
        return sum(self.counts.values())

    def breakdown(self) -> dict[str, int]:
        """``{component: FLOPs}`` sorted by component name, with zero entries left out."""
        return {k: v for k, v in sorted(self.counts.items()) if v}

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.counts.clear()
        self.matmul_2mnp = 0


# ---------------------------------------------------------------------------------------------------------------
# Closed form
# ---------------------------------------------------------------------------------------------------------------
#
# Written independently of the counter above: pure integer arithmetic from the config, no model and no torch, so
# that the two can check each other (tests/test_flops.py asserts exact equality).

#: Component names of the table above, in the order of one forward pass.
COMPONENTS: tuple[str, ...] = (
    "embedding", "norm",
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.rope",
    "attn.scores", "attn.scale", "attn.mask", "attn.softmax", "attn.values", "attn.o_proj",
    "residual",
    "mlp.gate_proj", "mlp.up_proj", "mlp.act", "mlp.mul", "mlp.down_proj",
    "lm_head", "lora",
)

#: LoRA targets costed when none are given: query and value, the coursework's setting (and LoRA's own default,
#: ``lora.DEFAULT_LORA_TARGETS``, which this package may not import).
_QUERY_VALUE: tuple[str, ...] = ("q_proj", "v_proj")


def _linear_dims(config, name: str) -> tuple[int, int]:
    """(in_features, out_features) of the linear layer ``name`` in one decoder layer."""
    dims = projection_shapes(config)
    if name not in dims:
        raise ValueError(f"unknown LoRA target {name!r}; expected some of {PROJECTIONS}")
    return dims[name]


def forward_flops_breakdown(
    config,
    batch_size: int,
    seq_len: int,
    lora_rank: int = 0,
    cache_len: int = 0,
    logits_to_keep: int = 0,
    lora_targets: tuple[str, ...] = _QUERY_VALUE,
    *,
    head_rows: int | None = None,
    head_bias: bool = False,
) -> dict[str, int]:
    """FLOPs of ONE forward pass of a Qwen2 model, per component, by the coursework's rules (closed form).

    Args:
        config: a :class:`miniqwen.config.Qwen2Config` (only its sizes are read).
        batch_size: B, rows in the batch (padding tokens are computed, so they cost like real ones).
        seq_len: T, new tokens per row in this pass.
        lora_rank: r, LoRA rank on every layer's ``lora_targets`` (0 = no LoRA).
        cache_len: tokens per row already in the KV cache; the new tokens attend to S = cache_len + T keys.
        logits_to_keep: compute ``lm_head`` only for the last K = min(logits_to_keep, T) positions (0 = all T).
        lora_targets: names of the wrapped linear layers (any of :data:`miniqwen.config.PROJECTIONS`; default
            q_proj and v_proj, as ``lora.DEFAULT_LORA_TARGETS``).
        head_rows: R, rows of ``lm_head`` computed (None = all V): the allowed tokens' count when the model runs
            with :class:`miniqwen.model.HeadRows` (``generate(..., allowed_token_ids=...)``).
        head_bias: the head has a bias (``lora.head_bias``, trainable): + B·K·R adds (1 FLOP each) in ``lm_head``.

    Returns:
        ``{component: FLOPs}`` (ints) for every name in :data:`COMPONENTS`, zeros included; the sum is
        :func:`forward_flops`. Forward only: a training step costs 3× (see :func:`training_flops`).

    Raises:
        ValueError: for non-positive ``batch_size``/``seq_len``, negative ``cache_len``/``logits_to_keep``/
            ``lora_rank``, ``head_rows`` not in [1, V], or an unknown LoRA target.

    Source: the coursework's FLOP table (rules at the top of this module); architecture as in transformers'
    ``Qwen2ForCausalLM``. Notation: L layers, d hidden, I intermediate, V vocab, Hq / Hkv query / key-value heads,
    D head_dim, N = B·T token positions, S = cache_len + T, K kept logit positions, R lm_head rows (V unless
    ``head_rows``), r LoRA rank.

    Per-operation accounting ("show your work"). A matmul (m×n)·(n×p) costs m·p·(2n−1): p·m dot products of
    length n, each n multiplies and n−1 adds. For one decoder layer:

    =================  ========================================  ==============================================
    operation          FLOPs                                     why
    =================  ========================================  ==============================================
    input RMSNorm      N·(4d + 11)                               x² (d), sum (d−1), ÷d (1), +eps (1), sqrt (10),
                                                                 divide x by it (d), × weight (d)
    q_proj + bias      N·Hq·D·(2d−1) + N·Hq·D = 2d·N·Hq·D        (N×d)·(d×Hq·D), then add the bias
    k_proj, v_proj     2d·N·Hkv·D each                           real grouped size (Hkv heads)
    RoPE on q and k    N·(Hq + Hkv)·(3D + D/2)                   x·cos, rotate_half(x)·sin, add (3 per element)
                                                                 and −x₂ (D/2 negations per vector); cos/sin
                                                                 tables are positional-encoding computation: 0
    scores QKᵀ         B·Hq·T·S·(2D−1)                           every query head (GQA costed as MHA)
    scale by 1/√D      B·Hq·T·S
    + mask             B·Hq·T·S
    softmax            B·Hq·(11·T·S + T·(S−1))                   exp (10) and divide (1) per score, row sums
    probs · V          B·Hq·T·D·(2S−1)
    o_proj             N·d·(2·Hq·D − 1)                          no bias
    2 residual adds    2·N·d
    post-attn RMSNorm  N·(4d + 11)
    gate_proj, up_proj N·I·(2d−1) each                           no bias
    SiLU               13·N·I                                    x/(1+exp(−x)): negate 1, exp 10, add 1, div 1
    SiLU(gate) × up    N·I
    down_proj          N·d·(2I − 1)
    =================  ========================================  ==============================================

    Summing (the four attention-core rows collapse: S(2D−1) + 2S + 11S + S−1 + D(2S−1) = S(4D+13) − D − 1)::

        F_layer = N·[4·d·D·(Hq + Hkv) + 3.5·D·(Hq + Hkv) + 6·d·I + 12·I + 8·d + 22]
                + B·Hq·T·[S·(4D + 13) − D − 1]

    (the "8d + 22" is the two norms 2·(4d+11) plus the residuals 2d, minus the d saved by each of o_proj and
    down_proj having 2n−1 rather than 2n). Whole model::

        F = L·F_layer  +  N·(4d + 11)  [final norm, on all T positions]  +  B·K·R·(2d − 1)  [lm_head]
            [+ B·K·R with a head bias]  + F_lora,   embedding lookup = 0,
        F_lora = L · Σ_targets N·[r·(2·in − 1) + out·(2r − 1) + 2·out]     (A, B, scale, add to base output)
               = L·N·[2r·(2d − 1) + (Hq + Hkv)·D·(2r + 1)]                    for targets q_proj, v_proj.

    Qwen2.5-0.5B (L=24, d=896, I=4864, Hq=14, Hkv=2, D=64, V=151936), B=1, T=S=512, no LoRA:
    F_layer = 16,289,435,648; F = 24·F_layer + 1,840,640 [final norm] + 139,324,096,512 [lm_head]
    = 530,272,392,704 FLOPs, i.e. **1.0357e9 FLOPs per token** with logits on all 512 positions (training,
    teacher forcing); with logits only for the last position (prompt prefill, ``logits_to_keep=1``)
    391,220,413,568 / 512 = **7.641e8 per token**. The lm_head alone is V·(2d−1) = 2.7212e8 per position, 26% of
    the all-logits cost. Decoding one token against a 511-token cache also costs 1.0357e9 (causal masking saves
    nothing here: the masked scores are computed and counted). LoRA r=4 on q,v adds 5.65e5 per token (0.05%).
    Constrained to R = 13 tokens (ten digits, ".", ",", ";"; ``head_rows=13``) the lm_head of a decode step costs
    13·1791 = 23,283 instead of 2.7212e8, and the step 7.6359e8 instead of 1.0357e9 (−26%). A trainable head
    bias adds V = 151,936 per position with all logits (0.015% of the 1.0357e9 per token), R = 13 constrained.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("cache_len", cache_len, 0),
                             ("logits_to_keep", logits_to_keep, 0), ("lora_rank", lora_rank, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    L, d, I, V = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    R = V if head_rows is None else head_rows
    if not isinstance(R, int) or isinstance(R, bool) or not 1 <= R <= V:
        raise ValueError(f"head_rows must be None or an int in [1, {V}], got {head_rows!r}")
    Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    B, T = batch_size, seq_len
    N, S = B * T, cache_len + T
    K = min(logits_to_keep, T) if logits_to_keep else T

    lora = 0
    if lora_rank:
        r = lora_rank
        for name in lora_targets:
            n_in, n_out = _linear_dims(config, name)
            lora += N * r * (2 * n_in - 1) + N * n_out * (2 * r - 1) + N * n_out + N * n_out
    else:
        for name in lora_targets:  # still validate the names
            _linear_dims(config, name)

    per_layer = {
        "norm": 2 * N * (4 * d + 11),
        "attn.q_proj": N * Hq * D * (2 * d - 1) + N * Hq * D,
        "attn.k_proj": N * Hkv * D * (2 * d - 1) + N * Hkv * D,
        "attn.v_proj": N * Hkv * D * (2 * d - 1) + N * Hkv * D,
        "attn.rope": (N * Hq + N * Hkv) * (3 * D + D // 2),
        "attn.scores": B * Hq * T * S * (2 * D - 1),
        "attn.scale": B * Hq * T * S,
        "attn.mask": B * Hq * T * S,
        "attn.softmax": B * Hq * (11 * T * S + T * (S - 1)),
        "attn.values": B * Hq * T * D * (2 * S - 1),
        "attn.o_proj": N * d * (2 * Hq * D - 1),
        "residual": 2 * N * d,
        "mlp.gate_proj": N * I * (2 * d - 1),
        "mlp.up_proj": N * I * (2 * d - 1),
        "mlp.act": 13 * N * I,
        "mlp.mul": N * I,
        "mlp.down_proj": N * d * (2 * I - 1),
        "lora": lora,
    }
    out = {name: 0 for name in COMPONENTS}
    for name, value in per_layer.items():
        out[name] = L * value
    out["norm"] += N * (4 * d + 11)  # final norm
    out["lm_head"] = B * K * R * (2 * d - 1) + (B * K * R if head_bias else 0)
    return out


def forward_flops(
    config,
    batch_size: int,
    seq_len: int,
    lora_rank: int = 0,
    cache_len: int = 0,
    logits_to_keep: int = 0,
    lora_targets: tuple[str, ...] = _QUERY_VALUE,
    *,
    head_rows: int | None = None,
    head_bias: bool = False,
) -> int:
    """Total FLOPs (int) of ONE forward pass: the sum of :func:`forward_flops_breakdown` (same arguments,
    same errors; the derivation and the Qwen2.5-0.5B numbers are in that docstring)."""
    return sum(forward_flops_breakdown(config, batch_size, seq_len, lora_rank, cache_len, logits_to_keep,
                                       lora_targets, head_rows=head_rows, head_bias=head_bias).values())


def training_flops(
    config,
    batch_size: int,
    seq_len: int,
    lora_rank: int = 0,
    cache_len: int = 0,
    logits_to_keep: int = 0,
    lora_targets: tuple[str, ...] = _QUERY_VALUE,
) -> int:
    """FLOPs (int) of ONE training step = 3 × :func:`forward_flops` (coursework rule: backward = 2× forward,
    whatever is frozen — LoRA does not make the backward pass cheaper under this convention)."""
    return 3 * forward_flops(config, batch_size, seq_len, lora_rank, cache_len, logits_to_keep, lora_targets)


def generation_flops(
    config,
    prompt_len: int | Sequence[int],
    new_tokens: int,
    batch_size: int = 1,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = _QUERY_VALUE,
    num_samples: int = 1,
    *,
    head_rows: int | None = None,
    head_bias: bool = False,
) -> int:
    """FLOPs (int) of generating ``new_tokens`` tokens after prompts of ``prompt_len`` tokens with a KV cache, as
    :func:`miniqwen.generate.generate` does it: one prefill pass per prompt, alone and unpadded, with
    ``logits_to_keep=1`` (gives token 1); the cache is then copied ``num_samples`` times and ``new_tokens − 1``
    one-token passes run on ``batch_size · num_samples`` rows, each attending to all L + ``new_tokens`` slots of
    the cache (L the longest prompt; ``KVCache(fixed_shape=True)``: the rows are left-padded and the slots not
    yet filled are masked, but both cost like real keys). The last generated token is never fed back. With
    ``allowed_token_ids``, generate computes only those rows of lm_head: pass ``head_rows`` = the number of
    distinct allowed ids (None = V, unconstrained); ``head_bias``: the head has a bias (:func:`forward_flops`).

    ``prompt_len``: an int, every one of the ``batch_size`` prompts that long; or each prompt's length (then
    ``batch_size`` is their number). This is the cost when no row stops early; with EOS / stop tokens ending every
    row before ``new_tokens``, the loop ends sooner and the real cost is lower (count it with a
    :class:`FlopCounter` to charge the exact figure).

    Raises:
        ValueError: as :func:`forward_flops`, for ``new_tokens < 1`` or ``num_samples < 1``, and for a list of
            lengths that is empty or whose number differs from a ``batch_size`` other than 1.
    """
    for name, value in (("new_tokens", new_tokens), ("num_samples", num_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    lengths = [prompt_len] * batch_size if isinstance(prompt_len, int) else list(prompt_len)
    if not lengths or (not isinstance(prompt_len, int) and batch_size not in (1, len(lengths))):
        raise ValueError(f"prompt_len: {len(lengths)} lengths for batch_size {batch_size}")
    batch_size, longest = len(lengths), max(lengths)
    prefill = sum(forward_flops(config, 1, n, lora_rank, 0, 1, lora_targets, head_rows=head_rows,
                                head_bias=head_bias) for n in lengths)
    # every step attends over the whole cache: all steps cost the same
    step = forward_flops(config, batch_size * num_samples, 1, lora_rank, longest + new_tokens - 1, 1, lora_targets,
                         head_rows=head_rows, head_bias=head_bias)
    return prefill + (new_tokens - 1) * step


def loss_flops(vocab_size: int, n_tokens: int) -> int:
    """FLOPs of the mean next-token cross-entropy over ``n_tokens`` targets: ``n·(11·V + 10) + n``.

    Per token: log-softmax over V logits and the target's log-probability — V exps (10 each), V − 1 adds (sum),
    a log (10), a subtract (z_target − log Σ exp) = 11·V + 10; the max subtracted for stability is an
    implementation detail, not counted (as for attention's softmax). The mean: n − 1 adds and a divide = n.
    Counted under component ``"loss"``; a training step charges it 3× like the forward.
    """
    return n_tokens * (11 * vocab_size + 10) + n_tokens
