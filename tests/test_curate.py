"""bunny curate, local engine: each step against a reference, the whole pipeline on a planted pool,
the outputs and the funnel, every step switched off, the CLI and the Python entry point."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bunny.cli import main as bunny_main
from bunny.config import ConfigError
from bunny.curate import CurateConfig, CurateError, run_curation
from bunny.curate.cluster import Clustering, train
from bunny.curate.dedup import components, dedup_cluster, pick_members
from bunny.curate.io import open_layout, read_rows
from bunny.curate.select import band_bounds, basic_filter, random_sample, rank_band
from bunny.curate.synthetic import dedup_quality, planted_pool

N, DIM = 3000, 48
SMALL = {"clusters": 8, "kmeans_train_size": 2000, "kmeans_iters": 8}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3,000 rows in 3 shards (the last one short), 20% of them in planted near-duplicate groups."""
    root = tmp_path_factory.mktemp("curate") / "emb"
    group = planted_pool(root, N, dim=DIM, shard_rows=1100, points_per_topic=300, image_paths=True, seed=1)
    return root, group


@pytest.fixture(scope="module")
def default_run(pool, tmp_path_factory):
    root, _ = pool
    out = tmp_path_factory.mktemp("curate-out")
    return run_curation(SMALL, out=out, embeddings=root)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_components(emb: np.ndarray, threshold: float) -> np.ndarray:
    """Dense float64 similarities, then components by repeated min-label propagation."""
    sim = emb.astype(np.float64) @ emb.astype(np.float64).T
    adj = sim > threshold
    label = np.arange(len(emb))
    while True:
        new = np.array([label[adj[i] | (np.arange(len(emb)) == i)].min() for i in range(len(emb))])
        if np.array_equal(new, label):
            return label
        label = new


def clustered_unit(seed: int, n: int = 300, d: int = 24) -> np.ndarray:
    """Rows near a few bases with varied noise: many pairs on both sides of 0.86, chains included."""
    rng = np.random.default_rng(seed)
    bases = unit(rng, 6, d)
    x = bases[rng.integers(0, 6, n)] + rng.uniform(0.05, 0.6, (n, 1)) * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocked_components_equal_dense_reference(seed):
    emb = clustered_unit(seed)
    ref = reference_components(emb, 0.86)
    assert 5 < len(np.unique(ref)) < len(emb) - 20  # the data really has merged components
    for block, matmul in ((7, "float32"), (64, "float32"), (1000, "float32"), (50, "bf16"), (1000, "bf16")):
        np.testing.assert_array_equal(components(emb, 0.86, block, matmul), ref, err_msg=f"{block} {matmul}")


def test_blocked_components_memory_is_bounded():
    """One 4,000-row cluster: the dense matrix would be 64 MB; blocks of 400 stay far below."""
    emb = unit(np.random.default_rng(0), 4000, 16)
    emb[1::2] = emb[::2]  # 2,000 exact pairs
    tracemalloc.start()
    label = components(emb, 0.86, block_size=400, matmul="float32")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(label)) <= 2000
    np.testing.assert_array_equal(label[1::2], label[::2])
    assert peak < 4000 * 4000 * 4 / 10, f"peak {peak / 2**20:.1f} MiB"


def test_keep_rules_pick_by_distance_to_centroid():
    rng = np.random.default_rng(0)
    base = unit(rng, 1, 16)[0]
    emb = np.stack([base] * 5 + list(unit(rng, 2, 16)))  # one group of 5 identical rows, 2 singletons
    gidx = np.array([10, 11, 12, 13, 14, 20, 30])
    cent = np.array([0.5, 0.9, 0.7, 0.1, 0.3, 0.2, 0.2])  # nearest first: 11, 12, 10, 14, 13
    pick = {k: dedup_cluster(emb, gidx, cent, 0.86, keep=k) for k in ("median", "nearest", "farthest", "random")}
    assert list(pick["median"]) == [10] * 5 + [20, 30]
    assert list(pick["nearest"]) == [11] * 5 + [20, 30]
    assert list(pick["farthest"]) == [13] * 5 + [20, 30]
    assert pick["random"][0] in gidx[:5] and list(pick["random"][5:]) == [20, 30]
    draws = {int(dedup_cluster(emb, gidx, cent, 0.86, keep="random", seed=s)[0]) for s in range(40)}
    assert len(draws) >= 3  # the seed moves the draw
    # median of an even group: the nearer of the two middle members
    assert list(pick_members(np.array([0, 0, 0, 0]), np.arange(4), np.array([0.4, 0.3, 0.2, 0.1]), "median", 0)) \
        == [1] * 4


