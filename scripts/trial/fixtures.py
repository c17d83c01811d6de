"""Fixture builders for the issue-35 re-trial harness: run INSIDE the repository's venv
(`<repo>/.venv/bin/python scripts/trial/fixtures.py <kind> <dest> ...`) so that transformers/torch/h5py are the repo's."""

import json
import os
import shutil
import sys
from pathlib import Path

TOKENIZER = Path(os.environ.get("MINIQWEN_TRIAL_TOKENIZER") or
                 Path(__file__).resolve().parents[3] / "shared" / "models" / "qwen2.5-tokenizer")


def tiny_model(dest: Path, seed: int = 0) -> None:
    """As tests/conftest.py write_tiny_checkpoint + tiny_full_vocab: a 2-layer random Qwen2 with the real vocabulary,
    saved by transformers (safetensors), tokenizer.json copied from the shared Qwen2.5 tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    (dest / "tokenizer.json").write_bytes((TOKENIZER / "tokenizer.json").read_bytes())


def sim_data(dest: Path, n_systems: int = 40, n_steps: int = 30, seed: int = 1) -> None:
    from data.simulate import simulate, write_h5

    traj, time = simulate(n_systems=n_systems, n_steps=n_steps, t_max=60.0, seed=seed)
    write_h5(dest, traj, time)


def chunks(dest: Path, n: int = 6, width: int = 16, seed: int = 2) -> None:
    import torch
    from data.chunks import make_chunks
    from experiments.train import save_chunks

    g = torch.Generator().manual_seed(seed)
    save_chunks(make_chunks([torch.randint(1, 1000, (40,), generator=g).tolist() for _ in range(n)], width), dest)


#: damaged config.json files: the fields each kind sets
CONFIG_EDITS = {
    "config_wrong_hidden": {"hidden_size": 64},
    "config_zero_layers": {"num_hidden_layers": 0},
    "config_negative_heads": {"num_attention_heads": -4},
    "config_heads_not_dividing": {"num_key_value_heads": 3},
    "config_nan_eps": {"rms_norm_eps": float("nan")},
    "config_vocab_smaller": {"vocab_size": 128},
    "config_huge_positions": {"max_position_embeddings": 10 ** 30},
    "config_model_type": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
}


def damage_model(src: Path, dest: Path, how: str) -> None:
    """Copy the model at ``src`` to ``dest`` and damage it ``how``."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    st = dest / "model.safetensors"
    if how in ("missing_key", "wrong_shape", "nan_tensor", "inf_tensor", "extra_key", "int_tensor"):
        t = load_file(str(st))
        key = "model.layers.0.self_attn.q_proj.weight"
        if how == "missing_key":
            del t[key]
        elif how == "wrong_shape":
            t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
        elif how == "nan_tensor":
            t[key] = torch.full_like(t[key], float("nan"))
        elif how == "inf_tensor":
            t[key] = t[key].clone()
            t[key][0, 0] = float("inf")
        elif how == "extra_key":
            t["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2, 2)
        elif how == "int_tensor":
            t[key] = t[key].to(torch.int32)
        save_file(t, str(st), metadata={"format": "pt"})
    elif how == "truncated_safetensors":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif how == "empty_safetensors":
        st.write_bytes(b"")
    elif how == "no_safetensors":
        st.unlink()
    elif how == "no_tokenizer":
        (dest / "tokenizer.json").unlink()
    elif how == "tokenizer_garbage":
        (dest / "tokenizer.json").write_text("{not json")
    elif how == "config_garbage":
        (dest / "config.json").write_text("this is not json {")
    elif how == "config_empty":
        (dest / "config.json").write_text("")
    elif how == "config_list":
        (dest / "config.json").write_text("[1, 2, 3]\n")
    elif how == "no_config":
        (dest / "config.json").unlink()
    elif how in CONFIG_EDITS:
        c = json.loads((dest / "config.json").read_text())
        c.update(CONFIG_EDITS[how])
        (dest / "config.json").write_text(json.dumps(c))
    else:
        raise SystemExit(f"unknown model damage {how}")


def damage_data(src: Path, dest: Path, how: str) -> None:
    import h5py
    import numpy as np

    if how == "truncated":
        data = src.read_bytes()
        dest.write_bytes(data[: len(data) // 2])
        return
    if how == "empty_file":
        dest.write_bytes(b"")
        return
    if how == "not_hdf5":
        dest.write_text("prey,predator\n1,2\n")
        return
    with h5py.File(src, "r") as f:
        traj = f["trajectories"][()]
        time = f["time"][()]
    attrs = {}
    if how == "nan_values":
        traj = traj.copy()
        traj[3, 5, 0] = np.nan
    elif how == "all_nan":
        traj = np.full_like(traj, np.nan)
    elif how == "inf_values":
        traj = traj.copy()
        traj[35, 4, 1] = np.inf
    elif how == "negative_values":
        traj = traj.copy()
        traj[0, 2, 0] = -5.0
    elif how == "wrong_shape_3species":
        traj = np.concatenate([traj, traj[..., :1]], axis=-1)
    elif how == "wrong_shape_2d":
        traj = traj[..., 0]
    elif how == "time_mismatch":
        time = time[:-3]
    elif how == "time_decreasing":
        time = time[::-1].copy()
    elif how == "one_system":
        traj = traj[:1]
    elif how == "few_steps":
        traj, time = traj[:, :3], time[:3]
    elif how == "zero_systems":
        traj = traj[:0]
    elif how == "all_zero":
        traj = np.zeros_like(traj)
    elif how == "huge_values":
        traj = traj * 1e30
    elif how == "int_dtype":
        traj = (traj * 100).astype(np.int64)
    elif how == "string_dtype":
        traj = np.array([["x"]], dtype="S1")
    elif how == "no_time":
        time = None
    elif how == "no_trajectories":
        traj = None
    else:
        raise SystemExit(f"unknown data damage {how}")
    with h5py.File(dest, "w") as f:
        if traj is not None:
            f.create_dataset("trajectories", data=traj)
        if time is not None:
            f.create_dataset("time", data=time)
        for k, v in attrs.items():
            f.attrs[k] = v


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "model":
        tiny_model(Path(sys.argv[2]), *map(int, sys.argv[3:4]))
    elif kind == "data":
        sim_data(Path(sys.argv[2]), *map(int, sys.argv[3:6]))
    elif kind == "chunks":
        chunks(Path(sys.argv[2]), *map(int, sys.argv[3:6]))
    elif kind == "damage_model":
        damage_model(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    elif kind == "damage_data":
        damage_data(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f"unknown fixture {kind}")
