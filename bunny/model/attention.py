"""``bunny_sdpa``: transformers' SDPA attention with the CPU kernel chosen by sequence length.

Why it exists: on a CPU, PyTorch's fused SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``)
is fast forward but slow backward at the short lengths of captions and chat turns. A stage-1 step of
SmolLM2-135M (batch 32 x 40 tokens, bf16 autocast, one thread) spent 37% of its time in that kernel's
backward, 68 ms per layer; the composite "math" kernel does the same attention through matmul and
softmax, whose backward is cheap at these lengths. At long lengths the fused kernel wins. Measured
(SmolLM2 shape, 6 layers, forward + input-gradient backward, bf16 autocast, one thread; docs/training.md):

================  ==========  ========  ===========
batch x tokens     fused SDPA   math      math / fused
================  ==========  ========  ===========
32 x 40            0.88 s      0.49 s    1.8x faster
16 x 180           1.88 s      1.00 s    1.9x faster
4 x 300            0.44 s      0.52 s    0.85x
2 x 1024           0.86 s      2.37 s    0.36x
================  ==========  ========  ===========

So ``bunny_sdpa`` runs the math kernel where the keys are at most ``CPU_MATH_MAX_KV`` long on a CPU
tensor, and transformers' own ``sdpa_attention_forward`` unchanged everywhere else (GPU included).
The masks are SDPA's (registered under the same name), so the two paths compute the same attention:
only the kernel differs. The name is never saved: transformers drops ``_attn_implementation`` from
``config.json``, and a reloaded model gets the default again.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "bunny_sdpa"
CPU_MATH_MAX_KV = 256
"""Longest key length that takes the math kernel on a CPU (parity with the fused kernel near 300)."""


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and key.shape[-2] <= CPU_MATH_MAX_KV:
        # entered on every call, so a gradient-checkpointing recompute takes the same kernel
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Register ``bunny_sdpa`` with transformers' attention and mask interfaces (idempotent); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_length_dispatch(language_model: torch.nn.Module) -> bool:
    """Switch an LLM that runs transformers' SDPA to ``bunny_sdpa``; True if it was switched.

    Only an LLM already on ``sdpa`` whose code goes through ``AttentionInterface`` changes (same masks, same
    maths): eager, flash-attention and models with their own attention code are left as they are.
    """
    config = getattr(language_model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    can_set = getattr(language_model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():  # e.g. remote code with its own attention classes
        return False
    language_model.set_attn_implementation(register())
    return True