def test_rank_band_sample_and_filters():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.5, 0.2, 0.8, 0.6, 0.4])
    gidx = np.arange(10)
    assert band_bounds(10, (0.4, 0.6)) == (4, 6)
    keep = rank_band(scores, gidx, (0.4, 0.6))  # descending: 0.9 .8 .7 .6 | .5(2) .5(5) | .4 ...
    assert list(np.flatnonzero(keep)) == [2, 5]
    assert rank_band(scores, gidx, (0.0, 1.0)).all()
    assert random_sample(10, 4, 0).sum() == 4 and random_sample(10, None, 0).all() and random_sample(3, 9, 0).all()
    assert np.array_equal(random_sample(1000, 10, 5), random_sample(1000, 10, 5))
    cfg = CurateConfig(min_caption_words=2, min_caption_chars=5, min_image_side=100, max_aspect_ratio=2.0)
    caps = pa.array(["a long caption", "one", None, "two words", "fine caption"])
    w, h = np.array([200, 200, 200, 90, 500]), np.array([150, 150, 150, 300, 200])
    assert list(basic_filter(caps, w, h, cfg)) == [True, False, False, False, False]


def test_two_level_kmeans_assigns_inside_the_nearest_cell():
    x = clustered_unit(3, n=2000, d=24)
    cfg = CurateConfig(clusters=20, coarse_clusters=4, kmeans_iters=5, kmeans_rounds=2)
    cl = train(lambda r: x[r::2], cfg)  # a different sample per round, warm-started
    assert cl.k == 20 and cl.offsets[-1] == 20 and len(cl.coarse) == 4
    cluster, sim = cl.assign(x)
    cell = np.argmax(x @ cl.coarse.T, axis=1)
    for i in range(0, 2000, 97):
        lo, hi = cl.offsets[cell[i]], cl.offsets[cell[i] + 1]
        assert lo <= cluster[i] < hi
        assert cluster[i] == lo + np.argmax(cl.centroids[lo:hi] @ x[i])
        assert sim[i] == pytest.approx(float(cl.centroids[cluster[i]] @ x[i]), abs=1e-5)
    flat, _ = Clustering(cl.centroids).assign(x)
    assert (flat == cluster).mean() > 0.8  # two levels approximate the flat assignment


def test_local_pipeline_end_to_end(pool, default_run):
    root, group = pool
    res = default_run
    counts = res.counts()
    assert list(counts) == ["input", "filter", "kmeans", "cluster", "dedup", "image_text", "centroid", "sample"]
    assert counts["input"] == counts["filter"] == counts["cluster"] == N
    # planted near-duplicates found: one member per group kept
    dropped = pq.read_table(res.dropped).to_pandas()
    dups = dropped[dropped.step == "dedup"]
    q = dedup_quality(group, dups.key.astype(int).to_numpy(), dups.duplicate_of.astype(int).to_numpy())
    assert q["recall"] > 0.95 and q["precision"] > 0.99, q
    assert counts["dedup"] == N - len(dups)
    # bands keep their rank fractions of what came in
    n_dedup = counts["dedup"]
    lo, hi = band_bounds(n_dedup, (0.4, 0.6))
    assert counts["image_text"] == hi - lo
    lo, hi = band_bounds(counts["image_text"], (0.15, 0.35))
    assert counts["centroid"] == hi - lo == counts["sample"] == res.count
    # kept + dropped partition the input; each dropped key names its step
    kept = pq.read_table(res.kept).to_pandas()
    assert len(kept) == res.count and set(kept.columns) >= {"key", "caption"}
    assert len(set(kept.key) | set(dropped.key)) == N and not set(kept.key) & set(dropped.key)
    assert dropped.step.value_counts().to_dict() == {
        "dedup": N - n_dedup, "image_text": n_dedup - counts["image_text"],
        "centroid": counts["image_text"] - counts["centroid"]}
    assert dropped.duplicate_of.notna().sum() == len(dups)
    assert set(dups.duplicate_of) <= set(dropped.key[dropped.step != "dedup"]) | set(kept.key)
    # the coreset in LLaVA plain format, and the funnel
    coreset = json.loads(res.coreset.read_text())
    assert [s["id"] for s in coreset] == list(kept.key)
    assert coreset[0]["image"] == f"images/{coreset[0]['id']}.jpg"
    assert coreset[0]["conversations"] == [{"from": "human", "value": "<image>"},
                                           {"from": "gpt", "value": f"caption of sample {int(coreset[0]['id'])}"}]
    funnel = json.loads(res.funnel_json.read_text())
    assert [s["count"] for s in funnel["steps"]] == list(counts.values())
    assert funnel["config"]["dedup_threshold"] == 0.86 and funnel["clusters"] == 8
    assert all(s["seconds"] >= 0 for s in funnel["steps"])
    assert res.funnel_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.funnel_png.stat().st_size > 5000
    assert not list(res.out.glob(".spill-*"))  # the spill is cleaned up


