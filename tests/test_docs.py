"""docs/model.md stays true: its Python blocks run, in order, as one script, and its FLOP tables and figures are the
counter's closed form for Qwen2.5-0.5B.

Blocks fenced ```` ```python ```` form that script. The block fenced ```` ```python real-weights ```` (the guide's last)
stands alone: it runs on the real weights when ``MINIQWEN_TEST_MODEL`` names them (skipped, with that reason,
otherwise), and on a tiny random checkpoint always, so its code cannot rot while the weights are absent.

docs/lora_run.md, the route through one LoRA run, names only functions and classes that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from miniqwen.config import Qwen2Config
from miniqwen.flop_count import COMPONENTS, forward_flops_breakdown

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "model.md"


REAL_WEIGHTS = "python real-weights"


def python_blocks(text: str, info: str = "python") -> list[str]:
    """The bodies of the code blocks whose fence's info string is exactly ``info``."""
    return re.findall(rf"^```{re.escape(info)}\n(.*?)^```$", text, flags=re.S | re.M)


def run_blocks(blocks: list[str], tmp_path: Path, **env: str) -> str:
    """Run ``blocks`` as one script from the repository root (``env`` added to the environment); its stdout."""
    script = tmp_path / "guide.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table as its rows of cells (header and separator rows included)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def number(cell: str) -> int:
    return int(cell.strip("*").replace(",", ""))


def test_the_guides_code_runs(tmp_path):
    blocks = python_blocks(GUIDE.read_text())
    assert len(blocks) >= 5
    run_blocks(blocks, tmp_path)


def real_weight_block() -> list[str]:
    text = GUIDE.read_text()
    blocks = python_blocks(text, REAL_WEIGHTS)
    assert len(blocks) == 1, f"docs/model.md needs exactly one ```{REAL_WEIGHTS} block, found {len(blocks)}"
    assert text.rstrip().endswith(blocks[0] + "```"), "the real-weight block must end the guide"
    return blocks


def test_the_guides_real_weight_block_matches_transformers(real_model_dir, tmp_path):
    """The guide's last block on the real weights (``MINIQWEN_TEST_MODEL``): our logits are transformers'."""
    pytest.importorskip("transformers")
    out = run_blocks(real_weight_block(), tmp_path, MINIQWEN_TEST_MODEL=str(real_model_dir))
    assert "largest logit difference" in out


def test_the_guides_real_weight_block_runs_on_a_tiny_checkpoint(tiny_full_vocab, tmp_path):
    """The same block on a tiny random checkpoint with the real tokenizer, so it runs without the weights too."""
    pytest.importorskip("transformers")
    out = run_blocks(real_weight_block(), tmp_path, MINIQWEN_TEST_MODEL=str(tiny_full_vocab))
    assert "largest logit difference" in out


def test_the_guides_flop_tables_are_the_closed_form():
    text = GUIDE.read_text()
    cfg = Qwen2Config()  # Qwen2.5-0.5B
    L, d, N = cfg.num_hidden_layers, cfg.hidden_size, 512
    closed = forward_flops_breakdown(cfg, 1, N)
    final_norm = N * (4 * d + 11)
    by_header = {rows[0][-1]: rows[2:] for rows in tables(text)}
    per_layer = by_header["FLOPs per layer (B = 1, T = 512)"]
    whole = by_header["FLOPs, whole model (B = 1, T = 512)"]

    layer_total = 0
    for step, component, flops in per_layer[:-1]:
        name = component.strip("`")
        want = (closed[name] - (final_norm if name == "norm" else 0)) // L
        assert number(flops) == want, (step, flops, want)
        layer_total += number(flops)
    assert {row[1].strip("`") for row in per_layer[:-1]} == {n for n in COMPONENTS if closed[n]} - {"lm_head"}
    assert number(per_layer[-1][-1]) == layer_total

    rows = {row[0]: number(row[-1]) for row in whole}
    assert rows["embedding lookup"] == closed["embedding"] == 0
    assert rows["24 decoder layers"] == L * layer_total
    assert rows["final RMSNorm"] == final_norm
    assert rows["lm_head, all 512 positions"] == closed["lm_head"]
    assert rows["**forward pass**"] == sum(closed.values()) == L * layer_total + final_norm + closed["lm_head"]

    prefill = sum(forward_flops_breakdown(cfg, 1, N, logits_to_keep=1).values())
    step = sum(forward_flops_breakdown(cfg, 1, 1, cache_len=N - 1).values())
    for figure in (prefill, step):
        assert f"{figure:,}" in text
    assert step * N == sum(closed.values())  # "the same per token as the full pass"


RUN_GUIDE = ROOT / "docs" / "lora_run.md"
PACKAGES = ("experiments", "miniqwen", "lora", "data")


def resolve(dotted: str):
    """The module, class, function or method a dotted name such as ``experiments.lib.runs.run_lora`` names."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_lora_run_guide_names_only_what_exists():
    """Every ``package.module.name`` docs/lora_run.md names in backticks is there to open (the guide cannot rot)."""
    names = {n for n in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", RUN_GUIDE.read_text()) if n.startswith(PACKAGES)}
    assert len(names) > 40
    missing, classes = [], {}
    for name in sorted(names):
        try:
            obj = resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
            continue
        if isinstance(obj, type):
            classes[obj.__name__] = obj
    # ``Trainer.update``: a method of a class the guide names in full
    for cls, attr in re.findall(r"`([A-Z][A-Za-z]+)\.([a-z_]+)`", RUN_GUIDE.read_text()):
        if not hasattr(classes.get(cls), attr):
            missing.append(f"{cls}.{attr}")
    assert not missing, missing
