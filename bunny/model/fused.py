"""Fused element-wise kernels: an LLM's RMSNorms, SiLU-gated MLP products, Llama-style attention blocks'
rotary embeddings and the training loss's cross-entropy, each compiled with ``torch.compile`` (only those
regions; the matmuls stay eager).

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
The attention blocks (on ``bunny_sdpa``) came later: their rotary embedding, ten eager passes over q and k
forward, is one compiled pass that also writes q and k as the float32 ``(B, H, T, D)`` tensors
``grouped_attention`` reads (1.09x more in stage 1, ``--lever rotary``). A block hands anything else
(a KV cache, long keys, attention dropout) to its class's own forward. peft's LoRA Linears (stage 2) came
last and compile nothing: their forward is folded (``_lora_forward``: the LoRA product added to the base
output by one ``addmm`` whose ``alpha`` carries LoRA's scaling and the dropout's scale), which drops
peft's full-width multiply, rounding and add (``--lever lora-linear``).

Only modules that compute the standard maths are switched, and each kind is checked once against its
own eager forward and backward on a random input before it is used; anything else (Gemma's ``1 + w``
norm, remote code that differs) is left as it was, and an MLP whose activation is not SiLU is not
touched. If compilation fails (no C++ compiler for inductor, an unsupported backend) nothing is
switched and the run goes on eager. The switch is
per module instance (its ``forward``) and one model attribute (``fused_loss``); weights, ``state_dict``
and saving are untouched.
"""

from __future__ import annotations

import copy
import logging
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from bunny.model import attention, lora_dropout

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


