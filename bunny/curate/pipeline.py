"""The coreset pipeline and its local engine (NumPy + faiss, streaming over shards).

Steps after the embeddings exist (step 1, embedding, is in ``embed.py``):

1. basic filters on the metadata (off by default),
2. k-means on a sample, then every vector assigned (``cluster.py``),
3. per-cluster near-duplicate removal (``dedup.py``),
4. image-text rank band, 5. image-centroid rank band, 6. random draw (``select.py``).

Memory (local engine): about 22 bytes of per-row state for every sample (step, cluster, two
scores, duplicate-of) plus the keys, the k-means sample (``kmeans_train_size x dim x 4`` bytes),
one chunk of a shard (16,384 rows), and one partition of the on-disk spill of normalised vectors
(``spill_partition_mb``; a single cluster larger than that is held whole, but its similarities are
still computed ``block_size`` rows at a time). Both engines share everything here except how
steps 2-3 are spread over workers, so they give the same coreset.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
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
from .dedup import dedup_cluster, resolve_matmul
from .io import CurateError, Layout, check_unique_keys, iter_chunks, open_layout, read_meta, read_rows
from .parallel import worker_pool
from .report import write_funnel
from .select import basic_filter, random_sample, rank_band

log = logging.getLogger(__name__)

# step codes in State.step: 0 = kept so far, i + 1 = dropped by STEPS[i]
STEPS = ("filter", "unreadable", "dedup", "image_text", "centroid", "sample")
PRE_DROPPED = "dropped_before_embedding.parquet"  # written by the embed step in pool mode
EMBED_STATS = "embed_stats.json"  # written by the embed step: samples embedded, seconds
MAX_SPILL_FILES = 256  # open partition files at once during the spill


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
    cluster: np.ndarray  # int32, -1 until assigned
    it_sim: np.ndarray  # float32 image-text cosine
    cent_sim: np.ndarray  # float32 image-centroid cosine
    file_bytes: np.ndarray | None = None  # int64 image file sizes, read only for keep=largest
    pre_dropped: pa.Table | None = None  # (key, step) dropped before embedding
    funnel: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)
    _cpu: float = field(default_factory=time.process_time)

    @property
    def alive(self) -> np.ndarray:
        return self.step == 0

    def record(self, name: str, enabled: bool = True, count: int | None = None, **extra: Any) -> None:
        """Close a step: its count and time go into the funnel; an empty result is an error."""
        now, cpu = time.perf_counter(), time.process_time()
        count = int(self.alive.sum()) if count is None else count
        before = self.funnel[-1]["count"] if self.funnel else count
        # wall seconds, and CPU seconds of this process (all threads): on a shared machine the
        # second says what the step costs, the first what it took
        entry = {"step": name, "count": count, "enabled": enabled, "seconds": round(now - self._t, 3),
                 "cpu_seconds": round(cpu - self._cpu, 3)}
        self.funnel.append(entry | extra)
        self._t, self._cpu = now, cpu
        log.info("%-10s %12d samples  %8.2f s%s", name, count, entry["seconds"], "" if enabled else "  (off)")
        if count == 0:
            hint = {
                "filter": "loosen min_caption_words / min_caption_chars / min_image_side / max_aspect_ratio",
                "embed": "no image could be decoded; check --image-folder",
                "image_text": "widen image_text_band",
                "centroid": "widen centroid_band",
            }.get(name, "check the input")
            raise CurateError(f"step `{name}` left no samples ({before} went in); {hint}")


def prepare(emb_dir: str | Path, cfg: CurateConfig) -> State:
    """Open the layout, read keys (checked unique) and apply the basic filters."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    layout = open_layout(emb_dir)
    caption_filter = bool(cfg.min_caption_words or cfg.min_caption_chars)
    size_filter = bool(cfg.min_image_side or cfg.max_aspect_ratio)
    if caption_filter and "caption" not in layout.meta_columns:
        raise CurateError(f"{layout.shards[0].meta}: caption filters are on but there is no `caption` column")
    if size_filter and not {"width", "height"} <= set(layout.meta_columns):
        raise CurateError(
            f"{layout.shards[0].meta}: min_image_side / max_aspect_ratio need `width` and `height` columns "
            f"(columns: {', '.join(layout.meta_columns)})"
        )
    if cfg.dedup_enabled and cfg.keep == "largest" and "bytes" not in layout.meta_columns:
        raise CurateError(f"{layout.shards[0].meta}: keep=largest needs a `bytes` column (file sizes; pool-mode "
                          f"embedding writes it) (columns: {', '.join(layout.meta_columns)})")
    by_size = cfg.dedup_enabled and cfg.keep == "largest"
    columns = ["key"] + ["caption"] * caption_filter + ["width", "height"] * size_filter + ["bytes"] * by_size
    keys, keep, sizes = [], [], []
    for shard in tqdm(layout.shards, desc="metadata", unit="shard", disable=None):
        table = read_meta(layout, shard, columns)
        keys.append(table["key"].combine_chunks())
        if by_size:
            sizes.append(table["bytes"].to_numpy(zero_copy_only=False).astype(np.int64))
        if cfg.filters_enabled:
            empty = pa.nulls(table.num_rows, pa.string())
            keep.append(basic_filter(
                table["caption"].combine_chunks() if caption_filter else empty,
                table["width"].to_numpy(zero_copy_only=False) if size_filter else None,
                table["height"].to_numpy(zero_copy_only=False) if size_filter else None,
                cfg,
            ))
    key_array = pa.chunked_array(keys, type=pa.string())
    pre = None
    pre_path = Path(emb_dir) / PRE_DROPPED
    if pre_path.is_file():
        pre = pq.read_table(pre_path)
        pre = pa.table({"key": pc.cast(pre["key"], pa.string()), "step": pc.cast(pre["step"], pa.string())})
    check_unique_keys(layout, key_array, None if pre is None else pre["key"])
    n = layout.n
    state = State(
        layout, cfg, key_array,
        step=np.zeros(n, dtype=np.int8), dup_of=np.full(n, -1, dtype=np.int64),
        cluster=np.full(n, -1, dtype=np.int32),
        it_sim=np.full(n, np.nan, dtype=np.float32), cent_sim=np.full(n, np.nan, dtype=np.float32), pre_dropped=pre,
    )
    if by_size:
        state.file_bytes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    if cfg.filters_enabled:
        state.step[~np.concatenate(keep)] = code("filter")
    pre_steps = [] if pre is None else pre["step"].to_pylist()
    n_pre_filter, n_unreadable = pre_steps.count("filter"), pre_steps.count("unreadable")
    total = n + len(pre_steps)
    state.funnel.append({"step": "input", "count": total, "enabled": True, "seconds": 0.0, "cpu_seconds": 0.0})
    state._t, state._cpu = t0, cpu0
    state.record("filter", enabled=cfg.filters_enabled, count=int(state.alive.sum()) + n_unreadable)
    if pre is not None:  # pool mode: embedding happened, and may have dropped unreadable images
        stats_path = Path(emb_dir) / EMBED_STATS
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        state._t -= stats.get("seconds", 0.0)
        state.record("embed", embedded=stats.get("embedded"),
                     note="step 1: embedding (unreadable images dropped when bad_images: drop)")
    if n_pre_filter + n_unreadable != len(pre_steps):
        raise CurateError(f"{pre_path}: steps other than filter/unreadable: {sorted(set(pre_steps))}")
    return state


