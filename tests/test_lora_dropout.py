"""LoRA dropout with cheap masks in lora_A's compute dtype (bunny/model/lora_dropout.py): the masks
keep each element with the stated probability, independently, reproducibly from the seed; kept
values are the float32 maths rounded once; a peft LoRA Llama trains like with peft's dropout, and
gradient checkpointing replays the same masks; eval, dropout 0 and the slow path are peft's own
values; the swap is undone exactly; variants are left alone; stage 2's ``apply_lora`` uses it."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from bunny.model.lora_dropout import (
    MIN_FAST_P,
    ComputeDtypeDropout,
    keep_mask,
    use_compute_dtype_dropout,
    use_peft_dropout,
)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _lora_llama(base_dtype: torch.dtype, dropout: float = 0.1, **lora) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                                target_modules="all-linear", **lora))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.05)  # lora_B starts at zero: give both factors gradients worth comparing
        else:
            param.data = param.data.to(base_dtype)
    return model


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, autocast: bool, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _dropped(p: float) -> float:
    return round(p * 65536) / 65536


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_masks_keep_each_element_at_the_stated_rate_independently(p):
    torch.manual_seed(0)
    mask, scale = keep_mask(torch.Size([1000, 644]), p, torch.bfloat16)
    assert mask.shape == (1000, 644) and mask.dtype == torch.bfloat16
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    q = _dropped(p)
    assert abs(q - p) <= 1 / 131072 and scale == 1 / (1 - q)
    flat = (mask.flatten() == 0).float()
    n, sigma = flat.numel(), (q * (1 - q) / flat.numel()) ** 0.5
    assert abs(flat.mean().item() - q) < 5 * sigma
    for k in range(4):  # each 16-bit slice of a 64-bit word, the top one included
        assert abs(flat[k::4].mean().item() - q) < 10 * sigma, k
    both = (flat[:-1] * flat[1:]).mean().item()  # neighbours (mostly from one word) drop independently
    assert abs(both - q * q) < 10 * (q * q / n) ** 0.5
    torch.manual_seed(0)
    again, _ = keep_mask(torch.Size([1000, 644]), p, torch.float32)
    assert torch.equal(again, mask.float())  # the seed decides; the dtype only how it is written
    other, _ = keep_mask(torch.Size([1000, 644]), p, torch.float16)
    assert other.dtype == torch.float16 and set(other.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(other.float(), again)  # the next draws


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_kept_values_are_the_float32_maths_rounded_as_peft_rounds_them(p, x_dtype):
    drop = ComputeDtypeDropout(p, nn.Linear(256, 8))
    x = (torch.randn(400, 256) * 3).to(x_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = drop(x)
    assert y.dtype == torch.bfloat16  # what lora_A computes in, whatever came in
    kept = y != 0
    scale = 1 / (1 - _dropped(p))
    want = (x.detach().float() * scale).to(torch.bfloat16)  # peft: float32 dropout, then autocast's cast
    assert torch.equal(y[kept], want[kept]) and abs(1 - kept.float().mean().item() - p) < 0.01
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad.dtype == x_dtype
    assert torch.equal(x.grad, torch.where(kept, (g.float() * scale).to(x_dtype), 0))
    # PyTorch's own bf16 dropout scales by 1/(1-p) rounded to bf16: the test above tells them apart
    theirs = nn.functional.dropout(x.detach().to(torch.bfloat16), p)
    assert not torch.equal(theirs[theirs != 0], want[theirs != 0])


@pytest.mark.parametrize("base_dtype, autocast", [(torch.bfloat16, True), (torch.float32, True),
                                                  (torch.float32, False)])
def test_a_lora_llama_trains_like_with_peft_dropout(base_dtype, autocast):
    peft_model = _lora_llama(base_dtype)
    ours = copy.deepcopy(peft_model)
    assert use_compute_dtype_dropout(ours) == 14  # 7 Linears x 2 layers
    assert all(not m.cast_input_dtype_enabled for m in ours.modules() if hasattr(m, "lora_dropout"))
    ids = torch.randint(0, 64, (3, 23))
    no_dropout = copy.deepcopy(peft_model).eval()
    loss_0, grads_0 = _loss_and_grads(no_dropout, ids, autocast)
    loss_a, grads_a = _loss_and_grads(peft_model, ids, autocast)
    loss_b, grads_b = _loss_and_grads(ours, ids, autocast)
    assert len(grads_a) == 28 and grads_a.keys() == grads_b.keys()
    # other masks, the same distribution: both move the loss and the gradient off the dropout-free
    # ones, by alike amounts (an unscaled or all-dropping mask would move them far more)
    assert loss_b != loss_0 and loss_b != loss_a
    assert abs(loss_b - loss_0) < 4 * abs(loss_a - loss_0) + 0.02

    def cos_to_no_dropout(grads):
        return nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads.values()]),
                                               torch.cat([grads_0[n].flatten() for n in grads]), dim=0).item()
    assert abs(cos_to_no_dropout(grads_b) - cos_to_no_dropout(grads_a)) < 0.1
    again, grads_again = _loss_and_grads(ours, ids, autocast)  # the same seed draws the same masks
    assert torch.equal(again, loss_b) and all(torch.equal(grads_again[n], grads_b[n]) for n in grads_b)


def test_gradient_checkpointing_replays_the_masks_and_eval_is_peft():
    peft_model = _lora_llama(torch.bfloat16)
    ours = copy.deepcopy(peft_model)
    use_compute_dtype_dropout(ours)
    plain = copy.deepcopy(ours)
    ids = torch.randint(0, 64, (2, 17))
    ours.base_model.model.activation_checkpointing_enable({"use_reentrant": False})
    ours.enable_input_require_grads()
    loss_a, grads_a = _loss_and_grads(plain, ids, True)
    loss_b, grads_b = _loss_and_grads(ours, ids, True)  # recomputed forwards draw the same masks
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    peft_model.eval()
    ours.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_inputs_off_the_fast_path_get_peft_cast_and_dropout():
    lora_a = nn.Linear(32, 4)
    drop = ComputeDtypeDropout(0.2, lora_a)
    x = torch.randn(5, 32).to(torch.bfloat16)
    assert drop(x).dtype == torch.float32  # no autocast: lora_A computes in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert drop(x).dtype == torch.bfloat16
        assert drop(x.float()).dtype == torch.bfloat16
    drop.eval()
    assert torch.equal(drop(x), x.float())
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        ComputeDtypeDropout(1.0, lora_a)
    tiny = ComputeDtypeDropout(MIN_FAST_P / 2, lora_a)  # 1/65,536 steps would move this p by > 1%
    big = torch.randn(300, 32)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = tiny(big.to(torch.bfloat16))
    torch.manual_seed(3)
    assert torch.equal(ours, nn.functional.dropout(big.to(torch.bfloat16).float(), MIN_FAST_P / 2))


def test_a_dropout_0_adapter_beside_one_with_dropout_still_gets_its_cast():
    model = _lora_llama(torch.float32, dropout=0.0)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    before = copy.deepcopy(model)
    assert use_compute_dtype_dropout(model) == 4  # 2 q_proj x 2 adapters; the other Linears only have p=0
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_dropout["default"], ComputeDtypeDropout) and q.lora_dropout["default"].p == 0
    assert type(model.base_model.model.model.layers[0].self_attn.k_proj.lora_dropout["default"]) is nn.Identity
    model.eval()
    before.eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():  # float32 weights, no autocast: every adapter casts as peft did
        assert torch.equal(model(input_ids=ids).logits, before(input_ids=ids).logits)


def test_the_swap_is_undone_and_variants_are_left_alone():
    model = _lora_llama(torch.float32)
    assert use_compute_dtype_dropout(model) == 14
    assert use_peft_dropout(model) == 14
    assert all(type(d) is nn.Dropout for m in model.modules() if hasattr(m, "lora_dropout")
               for d in m.lora_dropout.values())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_dropout"))
    dora = _lora_llama(torch.float32, use_dora=True)
    assert use_compute_dtype_dropout(dora) == 0


def test_stage_2_lora_uses_it():
    from bunny.config import load_config
    from bunny.train.config import TrainConfig
    from bunny.train.stages import apply_lora

    cfg = load_config(TrainConfig, None, ["stage=finetune", "lora.r=4", "lora.alpha=8", "lora.dropout=0.05"])
    holder = nn.Module()
    holder.language_model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2))
    apply_lora(holder, cfg)
    drops = [d for m in holder.language_model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert len(drops) == 14 and all(isinstance(d, ComputeDtypeDropout) and d.p == 0.05 for d in drops)


# ---------------------------------------------------------------- the folded LoRA Linear (fused_elementwise)
def _fold(model: nn.Module, autocast: bool) -> int:
    from bunny.model.fused import fuse_elementwise

    return fuse_elementwise(model, torch.bfloat16 if autocast else None).get("LoRA Linear", 0)


def _max_err(got: dict, want: dict) -> float:
    return max(float((got[n].float() - want[n].float()).abs().max()) for n in want)


@pytest.mark.parametrize("base_dtype, autocast", [(torch.float32, False), (torch.bfloat16, True),
                                                  (torch.float32, True)])
def test_the_folded_lora_linear_trains_like_peft_forward(base_dtype, autocast):
    peft_model = _lora_llama(base_dtype)
    use_compute_dtype_dropout(peft_model)
    folded = copy.deepcopy(peft_model)
    assert _fold(folded, autocast) == 14
    ids = torch.randint(0, 64, (3, 23))
    loss_a, grads_a = _loss_and_grads(peft_model, ids, autocast)  # the same seed: the same masks in both
    loss_b, grads_b = _loss_and_grads(folded, ids, autocast)
    if not autocast:
        assert torch.isclose(loss_a, loss_b, rtol=1e-5)
        assert _max_err(grads_b, grads_a) <= 1e-5 * max(float(g.abs().max()) for g in grads_a.values())
        return
    # bf16: the two round at different places; the folded one must be no farther from float32 maths
    reference = copy.deepcopy(peft_model).float()
    loss_r, grads_r = _loss_and_grads(reference, ids, False)
    assert abs(loss_b - loss_r) <= 1.25 * abs(loss_a - loss_r) + 1e-3
    assert _max_err(grads_b, grads_r) <= 1.25 * _max_err(grads_a, grads_r) + 1e-4


def test_the_folded_lora_linear_adds_in_one_gemm_and_replays_under_checkpointing():
    model = _lora_llama(torch.bfloat16)
    use_compute_dtype_dropout(model)
    _fold(model, True)
    plain = copy.deepcopy(model)
    model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()
    ids = torch.randint(0, 64, (2, 17))
    loss_a, grads_a = _loss_and_grads(plain, ids, True)
    loss_b, grads_b = _loss_and_grads(model, ids, True)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    from torch.profiler import profile

    peft_q = _lora_llama(torch.bfloat16).base_model.model.model.layers[0].self_attn.q_proj.eval()
    q = plain.base_model.model.model.layers[0].self_attn.q_proj.eval()
    x = torch.randn(2, 17, 64).to(torch.bfloat16)
    calls = {}
    for name, module in (("peft", peft_q), ("folded", q)):
        with profile() as prof, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            module(x)
        calls[name] = {e.key: e.count for e in prof.key_averages()}
    assert calls["peft"].get("aten::mul") == 1 and calls["peft"].get("aten::add") == 1  # * scaling, result +
    assert "aten::mul" not in calls["folded"] and "aten::add" not in calls["folded"]
    assert "aten::addmm" in calls["folded"]  # base output + scaling * lora_B's product, one GEMM


def test_the_folded_lora_linear_hands_other_calls_to_peft():
    model = _lora_llama(torch.float32)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]))
    use_compute_dtype_dropout(model)
    reference = copy.deepcopy(model).eval()
    _fold(model, False)
    model.eval()
    ids = torch.randint(0, 64, (2, 9))

    def same(**kwargs) -> bool:
        with torch.no_grad():
            return torch.allclose(model(input_ids=ids, **kwargs).logits, reference(input_ids=ids, **kwargs).logits,
                                  rtol=1e-5, atol=1e-6)

    assert same()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    from torch.profiler import profile

    def folded_call() -> bool:
        with profile() as prof, torch.no_grad():
            q(torch.randn(2, 5, 64))
        return any(e.key == "aten::addmm" for e in prof.key_averages())

    assert folded_call()
    q.lora_B["default"].weight.ds_id = 7  # as DeepSpeed marks a partitioned parameter: its hooks must run
    assert not folded_call()
    del q.lora_B["default"].weight.ds_id
    for m in (model, reference):  # two active adapters on q_proj: peft's loop
        m.base_model.set_adapter(["default", "other"])
    assert same()
    assert same(adapter_names=["default", "other"])  # a mixed-adapter batch
    for m in (model, reference):
        m.base_model.set_adapter("default")
        m.merge_adapter()
    assert same()
    assert "forward" in vars(q) and q.merged and not folded_call()  # switched, yet merged: peft's forward
