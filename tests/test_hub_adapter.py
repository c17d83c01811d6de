"""A Hub-ready adapter: a training stage exports ``peft_adapter/`` with a README.md model card (YAML front matter,
format, decoding, usage) and a Hub id as ``base_model_name_or_path``, so that
``peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` loads it from an offline Hugging Face cache, and the
card's own snippet forecasts with it. Also: the rule that turns ``--model`` into that Hub id."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_TOKENIZER, toy_lora_argv
from experiments.lib.adapter_card import (CARD_FILE, DEFAULT_HUB_ID, README_FILE, AdapterCard, hub_model_id,
                                          model_card)
from test_hub_cache import lay_out_hf_cache, offline_cache  # noqa: F401  (a fixture)

REVISION = "0123456789abcdef0123456789abcdef01234567"
FRONT_MATTER_KEYS = {"base_model", "library_name", "license", "tags"}


def front_matter(readme: str) -> dict:
    """The YAML front matter of a model card as ``{key: value or [list items]}`` (the flat subset cards use)."""
    match = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    assert match, readme[:200]
    out, key = {}, None
    for line in match.group(1).splitlines():
        if line.startswith("- "):
            out[key].append(line[2:])
        else:
            key, _, value = line.partition(":")
            out[key] = json.loads(value) if value.strip().startswith('"') else (value.strip() or [])
    return out


def python_block(readme: str) -> str:
    """The first ```python block of a model card."""
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_hub_model_id_keeps_a_hub_id_and_maps_a_local_qwen25_05b_directory_to_the_official_one(tmp_path):
    assert hub_model_id(DEFAULT_HUB_ID) == DEFAULT_HUB_ID and hub_model_id("someone/other-model") == \
        "someone/other-model" and hub_model_id(None) is None
    coder = tmp_path / "qwen2.5-coder-0.5b-instruct"  # the offline build: Qwen2.5 0.5B architecture, other weights
    coder.mkdir()
    (coder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                                                   "num_key_value_heads": 2, "vocab_size": 151936}))
    assert hub_model_id(coder) == DEFAULT_HUB_ID
    other = tmp_path / "tiny"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 3,
                                                   "num_key_value_heads": 2}))
    assert hub_model_id(other) == str(other)  # no known architecture: the path, as PEFT records it
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-Coder-0.5B-Instruct" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    assert hub_model_id(snapshot) == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@pytest.mark.parametrize("encoding,scaling,prompt", [("decimal", "dataset", "raw"), ("integer", "series", "chat")])
def test_model_card_says_format_scale_decoding_and_metrics(encoding, scaling, prompt):
    fit = {"data": "lotka_volterra_data.h5", "split": "train", "quantile": 0.99, "target": 10.0}
    if scaling == "series":
        fit.update(scaling="series", beta=0.3, fit_steps=80)
    weights = "Qwen2.5-Coder-0.5B-Instruct (dequantized)"
    card = AdapterCard(0.59954, 2, encoding, prompt, weights, None, fit)
    text = model_card(card, DEFAULT_HUB_ID, {"rank": 8, "alpha": 8, "targets": ["q_proj", "v_proj"]},
                      {"R² prey": 0.9686, "R² predator": 0.8993}, "the test split (100 trajectories)")
    meta = front_matter(text)
    assert FRONT_MATTER_KEYS <= meta.keys()
    assert meta["base_model"] == DEFAULT_HUB_ID and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"lora", "time-series", "llmtime", "lotka-volterra"} <= set(meta["tags"])
    assert weights in text and "| R² prey | 0.969 |" in text and "training split of `lotka_volterra_data.h5`" in text
    assert ("`.`, `,` and `;`" in text) == (encoding == "decimal") and "rank 8, alpha 8, on q_proj, v_proj" in text
    assert ("per series" in text and "0.3" in text) if scaling == "series" else "α = 0.59954" in text
    compile(python_block(text), "README.md", "exec")  # the snippet is Python
    no_metrics = model_card(card, "./some/dir", None)
    assert "base_model" not in front_matter(no_metrics) and "## Results" not in no_metrics


def test_a_stage_exports_an_adapter_that_autopeft_loads_from_an_offline_hub_cache(tiny_full_vocab, tmp_path,
                                                                                    offline_cache):  # noqa: F811
    """lora_default on the tiny model cached under the official Hub id: the export names that id, its card has the
    front matter, and a fresh process with nothing but HF_HUB_CACHE + HF_HUB_OFFLINE=1 loads the adapter with
    AutoPeftModelForCausalLM (the exported LoRA tensors, every one) and runs the card's forecasting snippet."""
    pytest.importorskip("peft")
    from experiments import lora_default

    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_full_vocab, model_dir)
    if (SHARED_TOKENIZER / "tokenizer_config.json").is_file():  # what AutoTokenizer reads beside tokenizer.json
        shutil.copy(SHARED_TOKENIZER / "tokenizer_config.json", model_dir)
    lay_out_hf_cache(model_dir, offline_cache, DEFAULT_HUB_ID, REVISION)
    argv = toy_lora_argv(DEFAULT_HUB_ID, tmp_path, "1e-2", "--precision", "float32")
    assert lora_default.main(argv) == 0
    adapter = tmp_path / "run" / "peft_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_HUB_ID
    assert json.loads((adapter / CARD_FILE).read_text())["base_model"] == DEFAULT_HUB_ID  # the weights' label
    readme = (adapter / README_FILE).read_text()
    assert FRONT_MATTER_KEYS <= front_matter(readme).keys() and front_matter(readme)["base_model"] == DEFAULT_HUB_ID

    snippet = python_block(readme).replace("adapter = 'peft_adapter'", f"adapter = {str(adapter)!r}")
    code = ("import sys, torch\nfrom peft import AutoPeftModelForCausalLM, get_peft_model_state_dict\n"
            "from safetensors.torch import load_file\n"
            "peft_model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "theirs = get_peft_model_state_dict(peft_model)\n"
            "ours = load_file(sys.argv[1] + '/adapter_model.safetensors')\n"
            "assert theirs.keys() == ours.keys(), (sorted(theirs)[:3], sorted(ours)[:3])\n"
            "assert all(torch.equal(theirs[k], ours[k].to(theirs[k].dtype)) for k in ours)\n"
            "print('loaded', len(ours))\n" + snippet + "\nprint('forecast', forecast.shape)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(offline_cache.parent), HF_HUB_CACHE=str(offline_cache), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code, str(adapter)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forecast (20, 2)" in done.stdout and "loaded " in done.stdout, done.stdout
