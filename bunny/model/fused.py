"""Fused element-wise kernels: an LLM's RMSNorms, SiLU-gated MLP products and the training loss's
cross-entropy, each compiled with ``torch.compile`` (only those regions; the matmuls stay eager).

Why it exists: on a CPU, a training step of a real-shaped small LLM spends about as long in element-wise
work as in matmuls. A stage-1 step of SmolLM2-135M (batch 32 x 40 tokens, frozen bf16 weights, bf16
autocast, one thread) profiled at 0.94 s of ``aten::mm`` against ~1.5 s of ``copy_``/``mul``/``add``/
``pow``/``silu``/``log_softmax``: each RMSNorm is a dozen separate passes over the activations forward
and backward (8 ms for 1,280 x 576 in eager, 2.4 ms compiled), the MLP's ``silu(gate) * up`` three more,
and the cross-entropy over 704 x 49,152 bf16 logits 374 ms eager against 131 ms compiled (a float32
copy, a log-softmax, a zero-filled gradient and two more passes, against one loop each way). Compiling
only these regions (inductor, dynamic shapes) fuses each into one loop forward and one backward;
compiling whole decoder layers was measured slower than eager (RESULTS.md). Measured on bunny's own step
with ``benchmarks/bench_fused.py`` (one process, steps interleaved): stage 1 1.23-1.30x, stage 2 1.16x.

Only modules that compute the standard maths are switched, and each kind is checked once against its
own eager forward and backward on a random input before it is used; anything else (Gemma's ``1 + w``
norm, remote code that differs) is left as it was, and an MLP whose activation is not SiLU is not
touched. If compilation fails (no C++ compiler for inductor, an unsupported backend) nothing is
switched and the run goes on eager. The switch is
per module instance (its ``forward``) and one model attribute (``fused_loss``); weights, ``state_dict``
and saving are untouched.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (float32 statistics, the weight applied in the input's dtype), as one region."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Summed cross-entropy in float32 of (bf16 or float32) logits. ``fused``: one compiled kernel each way
    (the float32 copy of the logits, log-softmax, gather; softmax minus one-hot), where eager makes the
    float32 copy, a log-softmax, a zero-filled gradient and two more passes over the 49,152-wide rows."""
    return (_compiled("cross_entropy_sum") if fused else _cross_entropy_sum)(logits, targets)


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def _compiled(name: str) -> Callable[..., torch.Tensor]:
    if name not in _COMPILED:  # one compiled function per kind, shared by every layer (shapes dynamic)
        fn = {"rms_norm": _rms_norm, "silu_gate": _silu_gate, "cross_entropy_sum": _cross_entropy_sum}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _compiled("rms_norm")(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_compiled("silu_gate")(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_silu_mlp(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in ("SiLU", "SiLUActivation"))  # torch's, or transformers' ACT2FN["silu"]


_KINDS: dict[str, tuple[Callable[[torch.nn.Module], bool], Callable[..., torch.Tensor]]] = {
    "RMSNorm": (_is_rms_norm, _norm_forward),
    "SiLU MLP": (_is_silu_mlp, _mlp_forward),
}


def _autocast(device_type: str, dtype: torch.dtype | None):
    """The training run's autocast (off when ``dtype`` is None): checks compile the graph training uses."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _failed(exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"compilation failed: {type(exc).__name__}: {first}"


def _agrees(module: torch.nn.Module, fused: Callable[..., torch.Tensor], autocast_dtype: torch.dtype | None) -> str:
    """'' if the fused forward gives the module's own output and input gradient on a random input, else why not."""
    try:
        weight = next(module.parameters())
    except StopIteration:
        return "no parameters"
    width = getattr(module, "hidden_size", None) or weight.shape[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, int(width), generator=gen).to(weight.device)
    probe = None  # a fixed random direction: a norm's plain sum of squares has a near-zero gradient
    was_training = module.training
    module.eval()  # no LoRA dropout: both forwards see the same weights
    outs, grads = [], []
    try:
        for forward in (type(module).forward, fused):
            xi = x.clone().requires_grad_(True)
            with _autocast(weight.device.type, autocast_dtype):
                y = forward(module, xi)
            if probe is None:
                probe = torch.randn(y.shape, generator=gen).to(weight.device)
            (y.float() * probe).sum().backward(inputs=[xi])
            outs.append(y.detach().float())
            grads.append(xi.grad.float())
    finally:
        module.train(was_training)
    # bf16 autocast rounds the eager path per op and the fused path once: allow a few bf16 ulps
    rtol = 1e-4 if autocast_dtype is None else 3e-2
    for name, (a, b) in {"output": outs, "input gradient": grads}.items():
        scale = a.abs().max().clamp_min(1e-6)
        if not torch.allclose(a, b, rtol=rtol, atol=rtol * float(scale)):
            return f"{name} differs (max {float((a - b).abs().max()):.3g} at scale {float(scale):.3g})"
    return ""


def fuse_elementwise(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Switch every standard RMSNorm and SiLU-gated MLP of ``model`` to the fused kernels; how many of each.

    ``autocast_dtype`` is the training run's autocast (the check runs under it, so the graph compiled
    for it is the one training uses). A module class whose first module disagrees with its eager
    forward, or that fails to compile, is left eager (logged)."""
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for kind, (matches, fused) in _KINDS.items():
        by_class: dict[type, list[torch.nn.Module]] = {}
        for m in model.modules():
            if matches(m) and "forward" not in vars(m):  # not switched already
                by_class.setdefault(type(m), []).append(m)
        for cls, group in by_class.items():
            try:
                why = _agrees(group[0], fused, autocast_dtype)
            except Exception as exc:  # noqa: BLE001 - inductor needs a C++ compiler; a backend may refuse
                why = _failed(exc)
            if why:
                log.warning("fused element-wise kernels: %s (%s) left eager: %s", cls.__name__, kind, why)
                continue
            for m in group:
                m.forward = types.MethodType(fused, m)
            counts[kind] = counts.get(kind, 0) + len(group)
    if counts:
        log.info("fused element-wise kernels: %s (checked and compiled in %.1f s)",
                 ", ".join(f"{n} {k}" for k, n in counts.items()), time.perf_counter() - start)
    return counts


def check_fused_loss(device: torch.device, autocast_dtype: torch.dtype | None) -> str:
    """'' if the compiled cross-entropy gives eager's loss and logit gradient on random logits (in the
    dtype the head makes under ``autocast_dtype``), else why not (a failed compile included)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1000, generator=gen) * 3).to(device, autocast_dtype or torch.float32)
    targets = torch.randint(0, 1000, (6,), generator=gen).to(device)
    try:
        results = []
        for fused in (False, True):
            x = logits.clone().requires_grad_(True)
            with _autocast(device.type, autocast_dtype):
                loss = cross_entropy_sum(x, targets, fused)
            loss.backward()
            results.append((loss.detach(), x.grad.float()))
    except Exception as exc:  # noqa: BLE001 - as in fuse_elementwise
        return _failed(exc)
    (loss_a, grad_a), (loss_b, grad_b) = results
    if not torch.allclose(loss_a, loss_b, rtol=1e-4) or not torch.allclose(grad_a, grad_b, rtol=1e-3, atol=1e-4):
        return "loss or gradient differs"
    return ""


def fuse_loss(model: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Switch a Bunny model's training loss to the compiled cross-entropy if it checks out; whether it did."""
    why = check_fused_loss(device, autocast_dtype)
    if why:
        log.warning("fused cross-entropy left eager: %s", why)
    else:
        log.info("fused cross-entropy: on")
    model.fused_loss = not why
    return not why


def unfuse_elementwise(model: torch.nn.Module) -> int:
    """Give every switched module its class's forward back; how many were switched."""
    n = 0
    for m in model.modules():
        forward: Any = vars(m).get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ in (_norm_forward, _mlp_forward):
            del m.forward
            n += 1
    return n