def test_same_input_same_coreset_whatever_the_memory_settings(pool, default_run, tmp_path):
    """Spill partitions, similarity blocks, the dedup product and the threads change how, not what."""
    root, _ = pool
    res = run_curation(SMALL | {"spill_partition_mb": 0.1, "block_size": 128, "dedup_matmul": "bf16", "threads": 1},
                       out=tmp_path, embeddings=root)
    assert res.counts() == default_run.counts()
    assert res.funnel["steps"][4]["spill_partitions"] == 6 and default_run.funnel["steps"][4]["spill_partitions"] == 1
    for name in ("kept.parquet", "dropped.parquet"):
        assert pq.read_table(tmp_path / name).equals(pq.read_table(default_run.out / name))


def test_every_step_is_configurable(pool, default_run, tmp_path):
    root, _ = pool
    off = run_curation(SMALL | {"dedup_threshold": None, "image_text_band": [0, 1], "centroid_band": [0, 1]},
                       out=tmp_path / "off", embeddings=root)
    assert set(off.counts().values()) == {N} and off.counts()["sample"] == N
    assert [s["enabled"] for s in off.funnel["steps"]] == [True, False, False, False, False, False, False, False]
    on = run_curation(SMALL | {"min_caption_chars": 21, "dedup_threshold": 0.9, "keep": "farthest",
                               "image_text_band": [0.1, 0.9], "centroid_band": [0.0, 0.5], "sample": 300, "seed": 3,
                               "write_scores": True},
                      out=tmp_path / "on", embeddings=root)
    c = on.counts()
    assert c["filter"] == N - 100  # "caption of sample 0" .. "99" are 20 characters or fewer
    assert c["dedup"] < c["cluster"] and c["sample"] == 300
    assert on.funnel["config"]["keep"] == "farthest"
    dropped = pq.read_table(on.dropped).to_pandas()
    assert set(dropped.step) == {"filter", "dedup", "image_text", "centroid", "sample"}
    assert dropped[dropped.step == "filter"].key.astype(int).max() == 99
    scores = pq.read_table(on.out / "scores.parquet").to_pandas()
    assert len(scores) == N and (scores.step == "kept").sum() == 300
    assert dict(zip(dropped.key, dropped.step)) == dict(scores[scores.step != "kept"][["key", "step"]].values)
    scored = scores[scores.step != "filter"]  # filtered rows are never scored
    assert scored.cluster.between(0, 7).all() and (scored.centroid_sim > 0).all()
    assert (scores[scores.step == "filter"].cluster == -1).all()
    # the centroid band kept the half of the image-text survivors most similar to their centroids
    after_it = scores[scores.step.isin(["kept", "sample", "centroid"])]
    kept_sims = after_it[after_it.step != "centroid"].centroid_sim
    assert kept_sims.min() >= after_it[after_it.step == "centroid"].centroid_sim.max()


