"""Shared fixtures: tiny random Qwen2 checkpoints written by transformers (the reference), and the tokenizer."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO.parent / "shared" / "models" / "qwen2.5-tokenizer"


def run_forecast(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``python -m experiments.forecast`` run as from the command line."""
    from experiments import forecast
    from experiments.lib.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: forecast.main([str(a) for a in argv]))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def toy_lora_argv(model, tmp_path: Path, lr: str, *extra) -> list[str]:
    """``experiments.lora_default`` options of a toy run (20 simulated systems of 30 steps written to
    ``tmp_path/lv.h5``, 2 steps at context 48, 2 trajectories forecast 8 → 2) into ``tmp_path/run``, then ``extra``."""
    from data.simulate import simulate, write_h5

    write_h5(tmp_path / "lv.h5", *simulate(n_systems=20, n_steps=30, seed=0))
    argv = ["--model", model, "--data", tmp_path / "lv.h5", "--device", "cpu", "--out", tmp_path / "run",
            "--ledger", tmp_path / "ledger.jsonl", "--train-limit", "4", "--limit", "2", "--context-steps", "8",
            "--horizon", "2", "--context-length", "48", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2",
            "--eval-batches", "1", "--lr", lr, "--no-progress", *extra]
    return [str(a) for a in argv]


def tiny_hf_config(tie: bool, **overrides):
    """A 3-layer Qwen2 config with GQA (4 query heads, 2 key/value heads) small enough for CPU tests."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, use_sliding_window=False,
    )
    kwargs.update(overrides)
    return transformers.Qwen2Config(**kwargs)


def write_tiny_checkpoint(path: Path, tie: bool, seed: int = 0, **overrides):
    """Save a randomly initialised transformers Qwen2ForCausalLM (safetensors) to ``path``; return it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(tiny_hf_config(tie, **overrides)).eval()
    # random init leaves norms at 1 and biases at 0: perturb them so those code paths are really compared
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if (SHARED_TOKENIZER / "tokenizer.json").is_file():
        (path / "tokenizer.json").write_bytes((SHARED_TOKENIZER / "tokenizer.json").read_bytes())
    else:
        write_stand_in_tokenizer(path / "tokenizer.json")
    return model


def write_stand_in_tokenizer(path: Path) -> None:
    """A tiny character-level tokenizer.json with Qwen's special tokens, for tests that load a checkpoint directory
    but never tokenize (used when the real Qwen2.5 tokenizer is not beside the repo)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3}
    vocab.update({chr(c): 4 + i for i, c in enumerate(range(32, 127))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.save(str(path))


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def tiny_checkpoint(request, tmp_path_factory):
    """(directory, transformers reference model) for a tiny tied or untied checkpoint."""
    path = tmp_path_factory.mktemp("tiny-tied" if request.param else "tiny-untied")
    return path, write_tiny_checkpoint(path, tie=request.param)


@pytest.fixture(scope="session")
def tokenizer_dir():
    if not (SHARED_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"Qwen2.5 tokenizer not found at {SHARED_TOKENIZER}")
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def real_model_dir():
    """The real-weights directory from MINIQWEN_TEST_MODEL (skipped when unset)."""
    path = os.environ.get("MINIQWEN_TEST_MODEL")
    if not path:
        pytest.skip("MINIQWEN_TEST_MODEL is not set (point it at a HF-layout Qwen2.5 directory to run real-weight tests)")
    if not Path(path).is_dir():
        pytest.fail(f"MINIQWEN_TEST_MODEL={path} is not a directory")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_full_vocab(tmp_path_factory, tokenizer_dir):
    """A 2-layer random Qwen2 with the real 151,936-token vocabulary, so the real tokenizer's ids fit (read only)."""
    path = tmp_path_factory.mktemp("tiny-full-vocab")
    write_tiny_checkpoint(path, tie=True, vocab_size=151936, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return path


def write_sim_file(path: Path, n_systems: int, n_steps: int, t_max: float, seed: int) -> Path:
    """Simulate ``n_systems`` Lotka-Volterra trajectories of ``n_steps`` steps over [0, t_max] and write them to
    ``path`` in the coursework's HDF5 schema; return ``path``."""
    from data.simulate import simulate, write_h5

    traj, time = simulate(n_systems=n_systems, n_steps=n_steps, t_max=t_max, seed=seed)
    write_h5(path, traj, time)
    return path


@pytest.fixture(scope="session")
def sim_file(tmp_path_factory):
    """A small simulated Lotka-Volterra file in the coursework's schema: 40 systems x 30 steps (read only)."""
    return write_sim_file(tmp_path_factory.mktemp("sim") / "lv.h5", n_systems=40, n_steps=30, t_max=60.0, seed=1)
