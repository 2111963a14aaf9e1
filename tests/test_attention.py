"""``bunny_sdpa``: the same attention as transformers' SDPA, with the CPU kernel chosen by length."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _train_helpers import one_thread, tiny_cfg
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import bunny
from bunny.model import attention
from bunny.train import run
from bunny.train.builder import build_start_model

FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()


def _forward_backward(model: LlamaForCausalLM, embeds: torch.Tensor, mask: torch.Tensor):
    """Logits and the input gradient (stage 1's only path), and the aten ops that ran."""
    x = embeds.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = model(inputs_embeds=x, attention_mask=mask).logits
        (logits.float() * mask[..., None]).pow(2).mean().backward()
    return logits.detach(), x.grad, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("length", [40, attention.CPU_MATH_MAX_KV + 44])
def test_same_attention_as_sdpa_with_the_kernel_chosen_by_length(length):
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(config).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    dispatched = copy.deepcopy(sdpa)
    assert attention.use_length_dispatch(dispatched)
    assert dispatched.config._attn_implementation == attention.NAME
    embeds = torch.randn(3, length, 64)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # a padded row: the masks must be SDPA's on both paths
    logits_a, grad_a, ops_a = _forward_backward(sdpa, embeds, mask)
    logits_b, grad_b, ops_b = _forward_backward(dispatched, embeds, mask)
    keep = mask.bool()
    torch.testing.assert_close(logits_b[keep], logits_a[keep], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad_b[keep], grad_a[keep], atol=1e-6, rtol=1e-4)
    assert FUSED in ops_a  # plain SDPA takes the fused CPU kernel at every length
    assert (FUSED in ops_b) == (length > attention.CPU_MATH_MAX_KV)  # ours only beyond the threshold


def test_an_llm_not_on_sdpa_is_left_alone():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    assert not attention.use_length_dispatch(model)
    assert model.config._attn_implementation == "eager"


def test_training_uses_it_by_default_and_never_saves_it(tmp_path):
    model, _, _ = build_start_model(tiny_cfg(tmp_path / "a"), lambda: [])
    assert model.language_model.config._attn_implementation == attention.NAME
    for asked in ("sdpa", "eager", attention.NAME):  # an explicit choice is taken as given
        model, _, _ = build_start_model(tiny_cfg(tmp_path / asked, attn_implementation=asked), lambda: [])
        assert model.language_model.config._attn_implementation == asked
    final = run(tiny_cfg(tmp_path / "run", max_steps=1))
    saved = (final / "config.json").read_text()
    assert attention.NAME not in saved and json.loads(saved)  # a model loads anywhere, registered or not
    loaded, _ = bunny.load_model(final)
    assert loaded.language_model.config._attn_implementation == "sdpa"
