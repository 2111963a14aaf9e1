"""The ``bunny`` command: parses the verb and dispatches to the package that owns it.

Each verb lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int`` (and
optionally ``description() -> str`` for help text built at run time);
modules are imported lazily so ``bunny --help`` stays fast and one broken verb cannot break others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("bunny.demo", "the whole recipe on the synthetic world, nothing downloaded"),
    "synth": ("bunny.data.synth_cli", "write the synthetic visual world to disk"),
    "backbones": ("bunny.backbones.cli", "train the demo's small backbones (the shipped set)"),
    "curate": ("bunny.curate.cli", "condense an image-text pool into a coreset"),
    "train": ("bunny.train.cli", "run one training stage from a YAML config"),
    "eval": ("bunny.eval.cli_eval", "generate answers on benchmarks and score them"),
    "score": ("bunny.eval.cli_score", "score an answers file"),
    "chat": ("bunny.infer.cli_chat", "chat with a model about an image"),
    "serve": ("bunny.serve.cli_serve", "OpenAI-compatible HTTP API"),
    "web": ("bunny.serve.cli_web", "Gradio chat page"),
    "merge": ("bunny.train.cli_merge", "merge a LoRA run into its base model"),
    "average": ("bunny.train.cli_average", "average the weights of several model folders"),
    "export": ("bunny.model.cli_export", "export a model folder to another layout"),
}


def describe(module: object, help_text: str) -> str:
    """A verb's long help: its module's ``description()`` when it has one (help text derived from a
    registry, e.g. ``bunny eval``'s task list), else the module docstring."""
    describe_fn = getattr(module, "description", None)
    text = describe_fn() if callable(describe_fn) else getattr(module, "__doc__", None)
    return (text or help_text).strip()


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="bunny", description="Small multimodal LLMs, data-centric.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    modules: dict[str, object] = {}
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            verb,
            help=help_text,
            description=describe(module, help_text),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        modules[verb] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the verb's own module when possible (fast start, isolated failures).
    if argv and argv[0] in VERBS:
        module = importlib.import_module(VERBS[argv[0]][0])
        p = argparse.ArgumentParser(
            prog=f"bunny {argv[0]}",
            description=describe(module, VERBS[argv[0]][1]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        args = p.parse_args(argv[1:])
        return int(module.run(args) or 0)
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
