"""The Ray engine: the same steps on Ray Data, for pools that do not fit one machine.

- embedding (pool mode): an actor pool (``map_batches`` with a callable class), one model per
  actor, one shard per call (``embed.py``);
- assignment: one task per shard, chunk by chunk (``score_chunks``, the function the local
  engine runs), with the centroids as an argument;
- dedup: ``groupby("cluster").map_groups`` runs ``dedup_cluster`` on each cluster, wherever it is.

The driver keeps what is small: the keys, the k-means sample and training (as done at LAION
scale: train on a sample), and per-row scalars for the rank bands. Work is keyed by gidx and each
cluster is sorted by gidx before dedup, so the coreset equals the local engine's for the same input.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .cluster import Clustering
from .config import CurateConfig
from .dedup import dedup_cluster
from .io import open_layout
from .pipeline import (
    apply_dedup,
    apply_scores,
    dedup_args,
    prepare,
    score_chunks,
    select_and_write,
    train_clusters,
)


@contextlib.contextmanager
def ray_session(cfg: CurateConfig) -> Iterator[None]:
    """Use a running Ray, or start one (and stop it afterwards)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, include_dashboard=False)
    else:
        ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _score(batch: dict[str, np.ndarray], root: str, arrays: dict[str, np.ndarray],
           with_emb: bool) -> Iterator[dict[str, np.ndarray]]:
    """Task: score and assign one shard (``batch`` names it and its surviving rows), chunk by chunk."""
    layout = open_layout(root)
    clusters = Clustering.from_arrays(arrays)
    index = int(batch["shard"][0])
    shard = layout.shards[index]
    alive = np.zeros(shard.rows, dtype=bool)
    alive[np.asarray(batch["alive_rows"][0], dtype=np.int64)] = True
    for chunk in score_chunks(layout, index, clusters, alive):
        if not with_emb:
            del chunk["emb"]
        yield chunk


def _dedup_group(batch: dict[str, np.ndarray], file_bytes: np.ndarray | None = None,
                 **args: Any) -> dict[str, np.ndarray]:
    """One whole cluster, put in gidx order (the local engine's order) before the dedup."""
    order = np.argsort(batch["gidx"], kind="stable")
    out = {k: batch[k][order] for k in ("gidx", "it_sim", "cent_sim", "cluster")}
    emb = np.ascontiguousarray(np.asarray(batch["emb"], dtype=np.float32)[order])
    score = out["cent_sim"] if file_bytes is None else file_bytes[out["gidx"]].astype(np.float64)
    out["rep"] = dedup_cluster(emb, out["gidx"], score, **args)
    return out


def run_ray(emb_dir: str | Path, out: str | Path, cfg: CurateConfig) -> dict[str, Any]:
    """The whole pipeline on Ray; returns the funnel (also written to ``out/funnel.json``)."""
    import ray
    import ray.data

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with ray_session(cfg):
        state = prepare(emb_dir, cfg)
        clusters = train_clusters(state)
        layout = state.layout
        items = [{"shard": i, "alive_rows": np.flatnonzero(state.alive[s.start : s.start + s.rows])}
                 for i, s in enumerate(layout.shards) if s.rows]
        workers = max(1, int(ray.available_resources().get("CPU", 1)))
        scored = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _score, batch_size=1, batch_format="numpy",
            fn_kwargs={"root": str(layout.root.resolve()), "arrays": clusters.to_arrays(),
                       "with_emb": cfg.dedup_enabled},
        )
        if cfg.dedup_enabled:
            partitions = max(1, min(clusters.k, 4 * workers))
            args = dedup_args(cfg, int(state.alive.sum()))
            state.info["dedup_matmul"] = args["matmul"]
            scored = scored.groupby("cluster", num_partitions=partitions).map_groups(
                _dedup_group, batch_format="numpy", fn_kwargs={**args, "file_bytes": state.file_bytes})
        n_assigned = int(state.alive.sum())
        for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
            apply_scores(state, batch)
            if cfg.dedup_enabled:
                apply_dedup(state, batch["gidx"], batch["rep"])
        # assignment and dedup stream through one Ray Data pipeline: one time, under `dedup`
        note = "assignment and dedup run together on Ray Data; the time is under `dedup`"
        seconds_so_far = time.perf_counter() - state._t
        state.record("cluster", enabled=cfg.needs_clusters, count=n_assigned, note=note)
        state.funnel[-1]["seconds"] = 0.0
        state._t -= seconds_so_far
        state.record("dedup", enabled=cfg.dedup_enabled, note=note, matmul=state.info.get("dedup_matmul"))
        return select_and_write(state, out, "ray")


class _Embedder:
    """Actor: one model; embeds and writes one shard per call (``embed.embed_shard``)."""

    def __init__(self, model_dir: str, image_folder: str, out_root: str, cfg: CurateConfig) -> None:
        from .embed import Embedder

        self.embedder = Embedder(model_dir, cfg.device, cfg.image_mode)
        self.image_folder, self.out_root, self.cfg = image_folder, out_root, cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .embed import embed_shard

        index = int(batch["shard"][0])
        embed_shard(self.embedder, json.loads(batch["records"][0]), self.image_folder, self.out_root, index, self.cfg)
        return {"shard": np.array([index])}


def embed_pool_ray(pool_file: str | Path, image_folder: str | Path, model_dir: str | Path, out_root: str | Path,
                   cfg: CurateConfig) -> Path:
    """``embed.embed_pool`` on a Ray actor pool (``ray_embed_actors`` models, ``ray_gpus_per_actor`` each)."""
    import ray.data

    from .embed import finish, plan

    t0 = time.perf_counter()
    shards, todo, dropped = plan(pool_file, image_folder, model_dir, out_root, cfg)
    if todo:
        items = [{"shard": i, "records": json.dumps(shards[i])} for i in todo]
        with ray_session(cfg):
            ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _Embedder, batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(cfg.ray_embed_actors, len(todo))),
                num_gpus=cfg.ray_gpus_per_actor or None,
                fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()),
                                       "image_folder": str(Path(image_folder).resolve()),
                                       "out_root": str(Path(out_root).resolve()), "cfg": cfg},
            ).materialize()
    return finish(out_root, shards, dropped, todo, time.perf_counter() - t0)
