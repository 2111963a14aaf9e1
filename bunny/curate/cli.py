"""Condense an image-text pool into a coreset (Bunny-pretrain-LAION-2M's recipe).

Steps: basic filters (off by default) -> spherical k-means -> near-duplicate removal per cluster
-> image-text rank band -> image-centroid rank band -> random sample. See docs/curate.md.

examples:
  # precomputed embeddings in the clip-retrieval layout (img_emb/, text_emb/, metadata/)
  bunny curate --embeddings emb/ --out coreset/ clusters=1000 sample=20000

  # the paper's settings from a recipe, on Ray
  bunny curate configs/curate/bunny-laion-2m.yaml --embeddings emb/ --out coreset/ --engine ray

  # embed first (a SiglipModel / CLIPModel folder), then curate
  bunny curate --pool pool.json --image-folder images/ --model siglip/ --out coreset/

Writes under --out: kept.parquet (key, caption), dropped.parquet (key, step, duplicate_of),
coreset.json (LLaVA `plain` samples, when image paths are known), funnel.json and funnel.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bunny.config import ConfigError, load_config


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
    from .config import CurateConfig
    from .io import CurateError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bunny").setLevel(logging.INFO)
    try:
        config, overrides = _split(args.items)
        cfg = load_config(CurateConfig, config, overrides)
        if bool(args.embeddings) == bool(args.pool):
            raise ConfigError("give either --embeddings DIR or --pool FILE.json (with --image-folder and --model)")
        if args.pool and not (args.image_folder and args.model):
            raise ConfigError("--pool needs --image-folder DIR and --model CLIP_DIR")
        funnel = _curate(args, cfg)
    except (ConfigError, CurateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = funnel["steps"][0]["count"]
    for s in funnel["steps"]:
        off = "" if s.get("enabled", True) else "  (off)"
        print(f"{s['step']:>12}  {s['count']:>12,}  {100 * s['count'] / max(total, 1):6.2f}%  {s['seconds']:8.2f}s{off}")
    print(f"coreset of {funnel['steps'][-1]['count']:,} samples in {args.out}")
    return 0


def _curate(args: argparse.Namespace, cfg) -> dict:
    if args.engine == "local":
        from .pipeline import run_local

        emb = args.embeddings
        if args.pool:
            from .embed import embed_pool

            emb = embed_pool(args.pool, args.image_folder, args.model, args.out / "embeddings", cfg)
        return run_local(emb, args.out, cfg)
    from .ray_engine import embed_pool_ray, ray_session, run_ray

    with ray_session(cfg):
        emb = args.embeddings
        if args.pool:
            emb = embed_pool_ray(args.pool, args.image_folder, args.model, args.out / "embeddings", cfg)
        return run_ray(emb, args.out, cfg)
