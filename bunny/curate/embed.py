"""Step 1: embed an image-caption pool with a CLIP-like model folder, written as clip-retrieval shards.

The pool is a LLaVA-format JSON list of `plain` samples (``{"id", "image", "conversations":
[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}``). The model folder
is a Hugging Face ``SiglipModel`` or ``CLIPModel`` checkpoint with its tokenizer and image
processor (``get_image_features`` / ``get_text_features``). Images are decoded with
``bunny.data.images.load_image`` (bomb and truncation guards) and preprocessed by the folder's own
image processor (``image_mode: pad`` pads to a square with its mean colour first).

Resumable: the pool is cut into shards of ``shard_size`` samples; a shard whose metadata file
exists is done (metadata is written last, by rename). ``embed.json`` records what the folder was
made from; resuming with another pool, model or shard size is an error, not a silent mix.
Basic filters run before embedding (no compute for dropped samples) and, with
``bad_images: drop``, unreadable images are dropped; both are listed in
``dropped_before_embedding.parquet`` so the funnel still starts from the whole pool.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from bunny.data.images import ImageError, expand_to_square, load_image, mean_fill

from .config import CurateConfig
from .io import CurateError, write_shard
from .pipeline import EMBED_STATS, PRE_DROPPED
from .select import basic_filter


def load_pool(path: str | Path) -> list[dict[str, str]]:
    """Read and check the pool: a list of ``{"id", "image", "caption"}``; errors name the sample."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CurateError(f"{path}: cannot read the pool JSON: {exc}") from exc
    if not isinstance(data, list):
        raise CurateError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    pool, seen = [], {}
    for i, s in enumerate(data):
        where = f"{path}: sample {i}"
        if not isinstance(s, dict):
            raise CurateError(f"{where}: expected an object, got {type(s).__name__}")
        if "id" not in s:
            raise CurateError(f"{where}: no `id`")
        sid = str(s["id"])
        if sid in seen:
            raise CurateError(f"{where}: duplicate id {sid!r} (also sample {seen[sid]}); ids must be unique")
        seen[sid] = i
        if not isinstance(s.get("image"), str) or not s["image"]:
            raise CurateError(f"{where} (id {sid!r}): no `image` path; the pool holds image-caption pairs")
        turns = s.get("conversations")
        caption = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None) \
            if isinstance(turns, list) else None
        if not isinstance(caption, str):
            raise CurateError(f"{where} (id {sid!r}): no caption (a `gpt` turn in `conversations`)")
        pool.append({"id": sid, "image": s["image"], "caption": caption})
    if not pool:
        raise CurateError(f"{path}: the pool is empty")
    return pool


class Embedder:
    """A CLIP-like model folder: image and text embeddings as float32 NumPy arrays."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", image_mode: str = "square") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            self.model = AutoModel.from_pretrained(model_dir).eval().to(device)
            self.processor = AutoImageProcessor.from_pretrained(model_dir)
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise CurateError(f"{model_dir}: cannot load a CLIP-like model folder: {exc}") from exc
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise CurateError(f"{model_dir}: {type(self.model).__name__} has no get_image_features/get_text_features "
                              "(expected a SiglipModel or CLIPModel folder)")
        self.torch, self.device, self.image_mode = torch, device, image_mode
        self.siglip = self.model.config.model_type.startswith("siglip")  # trained on max-length padding
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.fill = mean_fill(getattr(self.processor, "image_mean", None) or (0.5, 0.5, 0.5))
        self.dim = int(self.texts([""]).shape[1])  # for a shard whose images all failed to decode

    def _features(self, out: Any) -> np.ndarray:
        feats = out if isinstance(out, self.torch.Tensor) else out.pooler_output  # transformers 5 wraps them
        return feats.float().cpu().numpy()

    def images(self, images: list) -> np.ndarray:
        if self.image_mode == "pad":
            images = [expand_to_square(im, self.fill) for im in images]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with self.torch.inference_mode():
            return self._features(self.model.get_image_features(pixel_values=pixels))

    def texts(self, captions: list[str]) -> np.ndarray:
        enc = self.tokenizer(captions, padding="max_length" if self.siglip else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"].to(self.device)}
        if not self.siglip:
            inputs["attention_mask"] = enc["attention_mask"].to(self.device)
        with self.torch.inference_mode():
            return self._features(self.model.get_text_features(**inputs))


def embed_shard(embedder: Embedder, records: list[dict[str, str]], image_folder: str | Path, out_root: str | Path,
                index: int, cfg: CurateConfig) -> list[str]:
    """Embed one shard's records and write it; return the ids dropped as unreadable."""
    folder, out_root = Path(image_folder), Path(out_root)
    imgs, txts, kept, sizes, nbytes, unreadable = [], [], [], [], [], []
    for b in range(0, len(records), cfg.embed_batch_size):
        batch, images = [], []
        for rec in records[b : b + cfg.embed_batch_size]:
            try:
                images.append(load_image(folder / rec["image"]))
            except ImageError as exc:
                if cfg.bad_images == "error":
                    raise CurateError(f"pool sample {rec['id']!r}: {exc} (bad_images=drop skips such samples)") from exc
                unreadable.append(rec["id"])
                continue
            batch.append(rec)
        if not batch:
            continue
        imgs.append(embedder.images(images))
        txts.append(embedder.texts([r["caption"] for r in batch]))
        kept += batch
        sizes += [im.size for im in images]
        nbytes += [(folder / r["image"]).stat().st_size for r in batch]
    img = np.concatenate(imgs) if imgs else np.zeros((0, embedder.dim), np.float32)
    txt = np.concatenate(txts) if txts else np.zeros((0, embedder.dim), np.float32)
    (out_root / "dropped").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": pa.array(unreadable, pa.string()),
                             "step": pa.array(["unreadable"] * len(unreadable), pa.string())}),
                   out_root / "dropped" / f"unreadable_{index}.parquet")
    write_shard(out_root, index, img, txt, {
        "key": pa.array([r["id"] for r in kept], pa.string()),
        "caption": pa.array([r["caption"] for r in kept], pa.string()),
        "image": pa.array([r["image"] for r in kept], pa.string()),
        "width": pa.array([w for w, _ in sizes], pa.int32()),
        "height": pa.array([h for _, h in sizes], pa.int32()),
        "bytes": pa.array(nbytes, pa.int64()),  # the file's size: keep=largest keeps the best copy
    })
    return unreadable


