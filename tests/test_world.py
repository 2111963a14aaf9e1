"""The synthetic world: deterministic, defects in known proportions with their ground truth, answers
that follow from the scene facts, and benchmarks the evaluation's own loaders read and score."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bunny.data.synthetic import TASKS, Scene, generate_world, render, sample_scene
from bunny.data.synthetic.pool import LOW_INFO, defect_counts
from bunny.data.synthetic.scenes import COLORS, NUMBER_WORDS, description, position_name
from bunny.eval.tasks import build_task, get_value

N_POOL = 120
BENCH = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world") / "w", N_POOL, seed=3, bench_size=BENCH)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


def test_same_seed_same_files_other_seed_other_files(world, tmp_path):
    again = generate_world(tmp_path / "again", N_POOL, seed=3, bench_size=BENCH)
    assert tree_digest(again.root) == tree_digest(world.root)
    other = generate_world(tmp_path / "other", N_POOL, seed=4, bench_size=BENCH)
    a, b = tree_digest(world.root), tree_digest(other.root)
    common = a.keys() & b.keys()
    assert len(common) > 0.8 * len(a)
    assert sum(a[k] != b[k] for k in common) > 0.9 * len(common)


def test_second_call_reuses_the_world_and_other_settings_rewrite_it(world):
    before = (world.root / "pool.json").stat().st_mtime_ns
    w = generate_world(world.root, N_POOL, seed=3, bench_size=BENCH)
    assert w.reused and (world.root / "pool.json").stat().st_mtime_ns == before
    assert w.counts == world.counts and w.bench == world.bench


def test_layout_and_llava_samples(world):
    for name in ("pool.json", "instruct.json", "defects.parquet", "scenes.jsonl", "world.json", "bench/meta.json"):
        assert (world.root / name).is_file(), name
    pool = json.loads(world.pool_json.read_text())
    assert len(pool) == N_POOL
    for s in pool:
        assert (world.images_dir / s["image"]).is_file()
        assert [t["from"] for t in s["conversations"]] == ["human", "gpt"]
        assert s["conversations"][0]["value"] == "<image>"
    inst = json.loads(world.instruct_json.read_text())
    assert len(inst) == world.counts["instruct"]
    n_text = 0
    for s in inst:
        conv = s["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        text = "".join(t["value"] for t in conv)
        if "image" in s:
            assert (world.images_dir / s["image"]).is_file()
            assert text.count("<image>") == 1 and conv[0]["value"].startswith("<image>\n")
        else:
            n_text += 1
            assert "<image>" not in text
        assert all(t["value"].strip() for t in conv)
    assert n_text == world.counts["instruct_kinds"]["text"] > 0
    assert set(world.counts["instruct_kinds"]) == {"short", "yesno", "mc", "multi", "describe", "caption", "text"}


def test_defects_in_exact_proportions_with_ground_truth(world):
    df = pd.read_parquet(world.defects_parquet)
    pool = {s["id"]: s for s in json.loads(world.pool_json.read_text())}
    scenes = world.scenes()
    assert list(df["id"]) == list(pool)
    expected = defect_counts(N_POOL, world.config.defects)
    counts = df["defect"].value_counts().to_dict()
    for name, n in expected.items():
        assert counts.get(name, 0) == n, name
    assert counts["none"] == N_POOL - sum(expected.values())
    assert (df["is_defective"] == (df["defect"] != "none")).all()

    def cap(sid):
        return pool[sid]["conversations"][1]["value"]

    def facts(sid):
        return scenes[pool[sid]["image"]]

    def mentions_all(caption, fact):
        return all(f"{o['size']} {o['color']} {o['shape']}" in caption for o in fact["objects"]) \
            and fact["background"] in caption

    for row in df.itertuples():
        c, f = cap(row.id), facts(row.id)
        if row.defect == "none":
            assert mentions_all(c, f)
        elif row.defect == "near_duplicate":
            src = row.source
            assert df.set_index("id").loc[src, "defect"] == "none"
            assert f["objects"] == facts(src)["objects"] and mentions_all(c, f)
            a = np.asarray(Image.open(world.images_dir / pool[row.id]["image"]), dtype=float)
            b = np.asarray(Image.open(world.images_dir / pool[src]["image"]), dtype=float)
            assert np.abs(a - b).mean() < 25 and pool[row.id]["image"] != pool[src]["image"]
        elif row.defect == "mismatched_caption":
            assert not mentions_all(c, f) or facts(row.source) == f
            assert mentions_all(c, facts(row.source))
        elif row.defect == "blank_image":
            arr = np.asarray(Image.open(world.images_dir / pool[row.id]["image"]), dtype=float)
            assert arr.std(axis=(0, 1)).max() < 6 and f["objects"] == []
        elif row.defect == "low_info_caption":
            assert c in LOW_INFO or re.fullmatch(r"IMG_\d{4}\.jpg|picture \d+", c)


def test_rendering_puts_each_object_in_its_own_cell():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sc = sample_scene(rng)
        arr = np.asarray(render(sc, 48, rng), dtype=float)
        for o in sc.objects:
            centre = arr[o.row * 16 + 8, o.col * 16 + 8]
            assert np.abs(centre - np.array(COLORS[o.color])).max() < 30
        for r in range(3):
            for c in range(3):
                if sc.at(r, c) is None:  # an empty cell is background only
                    cell = arr[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
                    assert cell.std(axis=(0, 1)).max() < 12


def test_instruction_answers_follow_from_the_scene(world):
    scenes = world.scenes()
    checked = 0
    for s in json.loads(world.instruct_json.read_text()):
        if "image" not in s:
            continue
        sc = Scene.from_dict(scenes[s["image"]])
        conv = s["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            text = q["value"].replace("<image>\n", "")
            if "option's letter" in text:
                assert re.fullmatch("[A-D]", a["value"])
                continue
            if text.startswith(("How many objects are there?", "How many shapes are in the image?")):
                assert a["value"] == NUMBER_WORDS[len(sc.objects)]
                checked += 1
            elif text.startswith("What is the background?"):
                assert a["value"] == sc.background
                checked += 1
            elif m := re.match(r"What color is the (circle|square|triangle|diamond)\?", text):
                assert a["value"] == next(o.color for o in sc.objects if o.shape == m.group(1))
                checked += 1
            elif m := re.match(r"Where is the (\w+ )?(circle|square|triangle|diamond)\?", text):
                cands = [o for o in sc.objects if o.shape == m.group(2)
                         and (m.group(1) is None or m.group(1).strip() in (o.color, o.size))]
                assert a["value"] == position_name(cands[0].row, cands[0].col)
                checked += 1
            elif a["value"] in ("Yes", "No") and (m := re.match(fr"Is there an? ({'|'.join(COLORS)}) (circle|square|triangle|diamond) in (the|this) image\?", text)):
                assert (a["value"] == "Yes") == any(o.color == m.group(1) and o.shape == m.group(2) for o in sc.objects)
                checked += 1
        if s["conversations"][0]["value"].startswith("<image>\nDescribe"):
            assert s["conversations"][1]["value"] == description(sc)
    assert checked > 30


def test_benchmarks_are_held_out(world):
    scenes = world.scenes()
    train = {Scene.from_dict(v).signature() for v in scenes.values() if v["split"] in ("pool", "instruct")
             and v["objects"]}
    bench = [Scene.from_dict(v).signature() for v in scenes.values() if v["split"].startswith("bench/")]
    assert bench and not train & set(bench)
    assert len(bench) == len(set(bench))  # no two benchmark images share their facts either


def oracle(task: str, target) -> str:
    if task == "vqav2":
        return target["answers"][0]
    if task == "mme":
        return str(target).capitalize()
    return str(target)


@pytest.mark.parametrize("task", TASKS)
def test_eval_loaders_read_every_benchmark_and_the_truth_scores_the_maximum(world, task):
    t = build_task(task, world.bench_dir)
    docs = t.docs()
    meta = world.bench[task]
    assert len(docs) == meta.get("rows", meta["questions"])
    assert not t.missing_images()
    assert t.headline == meta["headline"]
    for d in docs[:5]:
        imgs = t.load_images(d)
        assert len(imgs) == d.prompt.count("<image>") == 1 and imgs[0].size == (48, 48)
    best = t.score({d.key: oracle(task, d.target) for d in docs})
    for name, m in meta["metrics"].items():
        assert get_value(best, name) == pytest.approx(m["max"]), name
    flipped = {"yes": "No", "no": "Yes"}  # yes/no tasks read an empty answer as one of the two
    worst = t.score({d.key: flipped.get(str(d.target).lower(), "") for d in docs})
    assert get_value(worst, meta["headline"]) < m["max"] / 2


def random_answer(task: str, doc, rng) -> str:
    if task in ("mme", "pope"):
        return ("Yes", "No")[rng.integers(2)]
    if task == "sqa":
        return "ABCDE"[rng.integers(doc.meta["n_choices"])]
    if task in ("seed", "mmbench"):
        return sorted(doc.meta["choices"])[rng.integers(len(doc.meta["choices"]))]
    if task == "mmmu" and doc.meta["type"] == "multiple-choice":
        return doc.meta["letters"][rng.integers(len(doc.meta["letters"]))]
    raise KeyError(task)


@pytest.mark.parametrize("task", ["mme", "pope", "sqa", "seed", "mmbench"])
def test_chance_levels_match_random_answering(world, task):
    """bench/meta.json's chance is the expected headline under uniform random answers."""
    t = build_task(task, world.bench_dir)
    docs = t.docs()
    rng = np.random.default_rng(0)
    runs = [get_value(t.score({d.key: random_answer(task, d, rng) for d in docs}), world.bench[task]["headline"])
            for _ in range(150)]
    chance, top = world.chance(task), world.bench[task]["metrics"][world.bench[task]["headline"]]["max"]
    assert abs(np.mean(runs) - chance) < 0.04 * top


