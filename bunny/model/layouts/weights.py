"""Loading a Bunny model from a foreign key layout (original Bunny releases, transformers' Llava).

Why not ``from_pretrained(..., key_mapping=...)``: transformers applies its own per-submodel key
conversions on top, which makes "which checkpoint key went where" hard to report. Here a layout is
a plain list of regex renames; every key must land on a parameter and every parameter must be
filled, otherwise the error lists the unmatched keys on both sides (the thing a user needs to fix a
checkpoint). The model is built without weight initialisation and the loaded tensors are assigned,
not copied, so the peak memory is about one copy of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers.initialization import no_init_weights

from bunny.model.modeling import BunnyForConditionalGeneration

Renames = Iterable[tuple[str, str]]


def rename_keys(state: Mapping[str, torch.Tensor], renames: Renames) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply the first matching ``(pattern, replacement)`` to each key; unmatched keys are kept as they are.

    Returns the renamed state dict and ``{new_key: original_key}`` for error messages."""
    compiled = [(re.compile(p), r) for p, r in renames]
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in compiled:
            if pattern.search(key):
                new = pattern.sub(replacement, key, count=1)
                break
        if new in out:
            raise ValueError(f"checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        origin[new] = key
    return out, origin


def build_without_init(config, **kwargs) -> nn.Module:
    """``BunnyForConditionalGeneration(config)`` with random initialisation skipped (weights follow)."""
    with no_init_weights():
        return BunnyForConditionalGeneration(config, **kwargs)


def assign_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    origin: Mapping[str, str] | None = None,
    ignore_unexpected: Callable[[str], bool] = lambda k: False,
    allow_missing: Callable[[str], bool] = lambda k: False,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Load ``state`` into ``model`` by assignment; returns the missing keys that ``allow_missing`` let pass.

    Tied parameters (e.g. ``lm_head.weight`` tied to the embeddings) may be absent from ``state``.
    Anything else unmatched raises ``ValueError`` naming the keys in the checkpoint's own spelling.
    """
    origin = origin or {}
    own = model.state_dict()
    tied = _tied_keys(model)
    unexpected = sorted(k for k in state if k not in own and not ignore_unexpected(origin.get(k, k)))
    missing = sorted(k for k in own if k not in state and k not in tied)
    tolerated = [k for k in missing if allow_missing(k)]
    missing = [k for k in missing if not allow_missing(k)]
    wrong = sorted(f"{origin.get(k, k)} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                   for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or missing or wrong:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint key(s) match no model parameter: "
                         + ", ".join(origin.get(k, k) for k in unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if missing:
            parts.append(f"{len(missing)} model parameter(s) have no checkpoint key: "
                         + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es): " + ", ".join(wrong[:20]))
        raise ValueError(f"{source}: the weights do not fit the model. " + "; ".join(parts))
    to_load = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               for k, v in state.items() if k in own}
    if tolerated:  # keep the module's (uninitialised) tensors for these, but make them defined values
        for k in tolerated:
            to_load[k] = torch.zeros_like(own[k], dtype=dtype if dtype is not None and own[k].is_floating_point()
                                          else own[k].dtype)
    model.load_state_dict(to_load, strict=False, assign=True)
    if dtype is not None:
        model.to(dtype)
    model.tie_weights()
    return tolerated


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that ``tie_weights`` fills from another parameter."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) if getattr(model.config, "tie_word_embeddings", False) or _text_ties(model) else set()


def _text_ties(model: nn.Module) -> bool:
    text = getattr(model.config, "text_config", None)
    return bool(getattr(text, "tie_word_embeddings", False))