def _rotary_heads_first(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding of ``(B, T, H, D)`` projections, in float32, returned as contiguous
    ``(B, H, T, D)``: one pass over each of q and k (eager makes ten, then the attention a float32 copy)."""
    cos, sin = cos.float().unsqueeze(2), sin.float().unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return rotate(query).transpose(1, 2).contiguous(), rotate(key).transpose(1, 2).contiguous()


def _compiled(name: str) -> Callable[..., torch.Tensor]:
    if name not in _COMPILED:  # one compiled function per kind, shared by every layer (shapes dynamic)
        fn = {"rms_norm": _rms_norm, "silu_gate": _silu_gate, "cross_entropy_sum": _cross_entropy_sum,
              "rotary": _rotary_heads_first}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _compiled("rms_norm")(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_compiled("silu_gate")(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A Llama-style attention block whose rotary embedding is one compiled pass feeding ``bunny_sdpa``'s
    grouped float32 attention. Only where that attention would run anyway (a CPU tensor, keys at most
    ``CPU_MATH_MAX_KV`` long, no KV cache, no attention dropout, an SDPA mask); anything else (generation
    with a cache, long sequences, another attention implementation) takes the class's own forward."""
    if (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or position_embeddings is None
            or self.config._attn_implementation != attention.NAME
            or not attention.short_on_cpu(hidden_states.device, hidden_states.shape[-2])
            or not attention.groupable(self, attention_mask, getattr(self, "attention_dropout", 0.0), kwargs)):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query = self.q_proj(hidden_states).view(shape)
    key = self.k_proj(hidden_states).view(shape)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    query, key = _compiled("rotary")(query, key, *position_embeddings)
    out = attention.grouped_attention(query, key, value, attention_mask, self.scaling,
                                      getattr(self, "is_causal", True), out_dtype=value.dtype)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None


def _lora_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear (``base(x) + lora_B(lora_A(dropout(x))) * scaling``) in fewer passes: the dropout's
    0/1 mask without its scale, then one ``addmm`` that adds ``lora_B``'s product to the base output with
    LoRA's scaling and the dropout's scale as its ``alpha``. peft multiplies the full-width output by
    ``scaling``, rounds it and adds it in separate passes, and the dropout scales its full-width input;
    here the GEMM does both in its float32 accumulator. The same maths, rounded once instead of three times.

    Anything else takes peft's forward: several active adapters, ``adapter_names`` batches, merged or
    disabled adapters, a LoRA bias, DeepSpeed-partitioned weights (their gather hooks are on the
    modules this bypasses), and an input ``lora_A`` cannot take as it is."""
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (args or kwargs or name not in self.lora_A or self.disable_adapters or self.merged
            or self.lora_B[name].bias is not None or hasattr(self.lora_B[name].weight, "ds_id")
            or not (lora_dropout.autocasting(x.device.type) or x.dtype == self.lora_A[name].weight.dtype)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    alpha = float(self.scaling[name])
    p = float(getattr(self.lora_dropout[name], "p", 0.0))
    h = x
    if self.training and p > 0:
        if lora_dropout.fast_mask_for(x, p):
            mask, scale = lora_dropout.keep_mask(x.shape, p, x.dtype, x.device)
            h, alpha = x * mask, alpha * scale
        else:
            h = self.lora_dropout[name](x)
    h = self.lora_A[name](h)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                      self.lora_B[name].weight.t(), alpha=alpha)
    return out.view(result.shape)


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_silu_mlp(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in ("SiLU", "SiLUActivation"))  # torch's, or transformers' ACT2FN["silu"]


_OTHER_ATTENTION_MATHS = ("q_norm", "k_norm", "attn_logit_softcapping", "sinks", "qk_norm", "rotary_ndims")
"""Attributes of attention classes that compute more than Llama's attention: never switched."""


def _is_rotary_attention(module: torch.nn.Module) -> bool:
    return (type(module).__name__.endswith("Attention")
            and all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and isinstance(getattr(module, "head_dim", None), int) and isinstance(getattr(module, "scaling", None), float)
            and all(getattr(module, n, None) is None for n in _OTHER_ATTENTION_MATHS)
            and getattr(getattr(module, "config", None), "_attn_implementation", None) == attention.NAME)


def _call(forward: Callable[..., Any], module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return forward(module, x)


def _call_attention(forward: Callable[..., Any], module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An attention block on ``x`` with random rotary angles and a causal mask whose second row is padded."""
    b, t = x.shape[:2]
    gen = torch.Generator().manual_seed(1)
    angles = torch.rand(1, t, module.head_dim // 2, generator=gen) * 6.3  # one row of positions, as usual
    angles = torch.cat((angles, angles), dim=-1).to(x.device)
    valid = torch.arange(t)[None] < torch.tensor([[t], [t - 2]])
    mask = (torch.ones(t, t, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]).to(x.device)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # as the rotary module returns them
    return forward(module, x, position_embeddings=(cos, sin), attention_mask=mask)[0]


_KINDS: dict[str, tuple[Callable[[torch.nn.Module], bool], Callable[..., Any], Callable[..., torch.Tensor]]] = {
    "RMSNorm": (_is_rms_norm, _norm_forward, _call),
    "SiLU MLP": (_is_silu_mlp, _mlp_forward, _call),
    "rotary attention": (_is_rotary_attention, _attention_forward, _call_attention),
    "LoRA Linear": (lora_dropout.is_plain_lora_linear, _lora_forward, _call),
}


def _autocast(device_type: str, dtype: torch.dtype | None):
    """The training run's autocast (off when ``dtype`` is None): checks compile the graph training uses."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _failed(exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"compilation failed: {type(exc).__name__}: {first}"


def _agrees(module: torch.nn.Module, fused: Callable[..., Any], autocast_dtype: torch.dtype | None,
            call: Callable[..., torch.Tensor] = _call) -> str:
    """'' if the fused forward gives the module's own output and input gradient on a random input, else why not.

    In low precision (bf16 autocast or weights) the two round at different places, and where the random
    input makes the maths ill-conditioned (attention on real weights) both can be far from exact float32
    maths. So a fused forward that differs from eager by more than a few bf16 ulps still passes if it is
    no farther than eager from the float32 result of the same module (a float32 copy, no autocast)."""
    try:
        weight = next(module.parameters())
    except StopIteration:
        return "no parameters"
    width = getattr(module, "hidden_size", None) or weight.shape[-1]
    gen = torch.Generator().manual_seed(0)
    # in the weights' dtype, as the residual stream is in training: the graph compiled here is the one used
    x = torch.randn(2, 7, int(width), generator=gen).to(weight.device, weight.dtype)
    # a norm's plain sum of squares has ~0 gradient: weigh the output by a random probe of its own shape
    def probe(y: torch.Tensor) -> torch.Tensor:
        return torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)

    def run(forward: Callable[..., Any], target: torch.nn.Module, inp: torch.Tensor,
            dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        xi = inp.clone().requires_grad_(True)
        with _autocast(weight.device.type, dtype):
            y = call(forward, target, xi)
        (y.float() * probe(y)).sum().backward(inputs=[xi])
        return y.detach().float(), xi.grad.float()

    was_training = module.training
    module.eval()  # no LoRA dropout: both forwards see the same weights
    try:
        eager, ours = run(type(module).forward, module, x, autocast_dtype), run(fused, module, x, autocast_dtype)
        exact = autocast_dtype is None and x.dtype == torch.float32
        # bf16 autocast rounds the eager path per op and the fused path once: allow a few bf16 ulps
        rtol = 1e-4 if exact else 3e-2
        scales = [float(a.abs().max().clamp_min(1e-6)) for a in eager]
        close = [torch.allclose(a, b, rtol=rtol, atol=rtol * sc) for a, b, sc in zip(eager, ours, scales)]
        reference = None
        if not all(close) and not exact:
            reference = run(type(module).forward, copy.deepcopy(module).float(), x.float(), None)
    finally:
        module.train(was_training)
    for i, name in enumerate(("output", "input gradient")):
        a, b, scale = eager[i], ours[i], scales[i]
        if close[i]:
            continue
        if reference is None:
            return f"{name} differs (max {float((a - b).abs().max()):.3g} at scale {scale:.3g})"
        err_eager, err_ours = float((a - reference[i]).abs().max()), float((b - reference[i]).abs().max())
        if err_ours > 1.25 * err_eager + 1e-6 * scale:
            return (f"{name} differs from float32 maths more than eager does ({err_ours:.3g} against "
                    f"{err_eager:.3g} at scale {scale:.3g})")
    return ""


def fuse_elementwise(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Switch every standard RMSNorm and SiLU-gated MLP of ``model`` to the fused kernels; how many of each.

    ``autocast_dtype`` is the training run's autocast (the check runs under it, so the graph compiled
    for it is the one training uses). A module class whose first module disagrees with its eager
    forward, or that fails to compile, is left eager (logged)."""
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for kind, (matches, fused, call) in _KINDS.items():
        by_class: dict[type, list[torch.nn.Module]] = {}
        for m in model.modules():
            if matches(m) and "forward" not in vars(m):  # not switched already
                by_class.setdefault(type(m), []).append(m)
        for cls, group in by_class.items():
            try:
                why = _agrees(group[0], fused, autocast_dtype, call)
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
    # wider than 4,096 like an LLM's vocabulary: inductor specialises its kernel on that side of 4,096
    logits = (torch.randn(6, 8192, generator=gen) * 3).to(device, autocast_dtype or torch.float32)
    targets = torch.randint(0, 8192, (6,), generator=gen).to(device)
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


def unfuse_elementwise(model: torch.nn.Module, kinds: tuple[str, ...] | None = None) -> int:
    """Give every switched module (of ``kinds``, names of ``_KINDS``; default all) its class's forward back;
    how many were switched."""
    fused = {spec[1] for kind, spec in _KINDS.items() if kinds is None or kind in kinds}
    n = 0
    for m in model.modules():
        forward: Any = vars(m).get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ in fused:
            del m.forward
            n += 1
    return n