def plan(pool_file: str | Path, image_folder: str | Path, model_dir: str | Path, out_root: str | Path,
         cfg: CurateConfig) -> tuple[list[list[dict[str, str]]], list[int], pa.Table]:
    """Check the manifest, filter, cut into shards; return (shards, indices still to do, filter drops)."""
    out_root = Path(out_root)
    pool = load_pool(pool_file)
    manifest = {
        "pool": str(Path(pool_file).resolve()), "model": str(Path(model_dir).resolve()), "samples": len(pool),
        "shard_size": cfg.shard_size, "image_mode": cfg.image_mode, "bad_images": cfg.bad_images,
        "filters": [cfg.min_caption_words, cfg.min_caption_chars, cfg.min_image_side, cfg.max_aspect_ratio],
    }
    mpath = out_root / "embed.json"
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        if old != manifest:
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise CurateError(f"{out_root} holds embeddings made with other settings ({', '.join(diff)} differ); "
                              "use another output folder or delete it")
    out_root.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    keep = np.ones(len(pool), dtype=bool)
    if cfg.filters_enabled:
        widths = heights = None
        if cfg.min_image_side or cfg.max_aspect_ratio:  # header only: no full decode for the filter
            from PIL import Image

            dims = []
            for rec in pool:
                try:
                    with Image.open(Path(image_folder) / rec["image"]) as im:
                        dims.append(im.size)
                except OSError:
                    dims.append((1, 1))  # unreadable: handled (error or drop) when embedding
            widths, heights = np.array(dims).T
        keep = basic_filter(pa.array([r["caption"] for r in pool], pa.string()), widths, heights, cfg)
    dropped = pa.table({"key": pa.array([r["id"] for r, k in zip(pool, keep) if not k], pa.string()),
                        "step": pa.array(["filter"] * int((~keep).sum()), pa.string())})
    survivors = [r for r, k in zip(pool, keep) if k]
    shards = [survivors[i : i + cfg.shard_size] for i in range(0, len(survivors), cfg.shard_size)]
    todo = [i for i in range(len(shards)) if not (out_root / "metadata" / f"metadata_{i}.parquet").is_file()]
    return shards, todo, dropped


def finish(out_root: str | Path, shards: list[list[dict[str, str]]], filter_drops: pa.Table, todo: list[int],
           seconds: float) -> Path:
    """Gather the drops of every shard into ``dropped_before_embedding.parquet``; write the stats."""
    out_root = Path(out_root)
    parts = [out_root / "dropped" / f"unreadable_{i}.parquet" for i in range(len(shards))]
    tables = [filter_drops] + [pq.read_table(p) for p in parts if p.is_file()]
    pq.write_table(pa.concat_tables(tables), out_root / PRE_DROPPED)
    embedded = sum(pq.ParquetFile(out_root / "metadata" / f"metadata_{i}.parquet").metadata.num_rows
                   for i in range(len(shards)))
    stats = {"embedded": embedded, "shards": len(shards), "shards_this_run": len(todo), "seconds": round(seconds, 3)}
    (out_root / EMBED_STATS).write_text(json.dumps(stats, indent=2) + "\n")
    return out_root


def embed_pool(pool_file: str | Path, image_folder: str | Path, model_dir: str | Path, out_root: str | Path,
               cfg: CurateConfig) -> Path:
    """Embed the pool into ``out_root`` (clip-retrieval layout) on this machine; resumes where it stopped."""
    t0 = time.perf_counter()
    shards, todo, dropped = plan(pool_file, image_folder, model_dir, out_root, cfg)
    if todo:
        embedder = Embedder(model_dir, cfg.device, cfg.image_mode)
        for i in tqdm(todo, desc="embed", unit="shard", disable=None):
            embed_shard(embedder, shards[i], image_folder, out_root, i, cfg)
    return finish(out_root, shards, dropped, todo, time.perf_counter() - t0)
