"""Fused element-wise kernels: the same RMSNorm and SiLU-MLP maths, compiled; anything else left eager."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _train_helpers import max_diff, one_thread, tiny_cfg, trainable_tensors
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bunny.model import attention
from bunny.model.fused import check_fused_loss, cross_entropy_sum, fuse_elementwise, unfuse_elementwise
from bunny.train import run
from bunny.train.metrics import read_metrics


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()


def _llama(layers: int = 2, dispatched: bool = True) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if dispatched:  # as training sets it up: bunny_sdpa, whose attention blocks can be fused too
        assert attention.use_length_dispatch(model)
    return model


def _loss_and_grads(model: LlamaForCausalLM, ids: torch.Tensor, autocast: torch.dtype | None):
    model.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # a padded row: the attention blocks see SDPA's padding mask
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        # no KV cache, as bunny's loss module asks: with one, attention blocks take their class's forward
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rotary_ran_eager(model: LlamaForCausalLM, ids: torch.Tensor, **kwargs) -> bool:
    """Whether a forward ran eager rotary embeddings (``rotate_half`` negates; nothing else here does)."""
    kwargs = {"use_cache": False, **kwargs}
    with torch.no_grad():
        model(ids, **kwargs)  # a first call may compile, and tracing runs aten ops too
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, **kwargs)
    return "aten::neg" in {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_a_fused_llama_trains_like_the_eager_one(autocast):
    eager = _llama()
    fused = copy.deepcopy(eager)
    counts = fuse_elementwise(fused, autocast)
    # two norms per layer + the final norm; one MLP and one attention block per layer
    assert counts == {"RMSNorm": 2 * 2 + 1, "SiLU MLP": 2, "rotary attention": 2}
    assert "forward" in vars(fused.model.norm) and "forward" not in vars(eager.model.norm)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    assert _rotary_ran_eager(eager, ids) and not _rotary_ran_eager(fused, ids)  # the fused blocks really ran
    loss_a, grads_a = _loss_and_grads(eager, ids, autocast)
    loss_b, grads_b = _loss_and_grads(fused, ids, autocast)
    # float32: only the reduction order may differ; bf16 autocast: the eager path rounds per op
    tol = 1e-5 if autocast is None else 2e-2
    torch.testing.assert_close(loss_b, loss_a, atol=tol, rtol=tol)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=tol * float(g.abs().max()), rtol=tol, msg=name)
    assert fuse_elementwise(fused, autocast) == {}  # already switched: nothing switched twice
    assert unfuse_elementwise(fused, ("rotary attention",)) == 2
    assert unfuse_elementwise(fused) == 7
    assert "forward" not in vars(fused.model.norm)


def test_fused_attention_blocks_leave_generation_and_long_sequences_to_their_class():
    """With a KV cache (generation) or keys beyond the grouped path's length, the class's own forward runs."""
    eager = _llama().eval()
    fused = copy.deepcopy(eager)
    assert fuse_elementwise(fused)["rotary attention"] == 2
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **kwargs), eager.generate(prompt, **kwargs))
    assert _rotary_ran_eager(fused, prompt, use_cache=True)
    long = torch.randint(0, 64, (1, attention.CPU_MATH_MAX_KV + 20), generator=torch.Generator().manual_seed(3))
    assert _rotary_ran_eager(fused, long) and not _rotary_ran_eager(fused, long[:, :attention.CPU_MATH_MAX_KV])
    with torch.no_grad():
        torch.testing.assert_close(fused(long, use_cache=False).logits, eager(long, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)


def test_attention_on_another_implementation_or_with_other_maths_is_not_switched():
    """Only blocks on bunny_sdpa are switched; Qwen3's (a norm on q and k) never are."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    assert "rotary attention" not in fuse_elementwise(_llama(layers=1, dispatched=False))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    assert attention.use_length_dispatch(qwen3)
    counts = fuse_elementwise(qwen3)
    assert "rotary attention" not in counts and counts["SiLU MLP"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_cross_entropy_gives_eager_loss_and_gradient(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 3000, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 3000, (37,), generator=gen)
    results = []
    for fused in (False, True):
        x = logits.clone().requires_grad_(True)
        loss = cross_entropy_sum(x, targets, fused)
        loss.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        results.append((loss.detach(), x.grad.float()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert check_fused_loss(torch.device("cpu"), None if dtype == torch.float32 else dtype) == ""


class OffsetRMSNorm(LlamaRMSNorm):
    """Gemma's form, ``(1 + w) * norm(x)``: the same attributes as Llama's, different maths."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return ((1.0 + self.weight.float()) * x).to(hidden_states.dtype)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_a_norm_with_other_maths_is_left_eager(caplog, autocast):
    """In float32 against eager; under bf16 against float32 maths too (no farther from it than eager)."""
    model = _llama(layers=1, dispatched=False)
    for layer in model.model.layers:
        layer.input_layernorm = OffsetRMSNorm(64, eps=1e-6)
    with caplog.at_level(logging.WARNING, logger="bunny.model.fused"):
        counts = fuse_elementwise(model, autocast)
    assert counts == {"RMSNorm": 2, "SiLU MLP": 1}  # the Llama norms and the MLP; not the offset norm
    assert "forward" not in vars(model.model.layers[0].input_layernorm)
    assert "OffsetRMSNorm" in caplog.text and "differs" in caplog.text


def test_an_llm_without_rms_norms_or_silu_gates_is_untouched():
    """Phi (LayerNorm, fc1/fc2 with GELU): nothing matches, nothing is compiled, nothing changes."""
    from transformers import PhiConfig, PhiForCausalLM

    model = PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2))
    assert fuse_elementwise(model) == {}
    assert not any("forward" in vars(m) for m in model.modules())


def test_training_with_fusion_reaches_the_same_weights(tmp_path, caplog):
    """A LoRA run (peft wraps the MLP's Linears) with fusion forced on the tiny LLM, against it off."""
    runs = {}
    for on in (False, True):
        out = tmp_path / str(on)
        with caplog.at_level(logging.INFO, logger="bunny.model.fused"):
            # the fused run also recomputes its blocks (gradient checkpointing): same loss either way
            run(tiny_cfg(out, stage="finetune", max_steps=3, fused_elementwise=on, gradient_checkpointing=on))
        runs[on] = out
        assert ("fused element-wise kernels: 5 RMSNorm, 2 SiLU MLP, 2 rotary attention, 14 LoRA Linear"
                in caplog.text) == on
        assert ("fused cross-entropy: on" in caplog.text) == on
        assert "left eager" not in caplog.text
    loss = {on: [r["loss"] for r in read_metrics(out) if "loss" in r] for on, out in runs.items()}
    assert len(loss[True]) == 3
    assert loss[True] == pytest.approx(loss[False], rel=1e-4)
    assert max_diff(trainable_tensors(runs[True]), trainable_tensors(runs[False])) < 1e-4


def test_auto_fuses_only_wide_llms_on_a_cpu(tmp_path):
    from bunny.train.builder import build_start_model
    from bunny.train.trainer import FUSION_MIN_WIDTH, _wants_fusion

    cfg = tiny_cfg(tmp_path)
    model, _, _ = build_start_model(cfg, lambda: [])
    width = model.config.text_config.hidden_size
    assert width < FUSION_MIN_WIDTH
    assert not _wants_fusion(cfg, model, torch.device("cpu"))
    model.config.text_config.hidden_size = FUSION_MIN_WIDTH
    assert _wants_fusion(cfg, model, torch.device("cpu"))
    assert not _wants_fusion(cfg, model, torch.device("cuda"))
    cfg.distributed = "fsdp"
    assert not _wants_fusion(cfg, model, torch.device("cpu"))
    cfg.distributed = "auto"
    cfg.fused_elementwise = False
    assert not _wants_fusion(cfg, model, torch.device("cpu"))
