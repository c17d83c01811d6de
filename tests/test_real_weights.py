"""Real-weight parity with transformers (needs MINIQWEN_TEST_MODEL=<HF-layout Qwen2.5 directory>; skipped otherwise).

On this project's machines the directory comes from ../shared/tools/get-qwen-weights (Qwen2.5-Coder-0.5B-Instruct,
dequantized); with Hub access any official Qwen2.5 checkpoint directory works.
"""

import pytest
import torch

from miniqwen import chat_prompt, generate, load_pretrained

PROMPTS = [
    "0.93,1.07;0.81,1.12;0.70,1.13;0.62,1.09;0.57,1.01;",
    "The Lotka-Volterra equations describe",
    chat_prompt("Continue the sequence: 1.20,0.35;1.41,0.38;1.63,0.44;"),
]
LLMTIME = ["1.23,0.45;2.00,10.31", "0.00,0.01;9.99,9.99;", "12.5,3.75;0.1,0.2;7.0,8.0"]


@pytest.fixture(scope="module")
def models(real_model_dir):
    transformers = pytest.importorskip("transformers")
    ours, tok = load_pretrained(real_model_dir, dtype=torch.float32, device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(real_model_dir)
    return ours, tok, ref, hf_tok


@torch.no_grad()
def test_logits_match_transformers(models):
    ours, tok, ref, _ = models
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-3, rtol=0)


def test_32_greedy_tokens_identical(models):
    ours, tok, ref, _ = models
    ids = tok.encode(PROMPTS[0])
    got = generate(ours, [ids], 32, pad_token_id=tok.pad_token_id)[0]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                            eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert got == want


def test_tokenizer_ids_match_transformers(models):
    _, tok, _, hf_tok = models
    for text in LLMTIME + PROMPTS:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "system", "content": "You forecast time series."},
                {"role": "user", "content": "Continue: " + LLMTIME[0]}]
    templated = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_prompt("Continue: " + LLMTIME[0], system="You forecast time series.") == templated
    assert tok.encode(templated) == hf_tok(templated, add_special_tokens=False)["input_ids"]
