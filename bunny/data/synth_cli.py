"""Write the synthetic visual world to disk: a raw image-text pool with injected defects (and their
ground truth), instruction data, and the eight benchmarks in their official layouts.

Example:
    bunny synth --out runs/world --images 3000 --seed 0
    bunny eval --task pope --data runs/world/bench/pope ...   # the benchmarks read like the real ones

Layout: images/, pool.json (plain LLaVA samples), instruct.json (LLaVA JSON), defects.parquet,
scenes.jsonl (the facts of every image), bench/<task>/ and bench/meta.json (chance levels),
world.json (settings and counts). The same seed writes the same files; see docs/synthetic.md.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write the world into")
    p.add_argument("--images", type=int, default=3000, help="pool samples, defects included (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=48, help="image side in pixels, a multiple of the grid (default 48)")
    p.add_argument("--instruct", type=int, default=None, help="image conversations (default: as many as --images)")
    p.add_argument("--bench-size", type=int, default=200, help="about this many questions per benchmark (default 200)")
    p.add_argument("--overwrite", action="store_true", help="rewrite even when the folder holds this exact world")


def run(args: argparse.Namespace) -> int:
    from bunny.data.synthetic import generate_world

    if args.images < 10:
        raise SystemExit("bunny synth: --images must be at least 10")
    w = generate_world(args.out, args.images, args.seed, image_size=args.size, n_instruct=args.instruct,
                       bench_size=args.bench_size, overwrite=args.overwrite)
    how = "reused (same settings)" if w.reused else f"written in {w.seconds:.1f} s"
    print(f"synthetic world in {w.root} ({how})")
    print(f"  pool: {w.counts['pool']} samples, defects {json.dumps(w.counts['defects'])}")
    print(f"  instruct: {w.counts['instruct']} conversations {json.dumps(w.counts['instruct_kinds'])}")
    for task, b in w.bench.items():
        m = b["metrics"][b["headline"]]
        print(f"  bench/{task}: {b['questions']} questions, {b['headline']} chance {m['chance']:.1f} of {m['max']:.0f}")
    return 0
