"""The CUDA path on tiny models (skipped without a CUDA GPU): parity with transformers on the GPU in float32 and
bf16; the GPU against the CPU (logits, KV-cached constrained greedy tokens, FLOP counts); merged-adapter forecasts;
LoRA training and its exact resume; ``--compile``; and the search run end to end with ``--device cuda``. What ran
where, and when, is in docs/scale-out.md."""

import copy
import json

import pytest
import torch

from experiments import search
from experiments.lib import halving
from experiments.lib.budget import Ledger
from lora import apply_lora, merged
from miniqwen import FlopCounter, generate, load_pretrained

from test_device import run_training
from test_grid_stages import Killed, common
from test_lora import randomize_lora, tiny_model
from test_search import SEARCH_OPTIONS, assert_continued_equals_straight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def ids_for(seed=1, shape=(3, 21)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers_on_cuda(tiny_checkpoint):
    """float32: the reference's logits within 1e-4. bf16: ours is as close to float32 as the reference's bf16 is."""
    path, ref = tiny_checkpoint
    ids = ids_for().cuda()
    ours = load_pretrained(path, dtype="float32", device="cuda")[0]
    theirs = copy.deepcopy(ref).to("cuda")
    exact = theirs(ids).logits
    torch.testing.assert_close(ours(ids), exact, atol=1e-4, rtol=0)
    ours_bf16 = load_pretrained(path, dtype="bfloat16", device="cuda")[0](ids).float()
    theirs_bf16 = theirs.to(torch.bfloat16)(ids).logits.float()
    ours_err, theirs_err = (ours_bf16 - exact).abs().max(), (theirs_bf16 - exact).abs().max()
    assert ours_err <= 2 * theirs_err + 1e-2, (float(ours_err), float(theirs_err))


@torch.no_grad()
def test_cuda_and_cpu_agree_on_logits_tokens_and_flops(tiny_checkpoint):
    path, _ = tiny_checkpoint
    cpu = load_pretrained(path, dtype="float32", device="cpu")[0]
    gpu = load_pretrained(path, dtype="float32", device="cuda")[0]
    ids = ids_for(2, (2, 15))
    with FlopCounter() as fc_cpu:
        want = cpu(ids)
    with FlopCounter() as fc_gpu:
        got = gpu(ids.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
    assert fc_gpu.total == fc_cpu.total and fc_gpu.breakdown() == fc_cpu.breakdown()
    prompts = [ids[0].tolist(), ids[1, 4:].tolist()]
    kwargs = dict(pad_token_id=0, allowed_token_ids=range(10, 40), stop_token_id=11, stop_count=3)
    with FlopCounter() as gen_cpu:
        tokens_cpu = generate(cpu, prompts, 12, **kwargs)
    with FlopCounter() as gen_gpu:
        tokens_gpu = generate(gpu, prompts, 12, **kwargs)
    assert tokens_gpu == tokens_cpu
    assert gen_gpu.total == gen_cpu.total


@torch.no_grad()
def test_merged_adapter_forecasts_like_the_unmerged_one_on_cuda():
    model = tiny_model().to("cuda", torch.bfloat16)
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    randomize_lora(model)
    model.cuda()
    ids = ids_for(3, (2, 9)).cuda()
    unmerged = model(ids).float()
    with merged(model):
        inside = model(ids).float()
        with FlopCounter() as fc:
            model(ids)
    with FlopCounter() as fc_base:
        tiny_model().to("cuda", torch.bfloat16)(ids)
    assert fc.total == fc_base.total
    scale = unmerged.abs().max()
    assert (inside - unmerged).abs().max() <= 3e-2 * scale  # bf16 rounding of W + B·A·scale


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])
def test_training_on_cuda_resumes_exactly(tiny_dir, tmp_path, precision):
    """6 steps straight equal 3 steps, a stop, and 3 resumed steps, bit for bit, on the GPU."""
    whole, _ = run_training(tiny_dir, tmp_path / "whole", precision, device="cuda")
    run_training(tiny_dir, tmp_path / "half", precision, device="cuda", max_steps=3)
    resumed, summary = run_training(tiny_dir, tmp_path / "half", precision, device="cuda", resume=True)
    assert summary["steps"] == 6
    again = dict(resumed.named_parameters())
    for name, p in whole.named_parameters():
        if "lora_" in name:
            assert p.device.type == "cuda"
            diff = float((p.detach().float() - again[name].detach().float()).abs().max())
            assert torch.equal(p, again[name]), f"{name}: resumed differs by {diff:.3g}"


