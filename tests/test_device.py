"""Device and precision where users run: the choice logic with the capability queries stubbed (so it is tested on
every machine), float16 on the tiny model (finite activations, training with a gradient scaler, the float32
fallback message), and the same on real hardware where it is present (skipped elsewhere)."""

import json

import pytest
import torch

from data.chunks import make_chunks
from experiments.lib.session import resolve_precision
from experiments.lib.settings import LoRASettings, RunSettings, TrainSettings
from experiments.lib.cli import parse, parser
from experiments.lib.errors import OptionError, UsageError
from experiments.lib.training import read_log, train_lora as train_loop
from miniqwen import device as mdevice
from miniqwen import load_pretrained
from miniqwen.model import Qwen2ForCausalLM

CUDA = torch.cuda.is_available()
MPS = mdevice.mps_available()


# ---------------------------------------------------------------------------------- stubbed capability queries


def stub_hardware(monkeypatch, cuda=False, capability=None, mps=False, mps_bf16=False, cpu_bf16=False):
    """Make this machine look like another: CUDA present or not (with ``capability``), MPS present or not (with or
    without bf16), a CPU with or without native bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    def get_capability(device=None):
        if capability is None:
            raise AssertionError("Torch not compiled with CUDA enabled")
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(mdevice, "mps_supports_bf16", lambda: mps and mps_bf16)
    monkeypatch.setattr(mdevice, "cpu_supports_bf16", lambda: cpu_bf16)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    stub_hardware(monkeypatch, cuda=cuda, mps=mps)
    assert mdevice.resolve_device() == torch.device(expected)
    assert mdevice.resolve_device("auto") == torch.device(expected)
    assert mdevice.resolve_device("cpu") == torch.device("cpu")  # an explicit device is taken as given
    assert mdevice.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError):
        mdevice.resolve_device("not-a-device")


@pytest.mark.parametrize("capability, gpu, expected", [
    ((9, 0), "H100", torch.bfloat16), ((8, 0), "A100", torch.bfloat16), ((8, 6), "RTX 3090", torch.bfloat16),
    ((7, 5), "T4", torch.float16), ((7, 0), "V100", torch.float16), ((6, 1), "GTX 1080", torch.float16),
])
def test_auto_precision_on_cuda_follows_compute_capability(monkeypatch, capability, gpu, expected):
    stub_hardware(monkeypatch, cuda=True, capability=capability)
    assert mdevice.cuda_supports_bf16("cuda") is (expected == torch.bfloat16), gpu
    assert mdevice.default_compute_dtype("cuda") == expected, gpu
    assert mdevice.default_compute_dtype(torch.device("cuda", 0)) == expected, gpu
    assert resolve_precision("auto", torch.device("cuda")) == str(expected).removeprefix("torch."), gpu
    for explicit in ("float32", "bfloat16", "float16"):  # an explicit precision is never second-guessed
        assert resolve_precision(explicit, torch.device("cuda")) == explicit


def test_auto_precision_on_cuda_of_unknown_capability_is_bf16(monkeypatch):
    stub_hardware(monkeypatch, capability=None)  # torch without CUDA: nothing to ask, the modern case assumed
    assert mdevice.default_compute_dtype("cuda") == torch.bfloat16


@pytest.mark.parametrize("mps_bf16", [False, True])
def test_auto_precision_on_mps_is_float16(monkeypatch, mps_bf16):
    stub_hardware(monkeypatch, mps=True, mps_bf16=mps_bf16)
    assert mdevice.default_compute_dtype("mps") == torch.float16
    assert resolve_precision("auto", torch.device("mps")) == "float16"


@pytest.mark.parametrize("cpu_bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_on_cpu_keeps_its_rule(monkeypatch, cpu_bf16, expected):
    stub_hardware(monkeypatch, cuda=True, capability=(7, 5), mps=True, cpu_bf16=cpu_bf16)  # other devices: no say
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert mdevice.default_compute_dtype("meta") == torch.float32


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_bf16_on_a_cpu_without_it_is_flagged_as_emulated(monkeypatch, cpu_bf16):
    """Asking for bfloat16 where the CPU has no bf16 instructions runs, with a one-line warning; nothing else is
    flagged."""
    monkeypatch.setattr(mdevice, "cpu_supports_bf16", lambda: cpu_bf16)
    warning = mdevice.emulated_precision("cpu", "bfloat16")
    assert (warning is None) == cpu_bf16
    if warning:
        assert "emulated" in warning and "\n" not in warning
    assert mdevice.emulated_precision("cpu", "float32") is None
    assert mdevice.emulated_precision("meta", "bfloat16") is None


def test_mps_bf16_is_what_torch_reports(monkeypatch):
    probe = mdevice.mps_supports_bf16.__wrapped__  # the uncached function
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert probe() is False
    if not MPS:  # "available", but making a bf16 tensor there fails (as on macOS 13): not supported
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        assert probe() is False


def test_run_settings_accept_auto_mps_and_refuse_what_is_absent(monkeypatch):
    stub_hardware(monkeypatch, cuda=False, mps=False)
    RunSettings().validate()  # device None: auto
    RunSettings(device="auto").validate()
    RunSettings(device="cpu", precision="float16").validate()
    for device, words in (("mps", "MPS"), ("cuda", "CUDA"), ("cuda:1", "CUDA"), ("tpu", "mps"),
                          ("nonsense", "auto, cpu, cuda, cuda:N or mps")):
        with pytest.raises(OptionError, match=words) as info:
            RunSettings(device=device).validate()
        assert info.value.field == "device"
    stub_hardware(monkeypatch, cuda=False, mps=True, mps_bf16=False)
    for precision in ("auto", "float16", "float32"):
        RunSettings(device="mps", precision=precision).validate()
        RunSettings(device="auto", precision=precision).validate()
    with pytest.raises(OptionError, match="no bfloat16 on MPS") as info:
        RunSettings(device="mps", precision="bfloat16").validate()
    assert info.value.field == "precision"
    with pytest.raises(OptionError, match="no bfloat16 on MPS"):  # auto resolves to mps here
        RunSettings(precision="bfloat16").validate()
    RunSettings(device="cpu", precision="bfloat16").validate()
    stub_hardware(monkeypatch, cuda=False, mps=True, mps_bf16=True)
    RunSettings(device="mps", precision="bfloat16").validate()


def test_command_line_device_errors_are_one_line(monkeypatch):
    stub_hardware(monkeypatch, cuda=False, mps=False)
    p = parser("experiments.test", "test", "run")
    assert parse(p, ["--device", "auto"])["run"].device == "auto"
    assert parse(p, [])["run"].device is None  # the default: auto
    for argv, words in ((["--device", "mps"], "--device 'mps': MPS"), (["--device", "cuda"], "--device 'cuda': CUDA")):
        with pytest.raises(UsageError) as info:
            parse(p, argv)
        assert str(info.value).startswith(words) and "\n" not in str(info.value)
    help_text = " ".join(p.format_help().split())
    assert "mps (Apple silicon)" in help_text and "float16 on older CUDA GPUs (T4, V100)" in help_text


# ---------------------------------------------------------------------------------- float16 on the tiny model


def module_outputs(model: Qwen2ForCausalLM, ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """Every module's output tensor(s) from one forward of ``ids``, by module name."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        def hook(mod, args, out, name=name):
            for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    seen[f"{name or 'model'}[{i}]"] = t.detach()
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def assert_float16_finite(model_dir, device, vocab, seq=48):
    """Load ``model_dir`` in float16 on ``device``, check every module's output is float16 and finite, and that
    the logits follow float32's."""
    half, _ = load_pretrained(model_dir, dtype="float16", device=device)
    full, _ = load_pretrained(model_dir, dtype="float32", device=device)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    outputs = module_outputs(half, ids)
    assert outputs and "model[0]" in outputs
    for name, t in outputs.items():
        assert t.dtype == torch.float16, name
        assert bool(torch.isfinite(t).all()), f"{name}: non-finite activations in float16 (fall back to float32)"
    with torch.no_grad():
        want = full(ids).float()
        got = half(ids).float()
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale + 1e-3