def test_parquet_vectors_give_the_same_coreset(pool, default_run, tmp_path):
    """embedding-reader's parquet format (list column + id column) instead of .npy."""
    root, _ = pool
    emb = tmp_path / "emb"
    shutil.copytree(root / "metadata", emb / "metadata")
    for kind in ("img", "text"):
        (emb / f"{kind}_emb").mkdir()
        for i in range(3):
            x = np.load(root / f"{kind}_emb" / f"{kind}_emb_{i}.npy").astype(np.float32)
            keys = pq.read_table(root / "metadata" / f"metadata_{i}.parquet")["key"]
            table = pa.table({"id": keys, "embedding": pa.array(list(x), pa.list_(pa.float32()))})
            pq.write_table(table, emb / f"{kind}_emb" / f"{kind}_emb_{i}.parquet", row_group_size=400)
    res = run_curation(SMALL, out=tmp_path / "out", embeddings=emb)
    assert pq.read_table(res.kept).equals(pq.read_table(default_run.kept))
    # ids that do not line up with the metadata are an error naming the row
    table = pq.read_table(emb / "img_emb" / "img_emb_1.parquet")
    ids = table["id"].to_pylist()
    ids[5], ids[6] = ids[6], ids[5]
    pq.write_table(table.set_column(0, "id", pa.array(ids)), emb / "img_emb" / "img_emb_1.parquet")
    with pytest.raises(CurateError, match=r"img_emb_1.parquet: shard 1 row 5 \(sample 1105\) has id '000001106'"):
        run_curation(SMALL, out=tmp_path / "out2", embeddings=emb)


# ---- bad input: a clear error naming the shard and the row --------------------------------------

