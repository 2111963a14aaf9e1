"""bunny curate --engine ray on a local Ray with 2 CPUs: the same input gives the same coreset as
the local engine (one Ray start for the module; the embedding actor pool is a slow test)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from bunny.curate import run_curation  # noqa: E402
from bunny.curate.synthetic import planted_pool  # noqa: E402
from bunny.curate.tiny import tiny_clip_folder  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "emb"
    planted_pool(root, 1500, dim=32, shard_rows=400, points_per_topic=150, image_paths=True, seed=4)
    return root


def _same(a, b):
    for name in ("kept.parquet", "dropped.parquet"):
        assert pq.read_table(a.out / name).equals(pq.read_table(b.out / name)), name
    assert a.coreset.read_text() == b.coreset.read_text()
    assert [(s["step"], s["count"], s["enabled"]) for s in a.funnel["steps"]] == \
        [(s["step"], s["count"], s["enabled"]) for s in b.funnel["steps"]]


def test_ray_engine_gives_the_local_coreset(local_ray, pool, tmp_path):
    cfg = {"clusters": 10, "coarse_clusters": 3, "kmeans_train_size": 1000, "kmeans_iters": 6,
           "keep": "random", "seed": 5, "min_caption_chars": 20, "image_text_band": [0.2, 0.9],
           "centroid_band": [0.1, 0.7], "sample": 250, "block_size": 64}
    local = run_curation(cfg, out=tmp_path / "local", embeddings=pool)
    dist = run_curation(cfg, out=tmp_path / "ray", embeddings=pool, engine="ray")
    assert dist.funnel["engine"] == "ray" and local.funnel["engine"] == "local"
    _same(local, dist)
    dropped = pq.read_table(dist.dropped).to_pandas()
    assert set(dropped.step) == {"filter", "dedup", "image_text", "centroid", "sample"} and dist.count == 250
    assert ray.is_initialized()  # a running Ray is used, not stopped


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["median", "farthest"])
def test_ray_engine_equals_local_per_keep_rule(local_ray, pool, tmp_path, keep):
    cfg = {"clusters": 6, "kmeans_train_size": 1500, "kmeans_iters": 5, "keep": keep, "dedup_threshold": 0.9}
    _same(run_curation(cfg, out=tmp_path / "l", embeddings=pool),
          run_curation(cfg, out=tmp_path / "r", embeddings=pool, engine="ray"))


@pytest.mark.slow
def test_ray_embedding_actor_pool_matches_local_embedding(local_ray, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    pool = []
    for i in range(14):
        Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        pool.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a picture of {i % 4} circles"}]})
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    model = tiny_clip_folder(tmp_path / "siglip", "siglip")
    cfg = {"clusters": 2, "shard_size": 5, "embed_batch_size": 3, "ray_embed_actors": 2, "image_text_band": [0, 1],
           "centroid_band": [0, 1]}
    args = {"pool": tmp_path / "pool.json", "image_folder": tmp_path / "images", "model": model}
    local = run_curation(cfg, out=tmp_path / "l", **args)
    dist = run_curation(cfg, out=tmp_path / "r", engine="ray", **args)
    for i in range(3):
        for kind in ("img", "text"):
            a = np.load(tmp_path / "l" / "embeddings" / f"{kind}_emb" / f"{kind}_emb_{i}.npy")
            b = np.load(tmp_path / "r" / "embeddings" / f"{kind}_emb" / f"{kind}_emb_{i}.npy")
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert pq.read_table(local.kept).equals(pq.read_table(dist.kept))
