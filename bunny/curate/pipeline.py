"""The coreset pipeline and its local engine (NumPy + faiss, streaming over shards).

Steps after the embeddings exist (step 1, embedding, is in ``embed.py``):

1. basic filters on the metadata (off by default),
2. k-means on a sample, then every vector assigned (``cluster.py``),
3. per-cluster near-duplicate removal (``dedup.py``),
4. image-text rank band, 5. image-centroid rank band, 6. random draw (``select.py``).

Memory (local engine): a few per-row scalars for every sample (~40 bytes: cluster, two scores,
step, duplicate-of) plus the k-means sample, one chunk of a shard, and one partition of the
on-disk spill of normalised vectors (``spill_partition_mb``; a single cluster larger than that is
held whole, but its similarities are still computed ``block_size`` rows at a time). Both engines
share everything here except how steps 2-3 are spread over workers, so they give the same coreset.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from bunny.config import to_dict

from . import cluster as clustering
from .config import CurateConfig
from .dedup import dedup_cluster
from .io import CurateError, Layout, check_unique_keys, iter_chunks, open_layout, read_meta, read_rows
from .report import write_funnel
from .select import basic_filter, random_sample, rank_band

log = logging.getLogger(__name__)

# step codes in State.step: 0 = kept so far, i + 1 = dropped by STEPS[i]
STEPS = ("unreadable", "filter", "dedup", "image_text", "centroid", "sample")
PRE_DROPPED = "dropped_before_embedding.parquet"  # written by the embed step in pool mode


def code(step: str) -> int:
    return STEPS.index(step) + 1


@dataclass
class State:
    """Everything the steps know about the pool: per-row arrays indexed by gidx."""

    layout: Layout
    cfg: CurateConfig
    keys: pa.ChunkedArray
    step: np.ndarray  # int8
    dup_of: np.ndarray  # int64 gidx of the kept member of a row's duplicate group, -1 if none
    cluster: np.ndarray  # int64, -1 until assigned
    it_sim: np.ndarray  # float64 image-text cosine
    cent_sim: np.ndarray  # float64 image-centroid cosine
    pre_dropped: pa.Table | None = None  # (key, step) dropped before embedding
    funnel: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    @property
    def alive(self) -> np.ndarray:
        return self.step == 0

    def record(self, name: str, enabled: bool = True) -> None:
        """Close a step: its count and time go into the funnel; an empty result is an error."""
        now = time.perf_counter()
        count = int(self.alive.sum())
        before = self.funnel[-1]["count"] if self.funnel else count
        self.funnel.append({"step": name, "count": count, "enabled": enabled, "seconds": round(now - self._t, 3)})
        self._t = now
        if count == 0:
            hint = {
                "filter": "loosen min_caption_words / min_caption_chars / min_image_side / max_aspect_ratio",
                "image_text": "widen image_text_band",
                "centroid": "widen centroid_band",
            }.get(name, "check the input")
            raise CurateError(f"step `{name}` left no samples ({before} went in); {hint}")


def prepare(emb_dir: str | Path, cfg: CurateConfig) -> State:
    """Open the layout, read keys (checked unique) and apply the basic filters."""
    t0 = time.perf_counter()
    layout = open_layout(emb_dir)
    columns = ["key"]
    caption_filter = bool(cfg.min_caption_words or cfg.min_caption_chars)
    size_filter = bool(cfg.min_image_side or cfg.max_aspect_ratio)
    if caption_filter and "caption" not in layout.meta_columns:
        raise CurateError(f"{layout.shards[0].meta}: caption filters are on but there is no `caption` column")
    if size_filter and not {"width", "height"} <= set(layout.meta_columns):
        raise CurateError(
            f"{layout.shards[0].meta}: min_image_side / max_aspect_ratio need `width` and `height` columns "
            f"(columns: {', '.join(layout.meta_columns)})"
        )
    columns += ["caption"] * caption_filter + ["width", "height"] * size_filter
    keys, keep = [], []
    for shard in tqdm(layout.shards, desc="metadata", unit="shard", disable=None):
        table = read_meta(shard, columns)
        keys.append(table["key"].combine_chunks())
        if cfg.filters_enabled:
            empty = pa.nulls(table.num_rows, pa.string())
            keep.append(basic_filter(
                table["caption"].combine_chunks() if caption_filter else empty,
                table["width"].to_numpy() if size_filter else None,
                table["height"].to_numpy() if size_filter else None,
                cfg,
            ))
    key_array = pa.chunked_array(keys, type=pa.string())
    pre = None
    pre_path = Path(emb_dir) / PRE_DROPPED
    if pre_path.is_file():
        pre = pq.read_table(pre_path)
        key_array_all = pa.chunked_array(key_array.chunks + pre["key"].cast(pa.string()).chunks, type=pa.string())
        check_unique_keys(layout, key_array_all)
    else:
        check_unique_keys(layout, key_array)
    n = layout.n
    state = State(
        layout, cfg, key_array,
        step=np.zeros(n, dtype=np.int8), dup_of=np.full(n, -1, dtype=np.int64),
        cluster=np.full(n, -1, dtype=np.int64),
        it_sim=np.full(n, np.nan), cent_sim=np.full(n, np.nan), pre_dropped=pre,
    )
    n_pre = 0 if pre is None else pre.num_rows
    state.funnel.append({"step": "input", "count": n + n_pre, "enabled": True, "seconds": 0.0})
    if pre is not None and "unreadable" in set(pre["step"].to_pylist()):
        unreadable = pc.sum(pc.equal(pre["step"], "unreadable")).as_py()
        state.funnel.append({"step": "unreadable", "count": n + n_pre - unreadable, "enabled": True, "seconds": 0.0})
    state._t = t0
    if cfg.filters_enabled:
        state.step[~np.concatenate(keep)] = code("filter")
    state.record("filter", enabled=cfg.filters_enabled)
    return state


def draw_sample(state: State, round_: int) -> np.ndarray:
    """The normalised image vectors of a seeded sample of the surviving rows (one per k-means round)."""
    alive = np.flatnonzero(state.alive)
    size = min(state.cfg.kmeans_train_size, len(alive))
    rng = np.random.default_rng([state.cfg.seed, round_])
    pick = np.sort(rng.choice(len(alive), size=size, replace=False))
    return read_rows(state.layout, alive[pick])


def train_clusters(state: State) -> clustering.Clustering:
    n_alive = int(state.alive.sum())
    result = clustering.train(lambda r: draw_sample(state, r), state.cfg)
    state.info["clusters"] = result.k
    if result.k < state.cfg.clusters:
        log.warning("only %d clusters (clusters=%d, %d samples to train on)", result.k, state.cfg.clusters, n_alive)
    return result


def score_shard(layout: Layout, index: int, clusters: clustering.Clustering, alive: np.ndarray) -> dict[str, np.ndarray]:
    """Check, normalise, score and assign the surviving rows of one shard (the unit both engines share).

    ``alive`` is the shard's row mask. Returns gidx, cluster, it_sim, cent_sim and the normalised
    image vectors ``emb`` of those rows, in row order.
    """
    shard = layout.shards[index]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("gidx", "cluster", "it_sim", "cent_sim", "emb")}
    for r0, img, txt in iter_chunks(shard):
        sel = np.flatnonzero(alive[r0 : r0 + len(img)])
        img, txt = img[sel], txt[sel]
        cl, sim = clusters.assign(img)
        parts["gidx"].append(shard.start + r0 + sel)
        parts["cluster"].append(cl)
        parts["it_sim"].append(np.einsum("ij,ij->i", img.astype(np.float64), txt.astype(np.float64)))
        parts["cent_sim"].append(sim)
        parts["emb"].append(img)
    if not parts["gidx"]:
        return {"gidx": np.zeros(0, np.int64), "cluster": np.zeros(0, np.int64), "it_sim": np.zeros(0),
                "cent_sim": np.zeros(0), "emb": np.zeros((0, layout.dim), np.float32)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def apply_scores(state: State, scored: dict[str, np.ndarray]) -> None:
    g = scored["gidx"]
    state.cluster[g] = scored["cluster"]
    state.it_sim[g] = scored["it_sim"]
    state.cent_sim[g] = scored["cent_sim"]


def apply_dedup(state: State, gidx: np.ndarray, rep: np.ndarray) -> None:
    dropped = rep != gidx
    state.dup_of[gidx[dropped]] = rep[dropped]
    state.step[gidx[dropped]] = code("dedup")


def dedup_args(cfg: CurateConfig) -> dict[str, Any]:
    return {"threshold": cfg.dedup_threshold, "keep": cfg.keep, "seed": cfg.seed, "block_size": cfg.block_size}


def select_and_write(state: State, out: Path, engine: str) -> dict[str, Any]:
    """Steps 4-6 on the dedup survivors, then the outputs. Shared by both engines."""
    cfg = state.cfg
    for name, band, scores in (("image_text", cfg.image_text_band, state.it_sim),
                               ("centroid", cfg.centroid_band, state.cent_sim)):
        alive = np.flatnonzero(state.alive)
        keep = rank_band(scores[alive], alive, band)
        state.step[alive[~keep]] = code(name)
        state.record(name, enabled=tuple(band) != (0.0, 1.0))
    alive = np.flatnonzero(state.alive)
    keep = random_sample(len(alive), cfg.sample, cfg.seed)
    state.step[alive[~keep]] = code("sample")
    state.record("sample", enabled=cfg.sample is not None)
    if cfg.sample is not None and cfg.sample > len(alive):
        log.warning("sample=%d but only %d samples survive: all are kept", cfg.sample, len(alive))
    return write_outputs(state, out, engine)


def write_outputs(state: State, out: Path, engine: str) -> dict[str, Any]:
    """kept.parquet, dropped.parquet, coreset.json (when images are known), funnel.json/png."""
    out.mkdir(parents=True, exist_ok=True)
    layout = state.layout
    image_col = layout.image_column
    columns = ["key"] + ["caption"] * ("caption" in layout.meta_columns) + [image_col] * (image_col is not None)
    kept_schema = pa.schema([("key", pa.string()), ("caption", pa.string())]
                            + [("image", pa.string())] * (image_col is not None))
    dropped_schema = pa.schema([("key", pa.string()), ("step", pa.string()), ("duplicate_of", pa.string())])
    step_names = np.array(("",) + STEPS, dtype=object)
    coreset = open(out / "coreset.json", "w") if image_col else None  # noqa: SIM115
    first = True
    with pq.ParquetWriter(out / "kept.parquet", kept_schema) as kept_w, \
            pq.ParquetWriter(out / "dropped.parquet", dropped_schema) as drop_w:
        if state.pre_dropped is not None:
            pre = state.pre_dropped
            drop_w.write_table(pa.table({
                "key": pre["key"].cast(pa.string()), "step": pre["step"].cast(pa.string()),
                "duplicate_of": pa.nulls(pre.num_rows, pa.string())}, schema=dropped_schema))
        if coreset:
            coreset.write("[")
        for shard in tqdm(layout.shards, desc="write", unit="shard", disable=None):
            table = read_meta(shard, columns)
            g = np.arange(shard.start, shard.start + shard.rows)
            steps = state.step[g]
            kept_rows = np.flatnonzero(steps == 0)
            caption = table["caption"] if "caption" in columns else pa.nulls(table.num_rows, pa.string())
            kept = {"key": table["key"].take(kept_rows), "caption": caption.take(kept_rows).cast(pa.string())}
            if image_col:
                kept["image"] = table[image_col].take(kept_rows).cast(pa.string())
            kept_w.write_table(pa.table(kept, schema=kept_schema))
            drop_rows = np.flatnonzero(steps != 0)
            dup = state.dup_of[g[drop_rows]]
            dup_key = state.keys.take(pa.array(np.where(dup >= 0, dup, 0))).combine_chunks()
            dup_key = pc.if_else(pa.array(dup >= 0), dup_key, pa.nulls(len(dup), pa.string()))
            drop_w.write_table(pa.table({
                "key": table["key"].take(drop_rows),
                "step": pa.array(step_names[steps[drop_rows]].tolist(), pa.string()),
                "duplicate_of": dup_key}, schema=dropped_schema))
            if coreset:
                for key, cap, img in zip(kept["key"].to_pylist(), kept["caption"].to_pylist(), kept["image"].to_pylist()):
                    sample = {"id": key, "image": img, "conversations": [
                        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": cap or ""}]}
                    coreset.write(("\n" if first else ",\n") + json.dumps(sample, ensure_ascii=False))
                    first = False
    if coreset:
        coreset.write("\n]\n")
        coreset.close()
    funnel = {
        "title": f"bunny curate ({engine}): samples after each step",
        "engine": engine,
        "embeddings": str(layout.root),
        "steps": state.funnel,
        "clusters": state.info.get("clusters"),
        "config": to_dict(state.cfg),
    }
    write_funnel(out, funnel)
    return funnel


def run_local(emb_dir: str | Path, out: str | Path, cfg: CurateConfig) -> dict[str, Any]:
    """The whole pipeline on one machine; returns the funnel (also written to ``out/funnel.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = prepare(emb_dir, cfg)
    clusters = train_clusters(state)
    state.record("kmeans")  # drops nothing; in the funnel for its time
    layout = state.layout
    n_alive = int(state.alive.sum())
    parts = int(min(clusters.k, 1024, max(1, math.ceil(n_alive * layout.dim * 4 / (cfg.spill_partition_mb << 20)))))
    spill = Path(tempfile.mkdtemp(prefix=".spill-", dir=out))
    try:
        files = [open(spill / f"part_{p}.f32", "wb") for p in range(parts)]  # noqa: SIM115
        try:
            for i, shard in enumerate(tqdm(layout.shards, desc="assign", unit="shard", disable=None)):
                scored = score_shard(layout, i, clusters, state.alive[shard.start : shard.start + shard.rows])
                apply_scores(state, scored)
                part = scored["cluster"] % parts
                for p in np.unique(part):
                    files[p].write(scored["emb"][part == p].tobytes())
        finally:
            for f in files:
                f.close()
        state.record("cluster")  # drops nothing; in the funnel for its time
        alive = np.flatnonzero(state.alive)
        args = dedup_args(cfg)
        for p in tqdm(range(parts), desc="dedup", unit="part", disable=None):
            gidx = alive[state.cluster[alive] % parts == p]
            emb = np.fromfile(spill / f"part_{p}.f32", dtype=np.float32).reshape(len(gidx), layout.dim)
            order = np.argsort(state.cluster[gidx], kind="stable")
            cl = state.cluster[gidx[order]]
            bounds = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1], True])
            for a, b in zip(bounds[:-1], bounds[1:]):
                rows = order[a:b]
                rep = dedup_cluster(emb[rows], gidx[rows], state.cent_sim[gidx[rows]], **args)
                apply_dedup(state, gidx[rows], rep)
            del emb
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    state.record("dedup")
    return select_and_write(state, out, "local")
