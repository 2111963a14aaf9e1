"""Export a model folder to another layout.

Examples:
    bunny export --to llava-hf --model runs/stage2/final --out exported/bunny-llava
    bunny export --to bunny --model ~/Bunny-v1_0-3B --out models/bunny-3b   # original release -> ours

--to llava-hf writes a folder that transformers' LlavaForConditionalGeneration and AutoProcessor
load without bunny installed (and serving engines that read that layout: vLLM, SGLang, TGI), giving
the same logits. It needs a SigLIP or CLIP encoder without S^2, the mlp2x_gelu projector, and an LLM
with a bias-free lm_head (not phi-1.5/phi-2/minicpm); anything else is refused with the reason.
--to bunny writes our own layout from any folder bunny.load_model reads (a LoRA run is merged).
--model may be any folder bunny.load_model reads.
"""

from __future__ import annotations

import argparse
import sys

TARGETS = ("llava-hf", "bunny")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, choices=TARGETS, help="target layout")
    p.add_argument("--model", required=True, help="source model folder (any layout bunny.load_model reads)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically if it exists)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as saved)")
    p.add_argument("--trust-remote-code", action="store_true", help="only for generic LLMs that need it")


def run(args: argparse.Namespace) -> int:
    import torch

    from bunny.model.layouts.ours import save_model
    from bunny.model.loading import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model, processor = load_model(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
        if args.to == "llava-hf":
            from bunny.model.layouts.llava import export_llava

            out = export_llava(model, processor, args.out)
        else:
            out = save_model(_merged(model), processor, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bunny export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _merged(model):
    """A LoRA-loaded model with its adapters merged into the LLM (our layout stores plain weights)."""
    from peft import PeftModel

    if isinstance(model.language_model, PeftModel):
        model.language_model = model.language_model.merge_and_unload()
    return model