def _copy(root, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(root, dst)
    return dst


def _edit_npy(path, fn):
    x = np.load(path)
    np.save(path, fn(x))


@pytest.mark.parametrize("case, pattern", [
    ("nan", r"img_emb_1.npy: shard 1 row 7 \(sample 1107\) has NaN or infinite values"),
    ("inf_text", r"text_emb_2.npy: shard 2 row 3 \(sample 2203\) has NaN or infinite values"),
    ("zero", r"img_emb_0.npy: shard 0 row 12 \(sample 12\) is an all-zero vector"),
    ("rows", r"shard 1: row counts differ: img_emb_1.npy has 1099, text_emb_1.npy has 1100, "
             r"metadata_1.parquet has 1100"),
    ("text_dim", r"shard 0: image vectors have dim 48 \(img_emb_0.npy\) but text vectors have dim 40"),
    ("shard_dim", r"shard 2: dim 40 \(img_emb_2.npy\) differs from shard 0's dim 48"),
    ("dup_key", r"duplicate key '000000004': metadata_0.parquet shard 0 row 4 \(sample 4\) and "
                r"metadata_2.parquet shard 2 row 10 \(sample 2210\)"),
    ("missing", r"shard 1 has no text_emb/text_emb_1"),
    ("no_key", r"metadata_0.parquet: no `key` column"),
    ("one_d", r"img_emb_0.npy: expected a 2-D array"),
    ("empty_band", r"step `image_text` left no samples \(\d+ went in\); widen image_text_band"),
    ("no_caption_left", r"step `filter` left no samples \(3000 went in\)"),
])
def test_bad_input_names_shard_and_row(pool, tmp_path, case, pattern):
    root = _copy(pool[0], tmp_path)
    cfg = dict(SMALL)
    img, txt, meta = root / "img_emb", root / "text_emb", root / "metadata"
    if case == "nan":
        _edit_npy(img / "img_emb_1.npy", lambda x: (x.__setitem__((7, 3), np.nan), x)[1])
    elif case == "inf_text":
        _edit_npy(txt / "text_emb_2.npy", lambda x: (x.__setitem__((3, 0), np.inf), x)[1])
    elif case == "zero":
        _edit_npy(img / "img_emb_0.npy", lambda x: (x.__setitem__(12, 0), x)[1])
    elif case == "rows":
        _edit_npy(img / "img_emb_1.npy", lambda x: x[:-1])
    elif case == "text_dim":
        _edit_npy(txt / "text_emb_0.npy", lambda x: x[:, :40])
    elif case == "shard_dim":
        _edit_npy(img / "img_emb_2.npy", lambda x: x[:, :40])
        _edit_npy(txt / "text_emb_2.npy", lambda x: x[:, :40])
    elif case == "dup_key":
        t = pq.read_table(meta / "metadata_2.parquet")
        keys = t["key"].to_pylist()
        keys[10] = "000000004"
        pq.write_table(t.set_column(0, "key", pa.array(keys)), meta / "metadata_2.parquet")
    elif case == "missing":
        (txt / "text_emb_1.npy").unlink()
    elif case == "no_key":
        t = pq.read_table(meta / "metadata_0.parquet")
        pq.write_table(t.rename_columns(["name", *t.column_names[1:]]), meta / "metadata_0.parquet")
    elif case == "one_d":
        _edit_npy(img / "img_emb_0.npy", lambda x: x.ravel())
    elif case == "empty_band":
        cfg["image_text_band"] = [0.5, 0.5001]
    elif case == "no_caption_left":
        cfg["min_caption_words"] = 50
    with pytest.raises(CurateError, match=pattern):
        run_curation(cfg, out=tmp_path / "out", embeddings=root)


def test_bad_settings_are_config_errors(pool, tmp_path):
    for bad in ({"keep": "first"}, {"image_text_band": [0.6, 0.4]}, {"clusters": 0}, {"dedup_threshold": 2},
                {"sample": 0}, {"cluster": 5}, {"coarse_clusters": 9, "clusters": 8}):
        with pytest.raises(ConfigError):
            run_curation(bad, out=tmp_path, embeddings=pool[0])
    with pytest.raises(CurateError, match="missing folder img_emb/"):
        run_curation(SMALL, out=tmp_path, embeddings=tmp_path)


def test_cli_runs_and_reports(pool, tmp_path, capsys):
    root, _ = pool
    cfg = tmp_path / "c.yaml"
    cfg.write_text("clusters: 8\nkmeans_train_size: 2000\nkmeans_iters: 8\nsample: 50\n")
    rc = bunny_main(["curate", str(cfg), "--embeddings", str(root), "--out", str(tmp_path / "o"), "seed=1",
                     "centroid_band=[0,1]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "coreset of 50 samples" in out and "dedup" in out and "(off)" in out
    assert json.loads((tmp_path / "o" / "funnel.json").read_text())["config"]["seed"] == 1
    rc = bunny_main(["curate", "--embeddings", str(root), "--out", str(tmp_path / "o2"), "keep=oldest"])
    assert rc == 2 and "keep: expected one of" in capsys.readouterr().err
    rc = bunny_main(["curate", "--out", str(tmp_path / "o3")])
    assert rc == 2 and "give either --embeddings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bunny_main(["curate", "--help"])
    assert "bunny curate --pool pool.json" in capsys.readouterr().out


def test_read_rows_matches_full_read(pool):
    layout = open_layout(pool[0])
    gidx = np.array([0, 5, 1099, 1100, 2999])
    got = read_rows(layout, gidx)
    want = np.concatenate([np.load(pool[0] / "img_emb" / f"img_emb_{i}.npy") for i in range(3)])[gidx].astype(np.float32)
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)


def test_an_empty_shard_is_accepted_with_a_log_line(pool, tmp_path, caplog):
    root = tmp_path / "emb"
    shutil.copytree(pool[0], root)
    np.save(root / "img_emb" / "img_emb_3.npy", np.zeros((0, DIM), dtype=np.float32))
    np.save(root / "text_emb" / "text_emb_3.npy", np.zeros((0, DIM), dtype=np.float32))
    schema = pq.read_schema(root / "metadata" / "metadata_0.parquet")
    pq.write_table(schema.empty_table(), root / "metadata" / "metadata_3.parquet")
    with caplog.at_level("WARNING", logger="bunny.curate"):
        layout = open_layout(root)
    assert layout.n == N and [s.rows for s in layout.shards][-1] == 0
    assert any("shard 3 is empty" in r.getMessage() and "img_emb_3.npy" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="bunny.curate"):
        open_layout(pool[0])
    assert not any("empty" in r.getMessage() for r in caplog.records)