def draw_sample(state: State, round_: int) -> np.ndarray:
    """The normalised image vectors of a seeded sample of the surviving rows (one per k-means round)."""
    alive = np.flatnonzero(state.alive)
    size = min(state.cfg.kmeans_train_size, len(alive))
    rng = np.random.default_rng([state.cfg.seed, round_])
    pick = np.sort(rng.choice(len(alive), size=size, replace=False))
    return read_rows(state.layout, alive[pick])


def train_clusters(state: State) -> clustering.Clustering:
    """Step 2a (recorded as ``kmeans``); a single dummy centroid when no later step needs clusters."""
    cfg = state.cfg
    if not cfg.needs_clusters:
        result = clustering.Clustering(np.eye(1, state.layout.dim, dtype=np.float32))
        state.info["clusters"] = 0
        state.record("kmeans", enabled=False)
        return result
    n_alive = int(state.alive.sum())
    result = clustering.train(lambda r: draw_sample(state, r), cfg)
    state.info["clusters"] = result.k
    if result.k < cfg.clusters:
        log.warning("only %d clusters (clusters=%d, %d samples to train on)", result.k, cfg.clusters, n_alive)
    state.record("kmeans", clusters=result.k)  # drops nothing; in the funnel for its time
    return result


def score_chunks(layout: Layout, index: int, clusters: clustering.Clustering,
                 alive: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """Check, normalise, score and assign the surviving rows of one shard, a chunk at a time.

    The unit both engines share. ``alive`` is the shard's row mask. Each chunk gives gidx,
    cluster, it_sim, cent_sim and the normalised image vectors ``emb`` of its surviving rows.
    """
    shard = layout.shards[index]
    for r0, img, it_sim in iter_chunks(shard):
        sel = np.flatnonzero(alive[r0 : r0 + len(img)])
        if not sel.size:
            continue
        img = img[sel]
        cl, sim = clusters.assign(img)
        yield {"gidx": shard.start + r0 + sel, "cluster": cl.astype(np.int32), "it_sim": it_sim[sel],
               "cent_sim": sim, "emb": img}


def apply_scores(state: State, scored: dict[str, np.ndarray]) -> None:
    g = scored["gidx"]
    state.cluster[g] = scored["cluster"]
    state.it_sim[g] = scored["it_sim"]
    state.cent_sim[g] = scored["cent_sim"]


def apply_dedup(state: State, gidx: np.ndarray, rep: np.ndarray) -> None:
    dropped = rep != gidx
    state.dup_of[gidx[dropped]] = rep[dropped]
    state.step[gidx[dropped]] = code("dedup")


def keep_scores(state: State, gidx: np.ndarray) -> np.ndarray:
    """What ``dedup_cluster`` ranks a duplicate group's members by: similarity to the centroid, or
    for ``keep=largest`` the image file's size."""
    return state.cent_sim[gidx] if state.file_bytes is None else state.file_bytes[gidx].astype(np.float64)


def dedup_args(cfg: CurateConfig, rows: int) -> dict[str, Any]:
    """Keyword arguments of ``dedup_cluster`` for ``rows`` samples to deduplicate."""
    return {"threshold": cfg.dedup_threshold, "keep": cfg.keep, "seed": cfg.seed, "block_size": cfg.block_size,
            "matmul": resolve_matmul(cfg.dedup_matmul, rows)}


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
    if cfg.sample is not None and cfg.sample > len(alive):
        log.warning("sample=%d but only %d samples survive: all are kept", cfg.sample, len(alive))
    state.record("sample", enabled=cfg.sample is not None)
    return write_outputs(state, out, engine)


def _kept_schema(image_col: str | None) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("caption", pa.string())] + [("image", pa.string())] * bool(image_col))


