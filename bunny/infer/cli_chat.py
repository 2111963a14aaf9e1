"""Chat with a model about an image, streaming the answer.

Examples:
    bunny chat --model runs/demo/final --image scene.png --prompt "How many objects are there?"
    bunny chat --model runs/demo/final --image scene.png        # interactive, multi-turn

Interactive commands: /image PATH (switch to another image; starts a new conversation),
/reset (forget the conversation), /exit. Decoding is greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (any layout bunny.load_model reads)")
    p.add_argument("--image", default=None, help="image file to talk about")
    p.add_argument("--prompt", default=None, help="one question; without it, an interactive session")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--trust-remote-code", action="store_true")


def _load_image(path: str):  # noqa: ANN202
    from bunny.data.images import load_image

    return load_image(path)


def run(args: argparse.Namespace) -> int:
    from bunny.data.images import ImageError
    from bunny.infer.chat import ChatSession
    from bunny.infer.generate import SamplingParams
    from bunny.infer.loading import load_for_inference

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)
    generator = load_for_inference(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                   trust_remote_code=args.trust_remote_code)
    session = ChatSession(generator, params=params)
    if args.image:
        try:
            session.set_image(_load_image(args.image))
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    def stream(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if args.prompt is not None:
        session.ask(args.prompt, on_text=stream)
        sys.stdout.write("\n")
        return 0

    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("USER: ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            print("(conversation reset)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(_load_image(path))
                print(f"(image: {path}; new conversation)")
            except ImageError as exc:
                print(f"error: {exc}")
            continue
        sys.stdout.write("ASSISTANT: ")
        session.ask(line, on_text=stream)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
