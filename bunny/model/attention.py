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

So ``bunny_sdpa`` runs the math kernel's maths where the keys are at most ``CPU_MATH_MAX_KV`` long on a
CPU tensor, and transformers' own ``sdpa_attention_forward`` unchanged everywhere else (GPU included).
The masks are SDPA's (registered under the same name), so the two paths compute the same attention:
only the kernel differs.

The short path is not PyTorch's math kernel itself but ``grouped_attention``, the same float32 maths
per key/value head group. Called through transformers, the math kernel first copies every key and value
head once per query head that shares it (``repeat_kv``: SmolLM2 has 9 query heads on 3 key/value heads),
then runs a "safe" softmax whose extra passes (``all``, ``isneginf``, ``where``) guard rows with no key
left. Viewing the 3 query heads of a group as one ``3T x D`` matrix against their shared ``T x D`` keys
skips both the copies and the guard and gives the matmuls 3x the rows: 1.7-1.8x faster than the math
kernel at 32 x 46 tokens, 1.1x at 16 x 180 (SmolLM2's attention alone, bf16 inputs, forward +
backward, one thread), with the kernel's float32 precision. Its cost grows with keys x queries while
the fused kernel skips the masked half of a causal attention, so the threshold was measured again for
the grouped path (6 SmolLM2 layers, forward + input-gradient backward, one thread, interleaved in one
process): grouped / fused kernel 1.26x at 32 x 128, 1.18x at 16 x 176, 1.08x at 8 x 176, then 0.95x at
16 x 192, 0.91x at 4 x 192, 0.69-0.90x at 256 keys. The name is never saved: transformers drops
``_attn_implementation`` from ``config.json``, and a reloaded model gets the default again.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "bunny_sdpa"
CPU_MATH_MAX_KV = 176
"""Longest key length that takes the grouped float32 path on a CPU (the fused kernel wins from 192 keys at
every batch size measured; 256 until the grouped path replaced the math kernel itself)."""


_UNSUPPORTED = ("position_bias", "softcap", "s_aux", "sinks")
"""Keyword arguments the grouped path does not implement: a call with any of them set takes SDPA's math kernel."""


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None,
                      is_causal: bool = True, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """SDPA's math-kernel attention in float32, one matmul per key/value head group; ``(B, T, H, Dv)`` in
    ``out_dtype`` (default: the query's).

    ``query`` is ``(B, H, T, D)``, ``key``/``value`` ``(B, Hk, S, D)`` with ``H`` a multiple of ``Hk``;
    ``attention_mask`` is SDPA's: boolean (True attends) or additive float, ``(B or 1, 1, T, S)``, or None
    (then causal, aligned top-left like SDPA's ``is_causal``, when ``is_causal``). Query heads ``h`` use
    key/value head ``h // (H / Hk)``, as ``repeat_kv`` does. Masked scores are set to float32's lowest value,
    not -inf, so a query row with no key left (padding) averages the values instead of yielding NaN
    (SDPA's safe softmax gives it zeros); such rows never reach an unmasked one.
    """
    b, h, t, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    groups = h // hk
    scale = d ** -0.5 if scaling is None else scaling
    with torch.autocast(query.device.type, enabled=False):  # float32 matmuls, as the math kernel computes
        q = query.to(torch.float32, memory_format=torch.contiguous_format).reshape(b, hk, groups * t, d)
        scores = torch.matmul(q, key.float().transpose(-1, -2)).view(b, hk, groups, t, s) * scale
        if attention_mask is None and is_causal and t > 1:
            attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril()
        if attention_mask is not None:
            mask = attention_mask.unsqueeze(2) if attention_mask.dim() == 4 else attention_mask
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            else:
                scores = scores + mask.float()
        probs = torch.softmax(scores, dim=-1).view(b, hk, groups * t, s)
        out = torch.matmul(probs, value.float()).view(b, h, t, value.shape[-1])
    out, dtype = out.transpose(1, 2), out_dtype or query.dtype
    return out.to(dtype, memory_format=torch.contiguous_format) if out.dtype != dtype else out.contiguous()


def short_on_cpu(device: torch.device, key_length: int) -> bool:
    """Whether ``bunny_sdpa`` keeps a call off the fused kernel: a CPU tensor with at most ``CPU_MATH_MAX_KV`` keys."""
    return device.type == "cpu" and key_length <= CPU_MATH_MAX_KV


def groupable(module: torch.nn.Module, attention_mask: torch.Tensor | None, dropout: float,
              kwargs: dict[str, Any]) -> bool:
    """Whether ``grouped_attention`` computes this call as SDPA's math kernel would: no attention dropout
    while training, none of ``_UNSUPPORTED``, an SDPA mask shared by all heads (or none)."""
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED) or kwargs.get("output_attentions"):
        return False
    if dropout and module.training:
        return False
    return attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if short_on_cpu(query.device, key.shape[-2]):
        if query.shape[1] % key.shape[1] == 0 and groupable(module, attention_mask, kwargs.get("dropout", 0.0), kwargs):
            is_causal = kwargs.get("is_causal")
            is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
            return grouped_attention(query, key, value, attention_mask, kwargs.get("scaling"), is_causal), None
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
