"""Serve a model over an OpenAI-compatible HTTP API.

Example:
    bunny serve --model runs/demo/final --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What colour is the circle?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'

Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...").
Concurrent requests are batched together (--max-batch, --max-wait-ms); when --max-queue requests
are waiting, new ones get 503.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (any layout bunny.load_model reads)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", default=None, help="name reported by /v1/models (default: folder name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=int, default=16, help="rows per batch (1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=256, help="pending requests before 503")
    p.add_argument("--max-body-mb", type=float, default=20.0)
    p.add_argument("--max-image-mb", type=float, default=10.0)
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a client may ask")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as saved)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: dynamic int8 quantisation of Linear layers (CPU)")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from bunny.infer.loading import load_for_inference
    from bunny.serve.app import ServerLimits, create_app
    from bunny.serve.batcher import DynamicBatcher

    generator = load_for_inference(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                   trust_remote_code=args.trust_remote_code,
                                   model_id=args.model_id or Path(args.model).name)
    batcher = DynamicBatcher(generator, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
                             max_queue=args.max_queue)
    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_bytes=int(args.max_image_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_new_tokens=args.max_new_tokens,
    )
    app = create_app(batcher, generator.model_id, api_key=args.api_key, limits=limits)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        batcher.close()
    return 0