def test_pope_negatives_are_built_the_pope_way(world):
    lines = {s: [json.loads(x) for x in (world.task_dir("pope") / f"coco_pope_{s}.json").read_text().splitlines()]
             for s in ("random", "popular", "adversarial")}
    scenes = world.scenes()
    present = {k.split("/")[-1]: {f"{o['color']} {o['shape']}" for o in v["objects"]}
               for k, v in scenes.items() if k.startswith("bench/pope/")}
    for rows in lines.values():
        assert sum(r["label"] == "yes" for r in rows) == sum(r["label"] == "no" for r in rows)
        for r in rows:
            obj = re.match(r"Is there an? (.+) in the image\?", r["text"]).group(1)
            assert (obj in present[r["image"]]) == (r["label"] == "yes")
    # popular negatives are the most frequent categories: fewer distinct ones than random negatives
    neg = {s: {r["text"] for r in rows if r["label"] == "no"} for s, rows in lines.items()}
    assert len(neg["popular"]) < len(neg["random"])


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of grid"):
        generate_world(tmp_path / "x", 20, image_size=50)
    with pytest.raises(ValueError, match="unknown defect"):
        generate_world(tmp_path / "y", 20, defects={"typo": 0.1})
    with pytest.raises(ValueError, match="clean"):
        generate_world(tmp_path / "z", 20, defects={"near_duplicate": 0.5, "blank_image": 0.45})


def test_synth_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bunny.cli", "synth", "--out", str(tmp_path / "w"), "--images", "30",
                          "--bench-size", "16", "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pool: 30 samples" in out.stdout and "bench/mmbench" in out.stdout
    assert json.loads((tmp_path / "w" / "world.json").read_text())["counts"]["pool"] == 30
