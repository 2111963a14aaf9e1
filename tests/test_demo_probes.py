"""The demo's measurements: stage-1 captions read back fact by fact, and the paired interval of the
coreset-vs-raw-pool difference."""

from __future__ import annotations

import numpy as np
import pytest

from bunny.data.synthetic import generate_world
from bunny.data.synthetic.scenes import caption, sample_scene
from bunny.demo_probes import paired_bootstrap, read_caption, score_caption
from bunny.eval.tasks import build_task, get_value

TASKS = ("mme", "pope", "gqa", "mmbench")


def test_a_true_caption_scores_every_fact_and_a_wrong_one_does_not():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        assert score_caption(text, scene) == {"objects": 1.0, "color_shape": 1.0, "shape_place": 1.0,
                                              "background": 1.0, "count": 1.0, "precision": 1.0}, text
    scene = sample_scene(np.random.default_rng(5), max_objects=1)
    o = scene.objects[0]
    other_color = "blue" if o.color != "blue" else "red"
    wrong = caption(scene, np.random.default_rng(0)).replace(f" {o.color} ", f" {other_color} ")
    s = score_caption(wrong, scene)
    assert s["objects"] == 0.0 and s["color_shape"] == 0.0 and s["shape_place"] == 1.0 and s["precision"] == 0.0
    assert read_caption("IMG_4821.jpg") == ([], None)
    assert score_caption("a large red circle at the top left and a large red circle", scene)["count"] in (0.0, 1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w") / "w", 60, seed=2, bench_size=40, tasks=TASKS)


def _oracle(task, target):
    if task == "mme":
        return str(target).capitalize()
    return str(target)


def _gain(world):
    def gain(task, scores):
        b = world.bench[task]
        m = b["metrics"][b["headline"]]
        return (float(get_value(scores, b["headline"])) - m["chance"]) / (m["max"] - m["chance"])
    return gain


def test_paired_interval_separates_a_better_arm_and_is_zero_for_identical_arms(world):
    tasks = [build_task(t, world.bench_dir) for t in TASKS]
    truth = {t.name: {d.key: _oracle(t.name, d.target) for d in t.docs()} for t in tasks}
    rng = np.random.default_rng(0)
    # the worse arm: right on about half of the questions, "No"/"A"/a colour on the rest
    noisy = {t.name: {k: (v if rng.random() < 0.5 else {"mme": "No", "pope": "no", "mmbench": "A"}.get(t.name, "red"))
                      for k, v in truth[t.name].items()} for t in tasks}
    res = paired_bootstrap(tasks, {"good": truth, "bad": noisy}, _gain(world), rounds=60)
    lo, hi = res["ci95"]
    assert res["difference"] > 0.2 and 0 < lo <= res["difference"] <= hi
    same = paired_bootstrap(tasks, {"a": noisy, "b": noisy}, _gain(world), rounds=20)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="two arms"):
        paired_bootstrap(tasks, {"a": noisy}, _gain(world), rounds=2)