def test_compiled_training_on_cuda_follows_eager(tiny_dir, tmp_path):
    _, eager = run_training(tiny_dir, tmp_path / "eager", "float32", device="cuda", max_steps=4, eval_every=0)
    _, compiled = run_training(tiny_dir, tmp_path / "compiled", "float32", device="cuda", max_steps=4,
                               eval_every=0, compile=True)
    assert compiled["steps"] == 4
    assert compiled["last_train_loss"] == pytest.approx(eager["last_train_loss"], rel=1e-3)


def on_cuda(model, data, out, ledger):
    """The grid stages' tiny-run options with ``--device cuda --precision bfloat16``."""
    args = common(model, data, out, ledger)
    args[args.index("--device") + 1] = "cuda"
    args[args.index("--precision") + 1] = "bfloat16"
    return args


def test_search_on_cuda_continues_points_exactly(tiny_full_vocab, sim_file, tmp_path):
    """The search end to end on the GPU in bf16: the rungs, the ledger, and a point taken to 4 steps over two
    rungs equal to one trained to 4 steps straight (the sweep, also on the GPU)."""
    out, ledger = tmp_path / "search", tmp_path / "search.jsonl"
    assert search.main(on_cuda(tiny_full_vocab, sim_file, out, ledger) + SEARCH_OPTIONS) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["details"]["rows"]
    assert [r["rung"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert Ledger(ledger).total() == results["flops"]["total"] <= results["flops"]["planned"]
    kept = halving.survivors(rows[:4], 2)
    assert [r["name"] for r in rows[4:]] == [r["name"] for r in rows[:4] if r["name"] in kept]
    assert rows[4]["steps"] == 4
    assert_continued_equals_straight(out, rows[4], on_cuda(tiny_full_vocab, sim_file, tmp_path / "straight",
                                                           tmp_path / "straight.jsonl"))


def test_final_stage_on_cuda_resumes_to_the_uninterrupted_result(tiny_full_vocab, sim_file, tmp_path):
    """The final stage on the GPU in bf16 (training with forecast-based checkpoint selection, the test split beside
    the classical forecasters), killed after step 3 and resumed: the metrics of a run never stopped."""
    from experiments import final

    extra = ["--split", "test", "--lr", "1e-3", "--rank", "2", "--max-steps", "6", "--eval-every", "2",
             "--checkpoint-every", "2", "--early-stop", "5", "--orders", "1,2"]

    def kill(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        final.main(on_cuda(tiny_full_vocab, sim_file, tmp_path / "part", tmp_path / "part.jsonl") + extra,
                   on_step=kill)
    assert final.main(on_cuda(tiny_full_vocab, sim_file, tmp_path / "part", tmp_path / "part.jsonl") + extra
                      + ["--resume"]) == 0
    assert final.main(on_cuda(tiny_full_vocab, sim_file, tmp_path / "whole", tmp_path / "whole.jsonl") + extra) == 0
    resumed = json.loads((tmp_path / "part" / "results.json").read_text())
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert resumed["settings"]["run"]["device"] == "cuda" and resumed["settings"]["run"]["precision"] == "bfloat16"
    assert resumed["evaluations"]["lora"]["metrics"] == whole["evaluations"]["lora"]["metrics"]
    assert Ledger(tmp_path / "part.jsonl").total() == resumed["flops"]["total"] == whole["flops"]["total"]
