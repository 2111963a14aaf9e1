"""A Gradio chat page with image upload and streaming answers.

Example:
    bunny web --model runs/demo/final --port 7860
    # then open http://127.0.0.1:7860 and upload an image
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (any layout bunny.load_model reads)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bunny.infer.generate import SamplingParams
    from bunny.infer.loading import load_for_inference
    from bunny.serve.web import build_page

    generator = load_for_inference(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                   trust_remote_code=args.trust_remote_code, model_id=Path(args.model).name)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    page = build_page(generator, params)
    page.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                   share=False, show_error=True)
    return 0
