"""Condense an image-text pool into a coreset (Bunny-pretrain-LAION-2M's recipe).

Steps: basic filters (off by default) -> spherical k-means -> near-duplicate removal per cluster
-> image-text rank band -> image-centroid rank band -> random sample. See docs/curation.md.

examples:
  # precomputed embeddings in the clip-retrieval layout (img_emb/, text_emb/, metadata/)
  bunny curate --embeddings emb/ --out coreset/ clusters=1000 sample=20000

  # settings from a YAML file (keys as below), on Ray
  bunny curate laion.yaml --embeddings emb/ --out coreset/ --engine ray

  # embed first (a SiglipModel / CLIPModel folder), then curate
  bunny curate --pool pool.json --image-folder images/ --model siglip/ --out coreset/

Writes under --out: kept.parquet (key, caption), dropped.parquet (key, step, duplicate_of),
coreset.json (LLaVA `plain` samples, when image paths are known), funnel.json and funnel.png.

config keys (defaults are the paper's where it gives them): clusters=100, coarse_clusters=0,
kmeans_train_size=100000, kmeans_iters=20, kmeans_rounds=1, dedup_threshold=0.86 (null: off),
keep=median|nearest|farthest|random|largest, block_size=2048, dedup_matmul=auto|float32|bf16,
image_text_band=[0.4,0.6], centroid_band=[0.15,0.35] ([0,1]: off), sample=null, seed=0,
min_caption_words=0, min_caption_chars=0, min_image_side=0, max_aspect_ratio=null,
embed_batch_size=32, shard_size=10000, image_mode=square|pad, bad_images=error|drop, device=cpu,
spill_partition_mb=256, write_scores=false, threads=null, ray_address=null, ray_num_cpus=null, ray_embed_actors=1,
ray_gpus_per_actor=0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from bunny.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="an optional YAML recipe, then config overrides (e.g. clusters=1000 sample=null)")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--embeddings", type=Path, metavar="DIR", help="clip-retrieval layout of precomputed embeddings")
    src.add_argument("--pool", type=Path, metavar="FILE.json", help="LLaVA-format pool of plain samples to embed first")
    src.add_argument("--image-folder", type=Path, metavar="DIR", help="images of --pool are relative to this")
    src.add_argument("--model", type=Path, metavar="CLIP_DIR", help="SiglipModel / CLIPModel folder for --pool")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray")
    # a recipe before the options and overrides after them (`bunny curate c.yaml --out o seed=1`):
    # plain parse_args takes the positionals only once
    p.parse_args = functools.partial(argparse.ArgumentParser.parse_intermixed_args, p)  # type: ignore[method-assign]


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0 and item.endswith((".yaml", ".yml")):
            config = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: expected CONFIG.yaml first, then key=value overrides")
    return config, overrides


def run(args: argparse.Namespace) -> int:
    from .api import run_curation
    from .io import CurateError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bunny").setLevel(logging.INFO)
    try:
        config, overrides = _split(args.items)
        if bool(args.embeddings) == bool(args.pool):
            raise ConfigError("give either --embeddings DIR or --pool FILE.json (with --image-folder and --model)")
        if args.pool and not (args.image_folder and args.model):
            raise ConfigError("--pool needs --image-folder DIR and --model CLIP_DIR")
        result = run_curation(config, out=args.out, embeddings=args.embeddings, pool=args.pool,
                              image_folder=args.image_folder, model=args.model, engine=args.engine,
                              overrides=overrides)
    except (ConfigError, CurateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    steps = result.funnel["steps"]
    total = steps[0]["count"]
    for s in steps:
        off = "" if s.get("enabled", True) else "  (off)"
        print(f"{s['step']:>12}  {s['count']:>12,}  {100 * s['count'] / max(total, 1):6.2f}%  {s['seconds']:8.2f}s{off}")
    print(f"coreset of {result.count:,} samples in {args.out} ({', '.join(result.funnel['outputs'])})")
    return 0