def test_tiny_qwen2_activations_stay_finite_in_float16_on_cpu(tiny_dir):
    assert_float16_finite(tiny_dir, "cpu", vocab=128)


def tiny_chunks(n=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 128, (length + 1,), generator=g).tolist() for _ in range(n)]
    return make_chunks(seqs, length)


def settings(**overrides):
    base = dict(lr=1e-2, batch_size=2, context_length=16, max_steps=6, eval_every=3, eval_batches=1,
                checkpoint_every=3, progress=False)
    base.update(overrides)
    return TrainSettings(**base)


def run_training(model_dir, out, precision, device="cpu", resume=False, **overrides):
    model, _ = load_pretrained(model_dir, dtype=precision, device=device)
    chunks = tiny_chunks()
    summary = train_loop(model, chunks, chunks, settings(**overrides), out, lora=LoRASettings(rank=4),
                         stage="test", precision=precision, resume=resume)
    return model, summary


def test_float16_training_uses_a_gradient_scaler_and_resumes(tmp_path, tiny_dir):
    model, summary = run_training(tiny_dir, tmp_path / "run", "float16")
    losses = [e["loss"] for e in read_log(tmp_path / "run" / "log.jsonl") if e["kind"] == "train"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())  # the trained matrices stay float32
    assert any(p.dtype == torch.float16 for n, p in model.named_parameters() if "lora_" not in n)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    scaler = state["grad_scaler"]
    assert scaler["scale"] > 0 and scaler["skipped_steps"] >= 0
    # stopped at step 3 and resumed (the scaler's state comes back from the checkpoint): the same adapter
    run_training(tiny_dir, tmp_path / "half", "float16", max_steps=3)
    resumed, _ = run_training(tiny_dir, tmp_path / "half", "float16", resume=True)
    again = dict(resumed.named_parameters())
    assert all(torch.equal(p, again[n]) for n, p in lora.items())


