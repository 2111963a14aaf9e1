"""Projectors: vision features [B, N, Cv] -> LLM embeddings [B, N', Ct].

Names (exact, or one of the parameterised forms below):

* ``linear``: one ``nn.Linear(Cv, Ct)`` (state-dict keys ``weight``/``bias``, as in Bunny/LLaVA).
* ``mlp{N}x_gelu`` for any N >= 1: ``Linear(Cv, Ct)`` then N-1 times ``GELU, Linear(Ct, Ct)``, an
  ``nn.Sequential`` so the keys are ``0.*``, ``2.*``, ... exactly like the released checkpoints
  (``mlp2x_gelu`` is Bunny's default).
* ``identity``: no parameters; needs Cv == Ct.
* ``avgpool2x2_{inner}``: 2x2 average pooling over the patch grid, then the ``inner`` projector
  (e.g. ``avgpool2x2_mlp2x_gelu``); keys are the inner projector's. The N tokens must form a square
  grid (a CLS token kept with ``feature_select="full"`` is an error). An odd side g is pooled with
  ``ceil_mode``: the last row/column windows average the 1 or 2 cells that exist (no zero padding
  enters the mean), giving ceil(g/2)^2 tokens (SigLIP's 27x27 -> 14x14 = 196).

A projector is registered as a *kind*: an object with ``build(config, vision_dim, text_dim) ->
nn.Module`` and ``num_tokens(config, n_in) -> int`` (how many tokens ``n_in`` encoder tokens become).
Both get the whole ``BunnyConfig``, so a projector that changes the token count (a resampler with
learned queries, pixel shuffle) is its own registered class and nothing else changes:
``BunnyConfig.num_image_tokens`` asks the kind. A projector class can be its own kind
(``ProjectorMixin`` gives the two classmethods for "same token count, built from the two widths").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from bunny.registry import Registry, UnknownNameError


class ProjectorKind(Protocol):
    """What the registry holds: how to build a projector and how many tokens it outputs."""

    def build(self, config: Any, vision_dim: int, text_dim: int) -> nn.Module: ...

    def num_tokens(self, config: Any, n_in: int) -> int: ...


#: exact names -> projector kind
PROJECTORS: Registry[ProjectorKind] = Registry("projector")

_MLP = re.compile(r"^mlp(\d+)x_gelu$")
_POOL = re.compile(r"^avgpool2x2_(.+)$")
#: documentation of the parameterised names, listed in unknown-name errors
PATTERNS = ("mlp{N}x_gelu", "avgpool2x2_{projector}")


class ProjectorMixin:
    """Shared by every projector: optional 2x2 token pooling before the layers, and token counting."""

    pool_2x2: bool = False

    @classmethod
    def build(cls, config: Any, vision_dim: int, text_dim: int) -> nn.Module:
        return cls(vision_dim, text_dim)

    @classmethod
    def num_tokens(cls, config: Any, n_in: int) -> int:
        return n_in

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_tokens(x) if self.pool_2x2 else x

    def num_output_tokens(self, n_in: int) -> int:
        return pooled_tokens(n_in) if self.pool_2x2 else n_in


class LinearProjector(ProjectorMixin, nn.Linear):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__(vision_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pool(x))


class MLPProjector(ProjectorMixin, nn.Sequential):
    """Linear(Cv, Ct) [GELU, Linear(Ct, Ct)] * (depth - 1)."""

    def __init__(self, vision_dim: int, text_dim: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Linear(vision_dim, text_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
        super().__init__(*layers)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pool(x))


class IdentityProjector(ProjectorMixin, nn.Module):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        if vision_dim != text_dim:
            raise ValueError(
                f"the identity projector needs equal vision and text widths, got vision {vision_dim} "
                f"and text {text_dim}; use 'linear' or 'mlp2x_gelu'"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


def pooled_tokens(n_in: int) -> int:
    """Token count after 2x2 average pooling of a square grid of ``n_in`` tokens (ceil on odd sides)."""
    side = math.isqrt(n_in)
    if side * side != n_in:
        raise ValueError(
            f"2x2 pooling needs a square grid of image tokens, got {n_in} (is a CLS token kept? "
            f"use vision_feature_select='patch')"
        )
    return ((side + 1) // 2) ** 2


def avg_pool_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, g*g, C] -> [B, ceil(g/2)^2, C] by 2x2 average pooling over the grid (ceil mode)."""
    b, n, c = x.shape
    pooled_tokens(n)  # validates the grid
    side = math.isqrt(n)
    grid = x.transpose(1, 2).reshape(b, c, side, side)
    grid = F.avg_pool2d(grid, kernel_size=2, stride=2, ceil_mode=True)
    return grid.flatten(2).transpose(1, 2)


