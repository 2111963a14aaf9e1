"""Serve a model over an OpenAI-compatible HTTP API.

Example:
    bunny serve --model runs/demo/final --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
            {"type": "text", "text": "What colour is the circle?"}]}]}'

Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY"); the model
name is the folder name unless --model-id says otherwise (see GET /v1/models).
Concurrent requests are batched together (--max-batch, --max-wait-ms); when --max-queue requests
are waiting, new ones get 503. Images must be base64 data: URIs; remote URLs are fetched only with
--allow-remote-images, and server-side paths never.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (any layout bunny.load_model reads)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", default=None, help="name reported by /v1/models (default: folder name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=int, default=16, help="rows per batch (1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before new ones get 503")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (413 above)")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="per-image size limit (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="per-image pixel limit (413 above)")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a client may ask")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off: only data: URIs are accepted)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as saved)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="int8: dynamic int8 on CPU, bitsandbytes 8-bit on CUDA; int4: bitsandbytes NF4 (CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy small CPU)")
    p.add_argument("--template", default=None, help="chat template name (default: the model's)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:

    import uvicorn

    from bunny.infer.loading import load_from_args
    from bunny.serve.app import ServerLimits, create_app
    from bunny.serve.batcher import DynamicBatcher

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    generator = load_from_args(args, model_id=args.model_id)
    batcher = DynamicBatcher(generator, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
                             max_queue=args.max_queue)
    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_bytes=int(args.max_image_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_new_tokens=args.max_new_tokens,
        default_max_tokens=min(256, args.max_new_tokens),
        allow_remote_images=args.allow_remote_images,
    )
    app = create_app(batcher, generator.model_id, api_key=args.api_key, limits=limits)
    print(f"serving {generator.model_id!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        batcher.close()
    return 0
