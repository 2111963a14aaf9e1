"""The two shipped examples, in full, on `bunny synth` output, through the `bunny` command (slow).

"Under a minute here" is checked as the CPU time the run costs (the process uses one thread, so on
an idle machine that is its wall time); the wall time on a shared machine is reported alongside.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bunny

REPO = Path(__file__).resolve().parents[1]


def _bunny(*args: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "bunny.cli", *args], capture_output=True, text=True)
    wall = time.time() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


@pytest.mark.slow
def test_tiny_examples_in_full(tmp_path):
    world = tmp_path / "world"
    _bunny("synth", "--out", str(world))
    common = [f"image_folder={world / 'images'}", "progress_bar=false"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    cpu1, wall1 = _bunny("train", str(REPO / "configs/examples/tiny-pretrain.yaml"), f"data_path={world / 'pool.json'}",
                         f"output_dir={s1}", *common)
    cpu2, wall2 = _bunny("train", str(REPO / "configs/examples/tiny-finetune.yaml"),
                         f"data_path={world / 'instruct.json'}", f"output_dir={s2}", f"projector_from={s1}", *common)
    print(f"tiny-pretrain: {cpu1:.1f} s CPU, {wall1:.1f} s wall; tiny-finetune: {cpu2:.1f} s CPU, {wall2:.1f} s wall")
    assert cpu1 < 60 and cpu2 < 60
    for out in (s1, s2):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first, last = records[0]["loss"], records[-1]["loss"]
        assert last < first - 0.2, (out, first, last)  # it learns
        model, processor = bunny.load_model(out / "final")
        assert model.config.num_image_tokens == processor.num_image_tokens
        assert (out / "loss.png").is_file()
