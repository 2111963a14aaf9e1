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
MATH = "aten::_scaled_dot_product_attention_math"


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
    assert MATH not in ops_b  # below it, the grouped path (no SDPA kernel at all)


def _math_kernel(q, k, v, mask, is_causal=False, scale=None):
    """PyTorch's math kernel after transformers' repeat_kv: what bunny_sdpa ran before the grouped path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = q.shape[1] // k.shape[1]
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)


def _qkv(batch, heads, kv_heads, length, dtype=torch.float32):
    torch.manual_seed(1)
    # as rotary embeddings leave them: (B, H, T, D) views of (B, T, H, D) projections
    return [torch.randn(batch, length, n, 16, dtype=dtype).transpose(1, 2).requires_grad_(True)
            for n in (heads, kv_heads, kv_heads)]


def _grads(out, q, k, v, keep):
    (out.float()[keep] ** 2).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return grads


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("mask_kind", ["right-padded", "left-padded", "additive", "causal", "none"])
def test_grouped_attention_is_the_math_kernels(heads, kv_heads, mask_kind):
    b, t = 3, 11
    q, k, v = _qkv(b, heads, kv_heads, t)
    lengths = torch.tensor([t, 7, 4])
    valid = torch.arange(t)[None] < lengths[:, None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask, is_causal, keep = None, False, torch.ones(b, t, dtype=torch.bool)
    if mask_kind == "right-padded":
        mask, keep = causal[None, None] & valid[:, None, None, :], valid
    elif mask_kind == "left-padded":  # generation's batches: the first rows of a short prompt see no key at all
        valid = valid.flip(-1)
        mask, keep = causal[None, None] & valid[:, None, None, :], valid
    elif mask_kind == "additive":
        mask = torch.randn(b, 1, t, t) * 2
    elif mask_kind == "causal":
        is_causal = True
    ref = _math_kernel(q, k, v, mask, is_causal, scale=0.3)
    ref_grads = _grads(ref, q, k, v, keep)
    out = attention.grouped_attention(q, k, v, mask, 0.3, is_causal=is_causal)
    assert out.shape == (b, t, heads, 16) and out.is_contiguous()
    assert torch.isfinite(out).all()  # rows with no key left average the values: no NaN to leak anywhere
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(out, q, k, v, keep), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_attention_keeps_the_math_kernels_float32_under_bf16_autocast():
    """bf16 inputs, as under autocast: the scores and softmax stay float32, like the math kernel's."""
    q, k, v = _qkv(2, 6, 2, 40, torch.bfloat16)
    exact = _math_kernel(*(t.detach().float() for t in (q, k, v)), None, True)
    with torch.autocast("cpu", torch.bfloat16):
        ours = attention.grouped_attention(q, k, v, None, None, is_causal=True)
        math = _math_kernel(q, k, v, None, True)
    assert ours.dtype == math.dtype == torch.bfloat16
    err_ours = (ours.float() - exact).abs().max()
    err_math = (math.float() - exact).abs().max()
    assert err_ours <= err_math * 1.01 + 1e-6  # no worse than the kernel it replaces: bf16 rounding of the output


def test_calls_the_grouped_path_does_not_implement_take_the_math_kernel():
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1)
    model = LlamaForCausalLM(config)
    attention.use_length_dispatch(model)
    embeds = torch.randn(2, 12, 64)
    for training, kernel in ((True, MATH), (False, None)):  # dropout only while training
        model.train(training)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(inputs_embeds=embeds)
        ops = {e.key for e in prof.key_averages()}
        assert (MATH in ops) == (kernel == MATH) and FUSED not in ops


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