DROPPED_SCHEMA = pa.schema([("key", pa.string()), ("step", pa.string()), ("duplicate_of", pa.string())])
SCORES_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("image_text_sim", pa.float32()),
                           ("centroid_sim", pa.float32()), ("step", pa.string())])


def write_outputs(state: State, out: Path, engine: str) -> dict[str, Any]:
    """kept.parquet, dropped.parquet, coreset.json (when images are known), funnel.json/png
    (and scores.parquet with ``write_scores``). Written shard by shard: memory stays one shard's metadata."""
    out.mkdir(parents=True, exist_ok=True)
    layout = state.layout
    image_col = layout.image_column
    columns = ["key"] + ["caption"] * ("caption" in layout.meta_columns) + [image_col] * (image_col is not None)
    kept_schema = _kept_schema(image_col)
    step_names = np.array(("",) + STEPS, dtype=object)
    coreset = open(out / "coreset.json", "w", encoding="utf-8") if image_col else None  # noqa: SIM115
    scores_w = pq.ParquetWriter(out / "scores.parquet", SCORES_SCHEMA) if state.cfg.write_scores else None
    first = True
    try:
        with pq.ParquetWriter(out / "kept.parquet", kept_schema) as kept_w, \
                pq.ParquetWriter(out / "dropped.parquet", DROPPED_SCHEMA) as drop_w:
            if state.pre_dropped is not None:
                pre = state.pre_dropped
                drop_w.write_table(pa.table({"key": pre["key"], "step": pre["step"],
                                             "duplicate_of": pa.nulls(pre.num_rows, pa.string())}, schema=DROPPED_SCHEMA))
            if coreset:
                coreset.write("[")
            for shard in tqdm(layout.shards, desc="write", unit="shard", disable=None):
                table = read_meta(layout, shard, columns)
                g = np.arange(shard.start, shard.start + shard.rows)
                steps = state.step[g]
                kept_rows = np.flatnonzero(steps == 0)
                caption = table["caption"] if "caption" in columns else pa.nulls(table.num_rows, pa.string())
                kept = {"key": table["key"].take(kept_rows), "caption": pc.cast(caption.take(kept_rows), pa.string())}
                if image_col:
                    kept["image"] = pc.cast(table[image_col].take(kept_rows), pa.string())
                kept_w.write_table(pa.table(kept, schema=kept_schema))
                drop_rows = np.flatnonzero(steps != 0)
                dup = state.dup_of[g[drop_rows]]
                dup_key = state.keys.take(pa.array(np.where(dup >= 0, dup, 0))).combine_chunks()
                dup_key = pc.if_else(pa.array(dup >= 0), dup_key, pa.nulls(len(dup), pa.string()))
                drop_w.write_table(pa.table({
                    "key": table["key"].take(drop_rows),
                    "step": pa.array(step_names[steps[drop_rows]].tolist(), pa.string()),
                    "duplicate_of": dup_key}, schema=DROPPED_SCHEMA))
                if scores_w:
                    scores_w.write_table(pa.table({
                        "key": table["key"], "cluster": state.cluster[g], "image_text_sim": state.it_sim[g],
                        "centroid_sim": state.cent_sim[g],
                        "step": pa.array(np.where(steps == 0, "kept", step_names[steps]).tolist(), pa.string()),
                    }, schema=SCORES_SCHEMA))
                if coreset:
                    for key, cap, img in zip(kept["key"].to_pylist(), kept["caption"].to_pylist(),
                                             kept["image"].to_pylist()):
                        sample = {"id": key, "image": img, "conversations": [
                            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": cap or ""}]}
                        coreset.write(("\n" if first else ",\n") + json.dumps(sample, ensure_ascii=False))
                        first = False
        if coreset:
            coreset.write("\n]\n")
    finally:
        if coreset:
            coreset.close()
        if scores_w:
            scores_w.close()
    funnel = {
        "title": f"bunny curate ({engine}): samples after each step",
        "engine": engine,
        "embeddings": str(layout.root),
        "steps": state.funnel,
        "clusters": state.info.get("clusters"),
        "outputs": ["kept.parquet", "dropped.parquet"] + ["coreset.json"] * bool(coreset)
        + ["scores.parquet"] * bool(scores_w) + ["funnel.json", "funnel.png"],
        "config": to_dict(state.cfg),
    }
    write_funnel(out, funnel)
    return funnel


def _spill_parts(state: State, k: int) -> int:
    """How many on-disk partitions the normalised vectors are spread over (a cluster stays in one)."""
    n_alive = int(state.alive.sum())
    want = math.ceil(n_alive * state.layout.dim * 4 / (state.cfg.spill_partition_mb * 2**20))
    return int(max(1, min(k, MAX_SPILL_FILES, want)))


def run_local(emb_dir: str | Path, out: str | Path, cfg: CurateConfig) -> dict[str, Any]:
    """The whole pipeline on one machine; returns the funnel (also written to ``out/funnel.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = prepare(emb_dir, cfg)
    clusters = train_clusters(state)
    layout = state.layout
    parts = _spill_parts(state, clusters.k) if cfg.dedup_enabled else 0
    spill = Path(tempfile.mkdtemp(prefix=".spill-", dir=out))
    try:
        with worker_pool(cfg.threads) as pool:  # shards are independent: one per worker thread
            done = pool.map(lambda i: _score_and_spill(state, clusters, i, spill, parts), range(len(layout.shards)))
            for _ in tqdm(done, total=len(layout.shards), desc="assign", unit="shard", disable=None):
                pass
        state.record("cluster", enabled=cfg.needs_clusters)  # drops nothing; in the funnel for its time
        if parts:
            _dedup_spilled(state, spill, parts)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    state.record("dedup", enabled=cfg.dedup_enabled, spill_partitions=parts, matmul=state.info.get("dedup_matmul"))
    return select_and_write(state, out, "local")


def _score_and_spill(state: State, clusters: clustering.Clustering, index: int, spill: Path, parts: int) -> None:
    """Score and assign one shard; append its normalised vectors to ``spill/part_<p>/<index>.f32``
    by partition (row order kept), so a partition read back in shard order is in gidx order."""
    shard = state.layout.shards[index]
    files: dict[int, Any] = {}
    try:
        for scored in score_chunks(state.layout, index, clusters, state.alive[shard.start : shard.start + shard.rows]):
            apply_scores(state, scored)  # rows of this shard only: no other thread writes them
            if not parts:
                continue
            part = scored["cluster"] % parts
            for p in np.unique(part):
                if p not in files:
                    (spill / f"part_{p}").mkdir(exist_ok=True)
                    files[p] = open(spill / f"part_{p}" / f"{index}.f32", "wb")  # noqa: SIM115
                files[p].write(scored["emb"][part == p].tobytes())
    finally:
        for f in files.values():
            f.close()


def _read_partition(folder: Path, rows: int, dim: int) -> np.ndarray:
    """The spilled vectors of one partition, shard files in shard order (= gidx order)."""
    out = np.empty((rows, dim), dtype=np.float32)
    view = memoryview(out).cast("B")
    at = 0
    files = sorted(folder.glob("*.f32"), key=lambda f: int(f.stem)) if folder.is_dir() else []
    for f in files:
        with open(f, "rb") as fh:
            at += fh.readinto(view[at:])
    if at != out.nbytes:
        raise CurateError(f"{folder}: spill partition holds {at // (4 * dim)} rows, expected {rows}")
    return out


def _dedup_spilled(state: State, spill: Path, parts: int) -> None:
    """Step 3 over the spill: one partition in memory at a time; its clusters go to worker threads."""
    alive = np.flatnonzero(state.alive)
    part_of = state.cluster[alive] % parts
    by_part = np.argsort(part_of, kind="stable")  # gidx ascending inside a partition: the spill's order
    bounds = np.searchsorted(part_of[by_part], np.arange(parts + 1))
    args = dedup_args(state.cfg, len(alive))
    state.info["dedup_matmul"] = args["matmul"]
    dim = state.layout.dim
    with worker_pool(state.cfg.threads) as pool:
        for p in tqdm(range(parts), desc="dedup", unit="part", disable=None):
            gidx = alive[by_part[bounds[p] : bounds[p + 1]]]
            emb = _read_partition(spill / f"part_{p}", len(gidx), dim)
            order = np.argsort(state.cluster[gidx], kind="stable")
            cl = state.cluster[gidx[order]]
            edges = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1], True])

            def one(a: int, b: int, emb: np.ndarray = emb, gidx: np.ndarray = gidx,
                    order: np.ndarray = order) -> tuple[np.ndarray, np.ndarray]:
                rows = order[a:b]
                return gidx[rows], dedup_cluster(emb[rows], gidx[rows], keep_scores(state, gidx[rows]), **args)

            for g, rep in pool.map(one, edges[:-1], edges[1:]):  # clusters are independent
                apply_dedup(state, g, rep)
            del emb
