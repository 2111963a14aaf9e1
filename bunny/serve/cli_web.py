"""A Gradio chat page with image upload and streaming.

Example:
    bunny web --model runs/demo/final --port 7860
    # then open http://127.0.0.1:7860, attach an image and ask about it; images attached to later
    # messages join the conversation
    bunny web --model BUNNY_RELEASE --template bunny-llama3   # prompt with another chat template
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (any layout bunny.load_model reads)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-image-mb", type=float, default=10.0, help="upload size limit")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as saved)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="int8: dynamic int8 on CPU, bitsandbytes 8-bit on CUDA; int4: bitsandbytes NF4 (CUDA)")
    p.add_argument("--template", default=None, help="chat template name (default: the model's)")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:

    from bunny.infer.generate import SamplingParams
    from bunny.infer.loading import load_from_args
    from bunny.serve.web import build_page

    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    generator = load_from_args(args)
    page = build_page(generator, params, max_image_pixels=args.max_image_pixels)
    page.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=False, show_error=True, inbrowser=False,
        max_file_size=f"{max(1, int(args.max_image_mb * 1024))}kb")
    return 0
