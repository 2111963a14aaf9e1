"""bunny curate, step 1: embedding a pool with a real SiglipModel / CLIPModel folder (tiny, random,
saved with save_pretrained): batched, sharded, resumable, bad images, and the pool-mode pipeline."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from bunny.cli import main as bunny_main
from bunny.curate import CurateError, run_curation
from bunny.curate.config import CurateConfig
from bunny.curate.embed import Embedder, embed_pool
from bunny.curate.io import open_layout
from bunny.curate.tiny import tiny_clip_folder
from bunny.data.images import load_image
from bunny.data.samples import read_samples, validate

N = 23
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _scene(i: int) -> tuple[Image.Image, str]:
    rng = np.random.default_rng(i)
    w, h = (48, 32) if i % 3 else (30, 40)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
    color = COLORS[i % len(COLORS)]
    x, y = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
    ImageDraw.Draw(img).ellipse([x, y, x + 12, y + 12], fill=color)
    return img, f"a {color} circle on the {'left' if x < w / 2 else 'right'}" + " of the image" * (i % 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """23 images (two of them exact copies of others) and their LLaVA plain pool; two model folders."""
    root = tmp_path_factory.mktemp("embed")
    (root / "images").mkdir()
    pool = []
    for i in range(N):
        img, cap = _scene(i if i < N - 2 else i - 20)  # the last two repeat scenes 1 and 2
        img.save(root / "images" / f"{i:03d}.png")
        pool.append({"id": f"s{i:03d}", "image": f"{i:03d}.png",
                     "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": cap}]})
    (root / "pool.json").write_text(json.dumps(pool))
    captions = [p["conversations"][1]["value"] for p in pool]
    models = {kind: tiny_clip_folder(root / kind, kind, captions=captions) for kind in ("siglip", "clip")}
    return root, pool, models


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_embeddings_are_the_models_batched_and_sharded(world, tmp_path, kind):
    root, pool, models = world
    cfg = CurateConfig(embed_batch_size=4, shard_size=10)
    out = embed_pool(root / "pool.json", root / "images", models[kind], tmp_path / "emb", cfg)
    layout = open_layout(out)
    assert [s.rows for s in layout.shards] == [10, 10, 3] and layout.dim == 32
    meta = pq.read_table(out / "metadata" / "metadata_1.parquet").to_pylist()
    assert meta[0] == {"key": "s010", "caption": pool[10]["conversations"][1]["value"], "image": "010.png",
                       "width": 48, "height": 32, "bytes": (root / "images" / "010.png").stat().st_size}
    # row r of shard 1 is sample 10 + r, embedded alone by the model itself
    model = AutoModel.from_pretrained(models[kind]).eval()
    proc, tok = AutoImageProcessor.from_pretrained(models[kind]), AutoTokenizer.from_pretrained(models[kind])
    img = np.load(out / "img_emb" / "img_emb_1.npy")
    txt = np.load(out / "text_emb" / "text_emb_1.npy")
    for r in (0, 5, 9):
        i = 10 + r
        with torch.inference_mode():
            pix = proc(images=[load_image(root / "images" / pool[i]["image"])], return_tensors="pt")["pixel_values"]
            want_img = model.get_image_features(pixel_values=pix)
            enc = tok([pool[i]["conversations"][1]["value"]], return_tensors="pt",
                      padding="max_length" if kind == "siglip" else True, max_length=32, truncation=True)
            want_txt = model.get_text_features(input_ids=enc["input_ids"],
                                               **({} if kind == "siglip" else {"attention_mask": enc["attention_mask"]}))
        want_img = getattr(want_img, "pooler_output", want_img)
        want_txt = getattr(want_txt, "pooler_output", want_txt)
        np.testing.assert_allclose(img[r], want_img[0].numpy(), atol=2e-5)
        np.testing.assert_allclose(txt[r], want_txt[0].numpy(), atol=2e-5)
    assert np.abs(img[0] - img[1]).max() > 1e-3  # different images, different vectors


def test_resume_redoes_only_unfinished_shards(world, tmp_path):
    root, _, models = world
    cfg = CurateConfig(embed_batch_size=8, shard_size=10)
    out = embed_pool(root / "pool.json", root / "images", models["siglip"], tmp_path / "emb", cfg)
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "img_emb").iterdir()}
    (out / "metadata" / "metadata_1.parquet").unlink()  # as if the run died while writing shard 1
    os.utime(out / "img_emb" / "img_emb_0.npy", ns=(1, 1))
    stats_before = json.loads((out / "embed_stats.json").read_text())
    embed_pool(root / "pool.json", root / "images", models["siglip"], tmp_path / "emb", cfg)
    assert (out / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns == 1  # finished shard left alone
    assert (out / "img_emb" / "img_emb_1.npy").stat().st_mtime_ns != first["img_emb_1.npy"][0]
    for name, (_, data) in first.items():
        assert (out / "img_emb" / name).read_bytes() == data  # same vectors either way
    stats = json.loads((out / "embed_stats.json").read_text())
    assert stats_before["shards_this_run"] == 3 and stats["shards_this_run"] == 1 and stats["embedded"] == N
    with pytest.raises(CurateError, match=r"holds embeddings made with other settings \(shard_size differ\)"):
        embed_pool(root / "pool.json", root / "images", models["siglip"], out, CurateConfig(shard_size=7))


def test_bad_images_stop_or_are_dropped_and_reported(world, tmp_path):
    root, pool, models = world
    images = tmp_path / "images"
    images.mkdir()
    for p in pool:
        (images / p["image"]).write_bytes((root / "images" / p["image"]).read_bytes())
    (images / "007.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CurateError, match=r"pool sample 's007': .*007.png: cannot decode image"):
        run_curation({"clusters": 2}, out=tmp_path / "o1", pool=root / "pool.json", image_folder=images,
                     model=models["clip"])
    res = run_curation({"clusters": 2, "bad_images": "drop", "min_caption_words": 7, "dedup_threshold": 0.9999,
                        "image_text_band": [0, 1], "centroid_band": [0, 1]},
                       out=tmp_path / "o2", pool=root / "pool.json", image_folder=images, model=models["clip"])
    short = sum(len(p["conversations"][1]["value"].split()) < 7 for p in pool)
    counts = res.counts()
    assert counts["input"] == N and counts["filter"] == N - short and counts["embed"] == N - short - 1
    dropped = pq.read_table(res.dropped).to_pandas()
    assert dropped[dropped.step == "unreadable"].key.tolist() == ["s007"]
    assert len(dropped[dropped.step == "filter"]) == short
    assert res.funnel["steps"][2]["embedded"] == N - short - 1
    kept = pq.read_table(res.kept).to_pandas()
    assert len(kept) + len(dropped) == N and "s007" not in set(kept.key)


def test_pool_errors_name_the_sample(world, tmp_path):
    root, pool, models = world
    cases = [
        (pool + [pool[3]], r"sample 23: duplicate id 's003' \(also sample 3\)"),
        ([{"id": "x", "image": "000.png", "conversations": [{"from": "human", "value": "<image>"}]}],
         r"sample 0 \(id 'x'\): no caption"),
        ([{"id": "x", "conversations": []}], r"sample 0 \(id 'x'\): no `image` path"),
        ({"samples": pool}, r"expected a JSON list"),
    ]
    for i, (data, pattern) in enumerate(cases):
        path = tmp_path / f"pool{i}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(CurateError, match=pattern):
            run_curation(None, out=tmp_path / "o", pool=path, image_folder=root / "images", model=models["siglip"])
    with pytest.raises(CurateError, match="cannot load a CLIP-like model folder"):
        Embedder(tmp_path)


def test_pool_mode_cli_writes_a_valid_llava_coreset(world, tmp_path, capsys):
    root, _, models = world
    out = tmp_path / "coreset"
    rc = bunny_main(["curate", "--pool", str(root / "pool.json"), "--image-folder", str(root / "images"),
                     "--model", str(models["siglip"]), "--out", str(out), "clusters=3", "image_mode=pad",
                     "dedup_threshold=0.99999", "image_text_band=[0,1]", "centroid_band=[0,0.8]", "sample=10"])
    assert rc == 0, capsys.readouterr().err
    assert "coreset of 10 samples" in capsys.readouterr().out
    funnel = json.loads((out / "funnel.json").read_text())
    assert [s["step"] for s in funnel["steps"]][:3] == ["input", "filter", "embed"]
    dropped = pq.read_table(out / "dropped.parquet").to_pandas()
    # the two exact copies (samples 21 and 22 repeat scenes 1 and 2) fold into their originals
    dups = dict(zip(dropped[dropped.step == "dedup"].key, dropped[dropped.step == "dedup"].duplicate_of))
    assert {frozenset(p) for p in dups.items()} >= {frozenset({"s001", "s021"}), frozenset({"s002", "s022"})}
    samples, issues = read_samples(out / "coreset.json")
    report = validate(samples, image_folder=root / "images", read_issues=issues)
    assert not report.issues and len(report.samples) == 10
    assert (out / "embeddings" / "embed.json").is_file() and (out / "funnel.png").is_file()


def test_keep_largest_keeps_the_biggest_copy_of_a_duplicate_group(world, tmp_path):
    """Two files of one picture (same pixels, so the same embedding) at different compression: the
    larger file stays whichever comes first; without the `bytes` column the rule is a clear error."""
    root, pool, models = world
    images = tmp_path / "images"
    images.mkdir()
    for i, p in enumerate(pool):
        img = load_image(root / "images" / p["image"])
        # sample 21 repeats scene 1 (larger file), sample 22 repeats scene 2 (smaller file)
        level = {21: 0, 1: 9, 22: 9, 2: 0}.get(i, 6)
        img.save(images / p["image"], compress_level=level)
    sizes = {i: (images / pool[i]["image"]).stat().st_size for i in (1, 2, 21, 22)}
    assert sizes[21] > sizes[1] and sizes[2] > sizes[22]
    res = run_curation({"clusters": 2, "dedup_threshold": 0.9999, "keep": "largest", "image_text_band": [0, 1],
                        "centroid_band": [0, 1]}, out=tmp_path / "o", pool=root / "pool.json", image_folder=images,
                       model=models["siglip"])
    dropped = pq.read_table(res.out / "dropped.parquet").to_pandas()
    dups = dict(zip(dropped[dropped.step == "dedup"].key, dropped[dropped.step == "dedup"].duplicate_of))
    assert dups == {"s001": "s021", "s022": "s002"}
    emb = tmp_path / "o" / "embeddings"
    for f in (emb / "metadata").iterdir():  # as if embedded by a tool that does not record file sizes
        pq.write_table(pq.read_table(f).drop_columns(["bytes"]), f)
    with pytest.raises(CurateError, match="keep=largest needs a `bytes` column"):
        run_curation({"clusters": 2, "keep": "largest"}, out=tmp_path / "o2", embeddings=emb)
