"""Load a model folder for inference: dtype, device, optional int8 quantisation -> a Generator."""

from __future__ import annotations

from typing import Any

import torch

from bunny.infer.generate import Generator

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantisation of the LLM's Linear layers (CPU inference).

    Why only the language model: it holds nearly all the weights and all the decode-time matmuls;
    the vision tower runs once per image and keeps its accuracy in float.
    """
    from torch.ao.quantization import quantize_dynamic

    model.language_model = quantize_dynamic(model.language_model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def load_for_inference(path: str, dtype: str | None = None, device: str | None = None, quantize: str = "none",
                       trust_remote_code: bool = False, model_id: str = "bunny") -> Generator:
    from bunny.model.checkpoints import load_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_model(path, dtype=resolve_dtype(dtype), device=device,
                                  trust_remote_code=trust_remote_code)
    model.eval()
    if quantize == "int8":
        if device != "cpu":
            raise ValueError("--quantize int8 is dynamic CPU quantisation; on CUDA load 4/8-bit with bitsandbytes")
        model = quantize_int8(model)
    return Generator(model, processor, model_id=model_id)