PROJECTORS.register("linear", LinearProjector)
PROJECTORS.register("identity", IdentityProjector)


@dataclass(frozen=True)
class MLPKind:
    """``mlp{N}x_gelu``."""

    depth: int

    def build(self, config: Any, vision_dim: int, text_dim: int) -> nn.Module:
        return MLPProjector(vision_dim, text_dim, depth=self.depth)

    def num_tokens(self, config: Any, n_in: int) -> int:
        return n_in


@dataclass(frozen=True)
class PooledKind:
    """``avgpool2x2_{inner}``: 2x2 pooling in front of ``inner`` (keys stay the inner projector's)."""

    name: str
    inner: ProjectorKind

    def build(self, config: Any, vision_dim: int, text_dim: int) -> nn.Module:
        module = self.inner.build(config, vision_dim, text_dim)
        if not isinstance(module, ProjectorMixin) or module.pool_2x2:
            raise ValueError(f"projector {self.name!r}: the inner projector cannot be pooled")
        module.pool_2x2 = True
        return module

    def num_tokens(self, config: Any, n_in: int) -> int:
        return self.inner.num_tokens(config, pooled_tokens(n_in))


def projector_kind(name: str) -> ProjectorKind:
    """The kind for an exact registered name or one of the parameterised forms (``PATTERNS``)."""
    if name in PROJECTORS:
        return PROJECTORS.get(name)
    if m := _MLP.match(name):
        return MLPKind(int(m.group(1)))
    if m := _POOL.match(name):
        return PooledKind(name, projector_kind(m.group(1)))
    raise UnknownNameError(
        f"unknown projector {name!r}; known: {', '.join(PROJECTORS.names())}, and the forms {', '.join(PATTERNS)}"
    )


def build_projector(config: Any, vision_dim: int) -> nn.Module:
    """The projector ``config.projector_type`` from ``vision_dim`` features to the LLM's width."""
    return projector_kind(config.projector_type).build(config, vision_dim, int(config.text_config.hidden_size))


def output_layer(projector: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that writes a projector's output: ``projector.output_layer()`` where a
    registered projector defines it, the projector itself for ``linear``, the last layer of an
    ``mlp{N}x_gelu``."""
    own = getattr(projector, "output_layer", None)
    if callable(own):
        return own()
    if isinstance(projector, nn.Linear):
        return projector
    if isinstance(projector, nn.Sequential) and len(projector) and isinstance(projector[-1], nn.Linear):
        return projector[-1]
    raise ValueError(f"{type(projector).__name__} has no output nn.Linear to initialise (define output_layer() on it)")


def zero_output_layer(projector: nn.Module) -> None:
    """Zero the projector's output layer (weights and bias). Every image token then enters the LLM as
    the same zero vector, and the layer grows from there along the gradient of the captions rather than
    from random directions the frozen LLM never saw (the demo's stage 1 measured in docs/demo.md)."""
    layer = output_layer(projector)
    with torch.no_grad():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()


def projector_num_tokens(config: Any, n_in: int) -> int:
    """How many tokens ``config.projector_type`` turns ``n_in`` image tokens into (no module is built)."""
    return projector_kind(config.projector_type).num_tokens(config, n_in)
