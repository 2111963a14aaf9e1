"""LoRA's input dropout: masks drawn 4x cheaper, applied in the dtype the adapter's first matmul runs in.

Why: on a CPU, peft's LoRA dropout was a third of a stage-2 step on SmolLM2-135M (7 adapted Linears in
each of 30 layers; benchmarks/RESULTS.md, "LoRA dropout"). Two costs, measured with torch.profiler:

- **The mask.** ``bernoulli_`` draws one double from the generator per element: 11-13 ns an element
  on one thread, 27% of the step. Here each 64-bit word of ``random_`` (the full 64-bit range) gives
  four 16-bit draws; an element is dropped when its draw falls in the lowest ``round(p * 65536)`` of
  the 65,536 values: 2-3 ns an element. The same generator, so ``torch.manual_seed``, checkpointed RNG
  state and gradient checkpointing's replay all hold; the stream differs from ``bernoulli_``'s.
- **peft's float32 round trip.** peft casts the input to the adapters' dtype (float32 master
  weights) *before* its ``nn.Dropout``, and under bf16 autocast ``lora_A`` casts the result back to
  bf16: with a bf16 input (frozen bf16 weights; and the inputs of ``o_proj`` and ``down_proj``, which
  come out of autocast matmuls) that is a float32 copy, product and cast per adapter, and again on
  the way back. Here the mask is made in the compute dtype (bf16's 1.0 is the int16 pattern 0x3F80,
  so the 0/1 draws become a bf16 mask in place) and the input is dropped out in that dtype.

Values: kept elements are ``x * s`` with ``s = 65536 / (65536 - round(p * 65536))`` (so the expectation
is exactly ``x``), computed in float32 and rounded to the compute dtype, as peft's path rounds them;
p itself moves by at most 1/131,072 (0.05 becomes 0.0500031). Not PyTorch's own bf16 dropout: it
rounds 1/(1-p) to bf16 first (1/0.95 becomes 1.0547, a 0.2% bias).

Off the fast path, peft's own path runs unchanged (cast to the adapters' dtype, ``F.dropout``): another
device than the CPU (CUDA's dropout is one fused kernel already; not measured here), a p under 1/1,000
(where 1/65,536 steps would move it by more than 1%), and dtypes other than float32/bf16/fp16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: the devices the fast path runs on
FAST_DEVICES = ("cpu",)
#: the smallest p the 16-bit draws represent within 1%
MIN_FAST_P = 1e-3
#: 1.0 as the int16 bit pattern of each 16-bit float type (the 0/1 draws times this, viewed as floats)
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}
_LEVELS = 65536


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, float]:
    """A 0/1 ``dtype`` mask of ``shape`` keeping each element with probability ``1 - round(p * 65536) /
    65536``, from the default generator (four 16-bit draws per 64-bit word), and the scale that keeps
    the expectation (``1 / keep``)."""
    n = math.prod(shape)
    dropped = round(p * _LEVELS)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2 ** 63), None)
    draws = words.view(torch.int16)[:n].view(shape)  # each uniform on [-32768, 32767]
    keep = draws.ge_(dropped - _LEVELS // 2)  # in place: int16 0/1
    if dtype in _ONE_BITS:
        mask = keep.mul_(_ONE_BITS[dtype]).view(dtype)
    else:
        mask = keep.to(dtype)
    return mask, _LEVELS / (_LEVELS - dropped)


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here (a Linear then computes in its dtype)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def fast_mask_for(x: torch.Tensor, p: float) -> bool:
    """Whether :func:`keep_mask` serves a dropout of ``p`` on ``x`` (its device, p's size, x's dtype)."""
    return x.device.type in FAST_DEVICES and p >= MIN_FAST_P and x.dtype in (torch.float32, *_ONE_BITS)


class ComputeDtypeDropout(nn.Module):
    """The dropout of one LoRA adapter, with peft's input cast folded in (see the module docstring).

    ``lora_A`` is held outside the module tree (no parameters are registered twice) so that the cast
    reads its weight's dtype at call time, as peft does."""

    def __init__(self, p: float, lora_a: nn.Module):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoRA dropout: p must be in [0, 1), got {p}")
        self.p = p
        self._lora_a = (lora_a,)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype ``lora_A``'s matmul runs in for this input."""
        if autocasting(x.device.type):  # autocast casts a Linear's floating inputs, whatever they are
            return torch.get_autocast_dtype(x.device.type)
        return self._lora_a[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight_dtype, dt = self._lora_a[0].weight.dtype, self.compute_dtype(x)
        if x.dtype not in (dt, weight_dtype):  # peft's cast, where lora_A could not take x as it is
            x = x.to(weight_dtype)
        if not self.training or self.p == 0:
            return x
        if not (fast_mask_for(x, self.p) and dt in (torch.float32, *_ONE_BITS) and x.dtype in (dt, torch.float32)):
            return F.dropout(x.to(weight_dtype), self.p, True)  # peft's path
        mask, scale = keep_mask(x.shape, self.p, dt, x.device)
        if x.dtype == dt:
            return (x * mask).mul_(scale)
        return (x * scale).to(dt).mul_(mask)  # a float32 input to a bf16 matmul: one float32 pass, then bf16

    def extra_repr(self) -> str:
        return f"p={self.p}, in lora_A's compute dtype"


def is_plain_lora_linear(module: nn.Module) -> bool:
    """peft's plain LoRA Linear: not quantized, and no adapter with DoRA or another variant (a variant
    calls peft's input cast itself, so that cast must stay on), over an ``nn.Linear``."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return False
    return (type(module) is Linear and not getattr(module, "lora_variant", None)
            and type(module.base_layer) is nn.Linear)


def _plain_lora_linears(model: nn.Module):
    for module in model.modules():
        if is_plain_lora_linear(module):
            yield module


def use_compute_dtype_dropout(model: nn.Module) -> int:
    """Swap the dropouts of every plain LoRA Linear of ``model`` that has a dropout for
    :class:`ComputeDtypeDropout` and turn peft's own input cast off there (the new modules cast when
    they must: so a dropout-0 adapter beside one with dropout gets one too, with p 0). Returns how many
    adapters changed; Linears whose adapters all have dropout 0 (peft's ``nn.Identity``) are left alone."""
    changed = 0
    for module in _plain_lora_linears(model):
        drops = module.lora_dropout
        if not any(type(d) is nn.Dropout and d.p > 0 for d in drops.values()):
            continue
        for name in module.lora_A:
            p = drops[name].p if type(drops[name]) is nn.Dropout else 0.0
            drops[name] = ComputeDtypeDropout(p, module.lora_A[name])
            changed += 1
        module.cast_input_dtype_enabled = False
    return changed


def use_peft_dropout(model: nn.Module) -> int:
    """Undo :func:`use_compute_dtype_dropout` (peft's modules and input cast back); the baseline of
    ``benchmarks/bench_fused.py --lever lora-dropout``. Returns how many adapters changed."""
    changed = 0
    for module in _plain_lora_linears(model):
        for name, drop in list(module.lora_dropout.items()):
            if isinstance(drop, ComputeDtypeDropout):
                module.lora_dropout[name] = nn.Dropout(drop.p) if drop.p > 0 else nn.Identity()
                module.cast_input_dtype_enabled = True
                changed += 1
    return changed