def test_float16_step_skipped_on_overflowing_gradients_is_counted(tmp_path, tiny_dir, monkeypatch):
    """A scale so large that the first scaled gradients overflow float16: that step is skipped (AdamW does not
    move), the scale backs off, and the skip is recorded beside the scaler's state."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0 ** 40))
    model, summary = run_training(tiny_dir, tmp_path / "run", "float16", max_steps=3, eval_every=0)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["grad_scaler"]["skipped_steps"] >= 1
    assert state["grad_scaler"]["scale"] < 2.0 ** 40
    # resumed after the skips (their count comes back with the scale): the uninterrupted run's adapter
    resumed, _ = run_training(tiny_dir, tmp_path / "run", "float16", max_steps=6, eval_every=0, resume=True)
    whole, _ = run_training(tiny_dir, tmp_path / "whole", "float16", max_steps=6, eval_every=0)
    again = dict(resumed.named_parameters())
    assert all(torch.equal(p, again[n]) for n, p in whole.named_parameters() if "lora_" in n)


def test_float32_and_bf16_training_have_no_scaler(tmp_path, tiny_dir):
    for precision in ("float32", "bfloat16"):
        run_training(tiny_dir, tmp_path / precision, precision, max_steps=2, checkpoint_every=2, eval_every=0)
        state = json.loads((tmp_path / precision / "checkpoint" / "state.json").read_text())
        assert "grad_scaler" not in state, precision


def test_float16_overflow_stops_training_with_the_float32_advice(tmp_path, tiny_dir):
    model, _ = load_pretrained(tiny_dir, dtype="float16", device="cpu")
    with torch.no_grad():
        model.model.norm.weight.fill_(6e4)  # the final norm's output now exceeds float16's range
    chunks = tiny_chunks()
    with pytest.raises(UsageError) as info:
        train_loop(model, chunks, None, settings(max_steps=2), tmp_path / "run", lora=LoRASettings(rank=4),
                   stage="test", precision="float16")
    message = str(info.value)
    assert "\n" not in message and "float16 overflowed" in message and "--precision float32" in message
    assert "step 1" in message


# ---------------------------------------------------------------------------------- on real hardware


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")
def test_cuda_auto_precision_matches_the_gpu_and_float16_stays_finite(tiny_dir, tmp_path):
    major, minor = torch.cuda.get_device_capability()
    expected = "bfloat16" if (major, minor) >= (8, 0) else "float16"
    assert resolve_precision("auto", mdevice.resolve_device("auto")) == expected
    assert_float16_finite(tiny_dir, "cuda", vocab=128)
    for precision in ("float16", "bfloat16"):
        _, summary = run_training(tiny_dir, tmp_path / precision, precision, device="cuda", max_steps=4)
        assert summary["steps"] == 4 and summary["last_train_loss"] == summary["last_train_loss"]  # not NaN


@pytest.mark.skipif(not MPS, reason="no Apple silicon GPU (MPS) here")
def test_mps_float16_stays_finite_and_trains(tiny_dir, tmp_path):
    assert resolve_precision("auto", torch.device("mps")) == "float16"
    assert_float16_finite(tiny_dir, "mps", vocab=128)
    _, summary = run_training(tiny_dir, tmp_path / "run", "float16", device="mps", max_steps=4)
    assert summary["steps"] == 4


def test_real_qwen2_5_activations_stay_finite_in_float16(real_model_dir):
    """The real weights (MINIQWEN_TEST_MODEL; skipped when unset) on the best device here."""
    assert_float16_finite(real_model_dir, mdevice.resolve_device("auto"), vocab=32000, seq=64)
