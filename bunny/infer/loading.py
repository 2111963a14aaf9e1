"""Load a model folder for inference: dtype, device, optional quantisation -> a Generator.

Quantisation (``--quantize``) touches only the language model: it holds nearly all the weights and
all the per-token matmuls, while the vision tower runs once per image and keeps its accuracy.
- ``int8`` on CPU: PyTorch's dynamic int8 quantisation of the Linear layers (weights int8,
  activations quantised on the fly), the fastest CPU option that needs no calibration.
- ``int8`` / ``int4`` on CUDA: bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (NF4), as
  transformers' ``BitsAndBytesConfig`` would do, applied to the already loaded model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from bunny.infer.generate import Generator

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
QUANTIZE_CHOICES = ("none", "int8", "int4")


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def quantize_int8_dynamic(model: Any) -> Any:
    """CPU: dynamic int8 quantisation of the language model's Linear layers (in place)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not pinned to our torch.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        model.language_model = quantize_dynamic(model.language_model.float(), {nn.Linear}, dtype=torch.qint8)
    return model


def quantize_bnb(model: Any, bits: int, device: str | torch.device = "cuda",
                 compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """bitsandbytes 8-bit (``Linear8bitLt``) or 4-bit NF4 (``Linear4bit``) Linear layers in the language
    model, except the output head; the weights are quantised when the model moves to ``device``."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RuntimeError("4/8-bit CUDA quantisation needs bitsandbytes: pip install 'bunny[quant]'") from exc

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and child is not model.language_model.get_output_embeddings():
                has_bias = child.bias is not None
                weight = child.weight.data.to(compute_dtype if bits == 4 else torch.float16)
                if bits == 8:
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                              has_fp16_weights=False, threshold=6.0)
                    new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
                else:
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                            compute_dtype=compute_dtype, quant_type="nf4")
                    new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                if has_bias:
                    new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(module, name, new)
            else:
                swap(child)

    swap(model.language_model)
    return model.to(device)


def generator_for(model: Any, processor: Any, template: str | None = None, model_id: str = "bunny") -> Generator:
    """A :class:`Generator` prompting with the model's own chat template, or with ``template`` (a
    registered name) and its stop strings instead, as ``bunny eval --template`` does."""
    if template is None:
        return Generator(model, processor, model_id=model_id)
    from bunny.data.templates import get_template
    from bunny.infer.generate import template_renderer

    t = get_template(template)
    return Generator(model, processor, render=template_renderer(t), model_id=model_id, stop=t.stop_strings)


def check_template(name: str | None) -> None:
    """A ``--template`` name must be registered (ValueError naming the known ones), checked before
    the slow model load."""
    if name is not None:
        from bunny.data.templates import get_template

        try:
            get_template(name)
        except KeyError as exc:
            raise ValueError(f"--template: {exc}") from None


def load_for_inference(path: str, dtype: str | None = None, device: str | None = None, quantize: str = "none",
                       trust_remote_code: bool = False, model_id: str = "bunny", template: str | None = None
                       ) -> Generator:
    """``bunny.load_model`` + quantisation -> a :class:`Generator` (the model in eval mode);
    ``template`` overrides the chat template the model folder names."""
    from bunny.model.loading import load_model

    check_template(template)
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = str(device).startswith("cuda")
    if quantize == "int4" and not on_cuda:
        raise ValueError("--quantize int4 is bitsandbytes NF4 and needs CUDA; on CPU use --quantize int8")
    if quantize != "none" and on_cuda:
        model, processor = load_model(path, dtype=resolve_dtype(dtype), device="cpu",
                                      trust_remote_code=trust_remote_code)
        model = quantize_bnb(model, 8 if quantize == "int8" else 4, device=device,
                             compute_dtype=resolve_dtype(dtype) or torch.bfloat16)
    else:
        model, processor = load_model(path, dtype=resolve_dtype(dtype), device=device,
                                      trust_remote_code=trust_remote_code)
        if quantize == "int8":
            model = quantize_int8_dynamic(model)
    model.eval()
    return generator_for(model, processor, template, model_id=model_id)


def load_from_args(args: Any, model_id: str | None = None) -> Generator:
    """The CLI verbs' loader (``--model --dtype --device --quantize --trust-remote-code``, and
    ``--template`` where the verb has it): a bad folder or option is one ``error:`` line and exit
    status 2, not a traceback."""
    import sys
    from pathlib import Path

    try:
        return load_for_inference(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                  trust_remote_code=args.trust_remote_code,
                                  model_id=model_id or Path(args.model).resolve().name,
                                  template=getattr(args, "template", None))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
