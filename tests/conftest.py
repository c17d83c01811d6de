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


# ------------------------------------------------------------------------------------------------------------
# Shared by the refusal tests (test_refuse_options, test_refuse_inputs, test_run_directories, test_resume_checks,
# test_checkpoint_integrity, test_output_writes_and_messages): running a stage as the command line runs it, the
# one-line error it must end with, checksums of what is on disk, and small runs and run directories to refuse.


def exit_err(main, argv, capsys):
    """``(exit status, stderr)`` of ``main(argv)`` run as the command line runs it."""
    from experiments.lib.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err


def exit_err_out(main, argv, capsys):
    """``(exit status, stderr, stdout)`` of ``main(argv)`` run as the command line runs it."""
    from experiments.lib.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err, captured.out


def error_line(code, err, *words):
    """Assert exit status 2 and a single ``error: `` line holding every one of ``words``; return that line."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), err
    return lines[0]


def checksums(root) -> dict:
    """{relative path: sha256} of every file under ``root``."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def record(out, stage: str):
    """Make ``out`` a run directory of ``stage`` (its run record, as a stage writes it first): a directory without
    one is nobody's run."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"made_by": "miniqwen", "stage": stage, "weights": None,
                                              "written": []}) + "\n")
    return out


def stage_args(model, data, out, ledger):
    """Options of a small CPU forecast (2 trajectories, 8 context steps, horizon 3) for a stage with ``--model``."""
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--ledger", str(ledger), "--device", "cpu",
            "--precision", "float32", "--limit", "2", "--context-steps", "8", "--horizon", "3", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A directory holding ``lv.h5`` (20 simulated systems of 30 steps) and a ledger with one earlier charge."""
    from data.simulate import simulate, write_h5
    from experiments.lib.budget import Ledger

    root = tmp_path_factory.mktemp("refusals")
    write_h5(root / "lv.h5", *simulate(n_systems=20, n_steps=30, seed=0))
    Ledger(root / "ledger.jsonl").charge("earlier", 12345, "train")
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 128-token model (with the real tokenizer when it is beside the repository): for experiments.train."""
    path = tmp_path_factory.mktemp("tiny128")
    write_tiny_checkpoint(path, tie=True)
    return path


def train_stage_argv(tiny_dir, tmp_path, ledger) -> list[str]:
    """``experiments.train`` options for the tiny model (:func:`tiny_dir`) on 6 random 16-token chunks it saves in
    ``tmp_path``: batch 2, a checkpoint every step, no evaluation, float32, output in ``tmp_path / "run"``."""
    from data.chunks import make_chunks
    from experiments.train import save_chunks

    g = torch.Generator().manual_seed(2)
    save_chunks(make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16),
                tmp_path / "chunks.safetensors")
    return ["--model", str(tiny_dir), "--train-chunks", str(tmp_path / "chunks.safetensors"), "--out",
            str(tmp_path / "run"), "--ledger", str(ledger), "--context-length", "16", "--batch-size", "2",
            "--checkpoint-every", "1", "--eval-every", "0", "--no-progress", "--precision", "float32"]


def tiny_run(tmp_path, **overrides):
    """(model, chunks, TrainSettings) of a 2-layer random model training 4 steps on random chunks of 16 tokens."""
    from data.chunks import make_chunks
    from experiments.lib.settings import TrainSettings
    from miniqwen import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    g = torch.Generator().manual_seed(1)
    chunks = make_chunks([torch.randint(1, 64, (40,), generator=g).tolist() for _ in range(6)], 16)
    settings = TrainSettings(**{**dict(lr=1e-2, batch_size=2, context_length=16, max_steps=4, eval_every=2,
                                       eval_batches=1, checkpoint_every=2, progress=False), **overrides})
    return model, chunks, settings


def snapshot(*roots: Path) -> dict:
    """{path: sha256 (files) / "-> target" (links) / "dir"} of everything under ``roots``, dotfiles included."""
    import hashlib

    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_dir():
                    out[str(p)] = "dir"
                else:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
    return out


def cli(main, argv, capsys):
    """(exit status, stderr) of ``main(argv)`` run as the command line runs it."""
    from experiments.lib.cli import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    return info.value.code, capsys.readouterr().err


def with_option(args: list[str], option: str, value: str | None) -> list[str]:
    """``args`` with ``option`` set to ``value`` (replaced where it is given, else added; a flag when None)."""
    if option in args:
        i = args.index(option)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [option] + ([] if value is None else [value])


def refused(code, err, *words):
    """Assert exit status 2 and a single ``error: `` line holding every one of ``words``; return that line."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


@pytest.fixture(scope="module")
def env(tiny_full_vocab, sim_file, tmp_path_factory):
    """{"model", "data", "ledger", "root"}: the full-vocabulary tiny model, the simulated data, a ledger with one
    earlier charge, and a directory for the module's runs."""
    from experiments.lib.budget import Ledger

    root = tmp_path_factory.mktemp("rundir")
    ledger = root / "ledger.jsonl"
    Ledger(ledger).charge("earlier", 12345, "train")
    return {"model": tiny_full_vocab, "data": sim_file, "ledger": ledger, "root": root}


def common(env, out) -> list[str]:
    """Options every stage run of ``env`` takes: a 2-trajectory float32 CPU forecast into ``out``, no plots."""
    return ["--model", str(env["model"]), "--data", str(env["data"]), "--ledger", str(env["ledger"]),
            "--out", str(out), "--device", "cpu", "--precision", "float32", "--limit", "2", "--context-steps", "8",
            "--horizon", "3", "--plots", "0"]


def baseline_args(env, out) -> list[str]:
    """experiments.baseline options of a small run of ``env`` into ``out``."""
    return common(env, out) + ["--gen-batch-size", "2", "--loss-limit", "0"]


def lora_args(env, out) -> list[str]:
    """experiments.lora_default options of a small run of ``env`` into ``out`` (add --max-steps)."""
    return common(env, out) + ["--gen-batch-size", "2", "--batch-size", "2", "--context-length", "48",
                               "--eval-batches", "1", "--eval-every", "0", "--checkpoint-every", "1",
                               "--no-progress"]


@pytest.fixture(scope="module")
def baseline_run(env):
    """A finished baseline run directory (read only: copy it to change it)."""
    from experiments import baseline

    out = env["root"] / "baseline_run"
    assert baseline.main(baseline_args(env, out)) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(env):
    """A lora_default run of 2 steps (read only: copy it to change it)."""
    from experiments import lora_default

    out = env["root"] / "lora_run"
    assert lora_default.main(lora_args(env, out) + ["--max-steps", "2"]) == 0
    return out


def fake_run(path: Path, stage: str, legacy: bool) -> Path:
    """A run directory of ``stage``: with a run record, or (``legacy``) as runs were before them."""
    import json

    from experiments.lib.run_directory import RECORD

    path.mkdir(parents=True)
    selection = {"chosen": {"lr": 1e-3, "rank": 2, "context_length": 48}}
    (path / "results.json").write_text(json.dumps({"stage": stage, "settings": {}, "weights": "w",
                                                   "details": {"selection": selection}}) + "\n")
    (path / "untrained.json").write_text('{"settings": {}, "untrained": {}}\n')
    (path / "README.md").write_text(f"# {stage}\n")
    (path / "training").mkdir()
    (path / "training" / "log.jsonl").write_text("")
    if not legacy:
        (path / RECORD).write_text(json.dumps({"made_by": "miniqwen", "stage": stage, "weights": None}) + "\n")
    return path


def user_dir(root, files: dict):
    """A directory of the user's files ({relative path: text})."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root
