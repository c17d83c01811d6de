"""The Hub path: a model given by repo id loads from a pre-filled Hugging Face cache with ``HF_HUB_OFFLINE=1``
(what a user without Hub access, or a cluster node without a network, relies on), and an id that is neither cached
nor reachable is a one-line WeightsError naming it, not a traceback."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_tiny_checkpoint
from miniqwen import WeightsError, load_pretrained
from miniqwen.loading import resolve_model_dir

REPO_ID = "tiny-org/tiny-qwen2"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the Hub names snapshots
ABSENT_ID = "nobody-org/no-such-model"


def lay_out_hf_cache(model_dir, cache, repo_id: str, revision: str):
    """Put the files of ``model_dir`` into the Hugging Face cache ``cache`` as a download leaves them:
    ``models--org--name/blobs/<hash>`` holding the bytes, ``snapshots/<revision>/<file>`` relative links to them
    (copies where the file system has no links), ``refs/main`` holding ``revision``. Returns the snapshot folder."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    for folder in (root / "blobs", root / "refs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        try:
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        except OSError:
            shutil.copyfile(blob, snapshot / file.name)
    (root / "refs" / "main").write_text(revision)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def untied_tiny_dir(tmp_path_factory):
    """A tiny model with an untied output head (conftest's ``untied_tiny_dir`` ties it)."""
    path = tmp_path_factory.mktemp("tiny-hub")
    write_tiny_checkpoint(path, tie=False)
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache under ``tmp_path`` with the Hub switched off: ``HF_HOME``, ``HF_HUB_CACHE`` and
    ``HF_HUB_OFFLINE=1`` in the environment, and in ``huggingface_hub.constants`` too, since huggingface_hub reads
    these variables once, when it is imported (a fresh process needs only the environment: see below)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", home), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_loads_from_the_offline_cache_like_the_directory(untied_tiny_dir, offline_cache):
    snapshot = lay_out_hf_cache(untied_tiny_dir, offline_cache, REPO_ID, REVISION)
    assert resolve_model_dir(REPO_ID).resolve() == snapshot.resolve()
    by_id, tokenizer_by_id = load_pretrained(REPO_ID, dtype="float32", device="cpu")
    by_dir, tokenizer_by_dir = load_pretrained(untied_tiny_dir, dtype="float32", device="cpu")
    by_id_state, by_dir_state = by_id.state_dict(), by_dir.state_dict()
    assert by_id_state.keys() == by_dir_state.keys()
    assert all(torch.equal(by_id_state[k], by_dir_state[k]) for k in by_dir_state)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_id(ids), by_dir(ids))
    assert tokenizer_by_id.encode("1.23,4.56;") == tokenizer_by_dir.encode("1.23,4.56;")


def test_repo_id_follows_refs_main_to_its_snapshot(untied_tiny_dir, offline_cache):
    """Two snapshots in the cache: ``refs/main`` decides which one an id means."""
    old = lay_out_hf_cache(untied_tiny_dir, offline_cache, REPO_ID, "f" * 40)
    new = lay_out_hf_cache(untied_tiny_dir, offline_cache, REPO_ID, REVISION)
    assert resolve_model_dir(REPO_ID).resolve() == new.resolve()
    (offline_cache / ("models--" + REPO_ID.replace("/", "--")) / "refs" / "main").write_text("f" * 40)
    assert resolve_model_dir(REPO_ID).resolve() == old.resolve()


def one_line_error(message: str, repo_id: str, cache) -> None:
    assert "\n" not in message, message
    assert repr(repo_id) in message and "HF_HUB_OFFLINE=1" in message and str(cache) in message, message
    assert "--model DIR" in message, message


def test_uncached_id_offline_is_a_one_line_weights_error(untied_tiny_dir, offline_cache, capsys):
    lay_out_hf_cache(untied_tiny_dir, offline_cache, REPO_ID, REVISION)  # another model is cached: it does not count
    with pytest.raises(WeightsError) as info:
        load_pretrained(ABSENT_ID, device="cpu")
    one_line_error(str(info.value), ABSENT_ID, offline_cache)
    # through a stage's command-line wrapper: one line on stderr and exit status 2, no traceback
    from experiments.lib.cli import run_cli

    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: load_pretrained(ABSENT_ID, device="cpu"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    one_line_error(err.strip(), ABSENT_ID, offline_cache)


def test_a_fresh_process_honours_the_environment_alone(untied_tiny_dir, tmp_path):
    """What a user does by hand: set HF_HUB_CACHE and HF_HUB_OFFLINE=1, then load by id (no patched constants)."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snapshot = lay_out_hf_cache(untied_tiny_dir, cache, REPO_ID, REVISION)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    code = ("import sys; from miniqwen.loading import resolve_model_dir; from miniqwen import WeightsError\n"
            "print(resolve_model_dir(sys.argv[1]))\n"
            "try:\n    resolve_model_dir(sys.argv[2])\nexcept WeightsError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code, REPO_ID, ABSENT_ID], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found, error = done.stdout.splitlines()
    assert Path(found).resolve() == snapshot.resolve()
    one_line_error(error, ABSENT_ID, cache)
