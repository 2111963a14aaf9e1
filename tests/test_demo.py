"""`bunny demo --quick`: the whole recipe (synth -> backbones -> curate -> stage 1 -> stage 2 -> the eight
benchmarks -> report) through the project's own entry points, with its accuracy criteria checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bunny.data.synthetic.bench import TASKS

ROOT = Path(__file__).resolve().parents[1]
# The time target is for the 2-core machine alone; a shared CI box may set BUNNY_DEMO_SLOWDOWN.
SLOWDOWN = float(os.environ.get("BUNNY_DEMO_SLOWDOWN", "1.0"))


def test_yaml_presets_are_the_built_in_ones():
    from bunny.config import to_dict
    from bunny.demo import DemoConfig, load_demo_config, quick_config

    assert to_dict(load_demo_config(ROOT / "configs/demo/full.yaml", [], False)) == to_dict(DemoConfig())
    assert to_dict(load_demo_config(ROOT / "configs/demo/quick.yaml", [], True)) == to_dict(quick_config())
    cfg = load_demo_config(None, ["stage2.max_steps=7", "world.n_images=99"], quick=True)
    assert cfg.stage2["max_steps"] == 7 and cfg.world.n_images == 99


def test_bad_override_is_a_clear_error(capsys):
    from bunny.cli import main

    assert main(["demo", "--quick", "world.n_imagez=3"]) == 2
    assert "n_imagez" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bunny.cli", "demo", "--quick", "--out", str(out), "--cache",
                           str(cache)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, seconds


def test_quick_demo_scores_every_benchmark_consistently(quick_demo):
    """Both arms were evaluated on all eight benchmarks, and summary.json's figures agree with the
    benchmark folders' own scores.json (score within [0, max], gains computed from them)."""
    out, _, _ = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["coreset"]) == set(summary["raw_pool"]) == set(TASKS)
    assert summary["coreset"] == {t: summary[t] for t in TASKS}
    for arm in ("coreset", "raw_pool"):
        for task in TASKS:
            s = summary[arm][task]
            assert set(s) == {"score", "chance", "max"} and 0 <= s["chance"] < s["max"]
            assert 0 <= s["score"] <= s["max"], (arm, task, s)
            gain = (s["score"] - s["chance"]) / (s["max"] - s["chance"])
            assert summary["gain"][arm][task] == pytest.approx(gain, abs=2e-3)
            assert (out / arm / "eval" / task / "scores.json").is_file()
        mean = sum(summary["gain"][arm][t] for t in TASKS) / len(TASKS)
        assert summary["gain"][arm]["mean"] == pytest.approx(mean, abs=1e-3)


def _gains(summary: dict, arm: str) -> dict[str, float]:
    return {t: (summary[arm][t]["score"] - summary[arm][t]["chance"]) / (summary[arm][t]["max"] - summary[arm][t]["chance"])
            for t in TASKS}


def test_quick_demo_learns(quick_demo):
    """What the quick demo reaches today (docs/demo.md has the figures): the short-answer and yes/no
    benchmarks far above chance, the mean clearly above it, the coreset arm above the raw pool's with
    the interval above 0 (the data-centric result: the raw pool's mismatched captions teach its
    projector to name objects the image does not hold), and the recipe's phases (all but the
    backbones) within 8 minutes."""
    out, proc, _ = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    gains = _gains(summary, "coreset")
    for task in ("gqa", "vqav2", "pope"):
        assert gains[task] >= 0.4, (task, gains)
    assert gains["mme"] > 0, gains
    assert sum(gains.values()) / len(gains) >= 0.2, gains
    assert summary["gain"]["coreset"]["mean"] >= summary["gain"]["raw_pool"]["mean"] + 0.02, summary["gain"]
    assert summary["bootstrap"]["ci95"][0] > 0, summary["bootstrap"]
    recipe = sum(v for k, v in summary["seconds"].items() if k not in ("backbones", "total"))
    assert recipe <= 8 * 60 * SLOWDOWN, summary["seconds"]


def test_quick_demo_reaches_the_issues_targets(quick_demo):
    """The issue's `--quick` targets: mean normalised gain >= 0.3, every task above chance, the coreset
    arm at least the raw pool's (measured: 0.53 / 0.38 at the presets, 0.55 / 0.43 on one thread; with the
    pool's earlier mix 0.51 / 0.25; 0.38-0.41 at seeds 0-3 with the previous LM, docs/demo.md)."""
    out, _, _ = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    gains = _gains(summary, "coreset")
    for task in TASKS:
        assert summary[task]["score"] > summary[task]["chance"], (task, summary[task])
    assert sum(gains.values()) / len(gains) >= 0.3, gains
    assert summary["gain"]["coreset"]["mean"] >= summary["gain"]["raw_pool"]["mean"], summary["gain"]


def test_quick_demo_probe_ladder(quick_demo):
    """Every rung of the ladder was measured: the vision features carry the facts, the LM answers from
    ideal slots, stage 1 on the coreset grounds (held-out captions name the right colour+shape pairs
    far above the 1/24 of guessing, and name far fewer objects the image does not hold than the raw
    pool's stage 1), and the interval of the arms' difference is there."""
    out, proc, _ = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    ladder = summary["ladder"]
    assert ladder["a_vision_facts"]["color"] > 0.9 and ladder["a_vision_facts"]["shape"] > 0.7
    assert ladder["c_lm_ideal_input"]["mean"] > 0.6
    captions = ladder["d_stage1_captions"]
    assert captions["coreset"]["color_shape"] > 0.3 and captions["coreset"]["background"] > 0.5, captions
    assert captions["coreset"]["precision"] > captions["raw_pool"]["precision"] + 0.15, captions
    b = summary["bootstrap"]
    assert b["ci95"][0] <= b["difference"] <= b["ci95"][1]
    report = (out / "report.md").read_text()
    assert "Probe ladder" in report and "95% interval" in report
    assert "(d) stage-1 captions, coreset" in proc.stdout


def test_quick_demo_report_and_progress(quick_demo):
    out, proc, seconds = quick_demo
    report = out / "report.md"
    assert f"report: {report}" in proc.stdout.strip().splitlines()[-1]
    text = report.read_text()
    for png in ("funnel.png", "losses.png", "benchmarks.png"):
        assert (out / png).stat().st_size > 5000 and f"({png})" in text
    for phase in ("synth", "backbones", "curate", "stage 1 (coreset)", "stage 2 (raw_pool)", "eval (raw_pool)"):
        assert f"{phase} done in" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    cur = summary["curation"]
    assert cur["defect_rate_coreset"] < cur["defect_rate_pool"]  # curation removed injected defects
    assert summary["peak_rss_mb"] < 4096
    print(f"quick demo: {seconds:.0f} s wall, phases {summary['seconds']}, mean gain {summary['gain']}")
