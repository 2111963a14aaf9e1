"""Chat with a model about one or several images, streaming the answer.

Examples:
    bunny chat --model runs/demo/final --image scene.png --prompt "How many objects are there?"
    bunny chat --model runs/demo/final --image a.png --image b.png --prompt "What differs?"
    bunny chat --model runs/demo/final --image scene.png        # interactive, multi-turn
    printf 'What colour is it?\\n/image other.png\\nAnd this one?\\n' | bunny chat --model runs/demo/final
    bunny chat --model BUNNY_RELEASE --template bunny-llama3    # prompt with another chat template

Interactive commands: /image PATH (add an image to the conversation: the next question sees it and
everything before it), /reset (forget the conversation and its images), /exit. Decoding is greedy
unless --temperature > 0.
On a terminal the session shows "USER:" / "ASSISTANT:" prompts; from a pipe it prints one
answer per input line, so scripts can read the replies line by line.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (any layout bunny.load_model reads)")
    p.add_argument("--image", action="append", default=[],
                   help="image file to talk about (repeat for several: --image a.png --image b.png)")
    p.add_argument("--prompt", default=None, help="one question; without it, an interactive session")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as saved)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="int8: dynamic int8 on CPU, bitsandbytes 8-bit on CUDA; int4: bitsandbytes NF4 (CUDA)")
    p.add_argument("--template", default=None, help="chat template name (default: the model's)")
    p.add_argument("--trust-remote-code", action="store_true")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from bunny.data.images import ImageError, load_image
    from bunny.infer.chat import ChatSession
    from bunny.infer.generate import SamplingParams
    from bunny.infer.loading import check_template, load_from_args

    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = []
    try:  # check the images and the template before the (slow) model load
        images = [load_image(path) for path in args.image]
        check_template(args.template)
    except (ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a loading bar has no place in a chat transcript
    generator = load_from_args(args)
    session = ChatSession(generator, params=params)
    for image in images:
        session.add_image(image)

    if args.prompt is not None:
        try:
            session.ask(args.prompt, on_text=_write)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _write("\n")
        return 0

    tty = sys.stdin.isatty()
    if tty:
        print("Type a question; /image PATH adds an image, /reset forgets, /exit quits.", flush=True)
    try:
        while True:
            if tty:
                _write("USER: ")
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
                print("(conversation reset)", flush=True)
                continue
            if line == "/image" or line.startswith("/image "):
                path = line[len("/image"):].strip()
                if not path:
                    print("error: /image needs a path", flush=True)
                    continue
                try:
                    session.add_image(load_image(path))
                    print(f"(image: {path}; the next question sees it)", flush=True)
                except ImageError as exc:
                    print(f"error: {exc}", flush=True)
                continue
            if line.startswith("/"):
                print(f"error: unknown command {line.split()[0]} (/image PATH, /reset, /exit)", flush=True)
                continue
            try:
                session.validate_next(line)
            except ValueError as exc:
                print(f"error: {exc} (/reset starts over)", flush=True)
                continue
            if tty:
                _write("ASSISTANT: ")
            session.ask(line, on_text=_write)
            _write("\n")
    except KeyboardInterrupt:
        _write("\n")
        return 130
    return 0
