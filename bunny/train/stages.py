"""What trains in each stage: freezing, LoRA, QLoRA, and the optimizer's parameter groups.

Written against the three submodules of ``BunnyForConditionalGeneration``: ``vision_tower``,
``mm_projector`` and ``language_model`` (a transformers causal LM).

| stage / tune              | vision_tower          | mm_projector                  | language_model              |
|---------------------------|-----------------------|-------------------------------|-----------------------------|
| pretrain / projector      | frozen                | trains (learning_rate)        | frozen                      |
| finetune / lora (default) | frozen (or trains at  | trains (mm_projector_lr)      | LoRA on every Linear except |
|                           | vision_tower_lr when  |                               | lm_head (r, alpha, dropout) |
|                           | unfreeze_vision_tower)|                               |                             |
| finetune / full           | same                  | trains (mm_projector_lr)      | every weight trains         |

Weight decay applies to matrices only (biases, norms and LoRA-free 1-D tensors are exempt), as is
usual for AdamW; with the paper's weight_decay 0 the split changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bunny.train.config import TrainConfig

SUBMODULES = ("vision_tower", "mm_projector", "language_model")


def llm_of(model: nn.Module) -> nn.Module:
    """The causal LM inside ``model`` (unwrapping a PEFT wrapper when LoRA is applied)."""
    llm = model.language_model
    get_base = getattr(llm, "get_base_model", None)
    return get_base() if callable(get_base) and _is_peft(llm) else llm


def _is_peft(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, PeftModel)


def lora_target_names(llm: nn.Module, targets: str | list[str]) -> list[str]:
    """Leaf names of the Linear layers LoRA wraps: every Linear of the LLM except its output layer.

    ``targets`` is ``"all-linear"`` or an explicit list of leaf names (each must exist).
    """
    out_layer = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    leaves: set[str] = set()
    excluded: set[str] = set()
    for name, module in llm.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if module is out_layer or leaf == "lm_head":
                excluded.add(leaf)
            else:
                leaves.add(leaf)
    clash = leaves & excluded
    if clash:  # a leaf name shared with the output layer would make peft wrap lm_head too
        raise ValueError(f"LoRA: layer name(s) {sorted(clash)} are used by both lm_head and other layers")
    if targets == "all-linear":
        if not leaves:
            raise ValueError("LoRA: the language model has no Linear layer besides its output layer")
        return sorted(leaves)
    unknown = sorted(set(targets) - leaves)
    if unknown:
        raise ValueError(f"lora.targets: {unknown} are not Linear layers of the LLM; available: {sorted(leaves)}")
    return sorted(set(targets))


def apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap ``model.language_model`` with PEFT LoRA (in place); returns the PEFT model. The adapters'
    dropout is bunny's (bunny/model/lora_dropout.py: masks 4x cheaper than ``bernoulli_``, applied in
    ``lora_A``'s compute dtype without peft's float32 round trip)."""
    from peft import LoraConfig, get_peft_model

    from bunny.model.layouts.lora import quiet_peft
    from bunny.model.lora_dropout import use_compute_dtype_dropout

    llm = model.language_model
    targets = lora_target_names(llm, cfg.lora.targets)
    lora_cfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )
    with quiet_peft():
        peft_llm = get_peft_model(llm, lora_cfg)
    use_compute_dtype_dropout(peft_llm)
    model.language_model = peft_llm
    return peft_llm


def configure_trainable(model: nn.Module, cfg: TrainConfig) -> None:
    """Set ``requires_grad`` for the stage (applies LoRA for ``tune: lora``); see the table above."""
    for name in SUBMODULES:
        if not hasattr(model, name):
            raise AttributeError(f"the model has no submodule {name!r}; expected {SUBMODULES}")
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    if cfg.unfreeze_vision_tower:
        model.vision_tower.requires_grad_(True)
    if cfg.tune == "full":
        model.language_model.requires_grad_(True)
    elif cfg.tune == "lora":
        if cfg.bits in (4, 8):
            quantize_llm(model, cfg.bits)
            prepare_kbit(model)
        apply_lora(model, cfg)  # peft leaves only the adapters trainable inside the LLM
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg)


def quantize_llm(model: nn.Module, bits: int) -> None:
    """QLoRA: every Linear of the LLM except its output layer becomes a bitsandbytes 4-bit (NF4, bf16
    compute) or 8-bit layer, quantised on the GPU. CUDA only (checked before the model is built)."""
    import bitsandbytes as bnb

    llm = model.language_model
    out_layer = llm.get_output_embeddings()
    device = torch.device("cuda", torch.cuda.current_device())
    for module in list(llm.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child is out_layer:
                continue
            has_bias = child.bias is not None
            if bits == 4:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            if has_bias:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, child_name, q.to(device))  # moving to the GPU quantises the weight


def prepare_kbit(model: nn.Module) -> None:
    """QLoRA: the quantised base LLM gets peft's k-bit preparation (norms in float32, input grads)."""
    from peft import prepare_model_for_kbit_training

    model.language_model = prepare_model_for_kbit_training(model.language_model, use_gradient_checkpointing=False)


def enable_gradient_checkpointing(model: nn.Module, cfg: TrainConfig) -> None:
    """Recompute the LLM's (and a trained vision tower's) block activations in backward."""
    llm = llm_of(model)
    _checkpointing(llm, True)
    if hasattr(llm.config, "use_cache"):
        llm.config.use_cache = False
    if cfg.unfreeze_vision_tower:
        inner = getattr(model.vision_tower, "vision_tower", None)  # the encoder's transformers model
        for m in (model.vision_tower, inner):
            if m is not None and (hasattr(m, "activation_checkpointing_enable")
                                  or hasattr(m, "gradient_checkpointing_enable")):
                _checkpointing(m, True)
                break


def _checkpointing(module: nn.Module, on: bool) -> None:
    """transformers 5 names it activation checkpointing (the gradient_* names are deprecated aliases)."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        if on:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.activation_checkpointing_disable()
    elif on:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_disable()


def disable_gradient_checkpointing(model: nn.Module) -> None:
    llm = llm_of(model)
    if getattr(llm, "is_activation_checkpointing", False):
        _checkpointing(llm, False)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: one per (submodule, decay or not), each with its own lr; empty groups dropped."""
    lrs = {
        "mm_projector": cfg.mm_projector_lr if cfg.mm_projector_lr is not None else cfg.learning_rate,
        "vision_tower": cfg.vision_tower_lr if cfg.vision_tower_lr is not None else cfg.learning_rate,
        "language_model": cfg.learning_rate,
    }
    if cfg.tune == "projector":  # stage 1: the projector is the only module and uses learning_rate
        lrs["mm_projector"] = cfg.learning_rate
    groups: list[dict[str, Any]] = []
    for sub in SUBMODULES:
        decay, no_decay = [], []
        for _, p in getattr(model, sub).named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 else no_decay).append(p)
        for params, wd, tag in ((decay, cfg.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lrs[sub], "weight_decay": wd, "name": f"{sub}/{tag}"})
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return groups


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{submodule: {"trainable": n, "total": n}}`` parameter counts."""
    out = {}
    for sub in SUBMODULES:
        total = trainable = 0
        for p in getattr(model, sub).parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        out[sub] = {"trainable": trainable, "total": total}
    return out


def check_qlora_available(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.bits == 16:
        return
    if device.type != "cuda":
        raise RuntimeError(f"bits: {cfg.bits} (QLoRA) needs CUDA (bitsandbytes); this run is on {device.type}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("bits: 4/8 (QLoRA) needs the bitsandbytes package: pip install bitsandbytes") from exc
