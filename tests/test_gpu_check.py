"""benchmarks/gpu_check.py in its CPU dry mode: the MFU step, attention and QLoRA checks run end to end
(shrunk sizes), GPU-only parts are reported as skipped with the reason, and a dated section is
appended to the results file. (The torchrun and eval checks take longer: `DRY=1 bash
benchmarks/gpu_check.sh` runs them all, ~1.5 min here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_runs_and_reports(tmp_path):
    out = tmp_path / "RESULTS_GPU.md"
    env = {**os.environ, "DRY": "1", "OMP_NUM_THREADS": "1", "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--only", "mfu,attention,qlora",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "## GPU check (DRY: CPU, shrunk sizes)" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "| ok |" in rows["mfu"] and "mfu_vs_measured_peak" in rows["mfu"] and "loss: " in rows["mfu"]
    assert "flash: skipped: a CUDA kernel" in rows["attention"] and "math: " in rows["attention"]
    assert "skipped (bitsandbytes 4-bit (QLoRA) needs CUDA" in rows["qlora"]
