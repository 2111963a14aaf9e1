"""Hub names resolve through huggingface_hub: offline (``HF_HUB_OFFLINE=1``) from an HF cache laid out
here in the hub's own format (``models--org--name/refs/main`` + ``snapshots/<rev>/``), with
``HF_HUB_CACHE`` pointing at it. The loads run in a subprocess because huggingface_hub reads those
variables when it is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from _tiny import tiny_images, tiny_model, tiny_model_folder
from test_checkpoints_original import release_folder

import bunny
from bunny.model.hub import is_hub_name

REPO = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder`` into ``cache`` as the hub would after a download of ``repo_id`` at ``main``."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    shutil.copytree(folder, root / "snapshots" / REVISION)


def run_offline(cache: Path, code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO / "tests")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=cache.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _logits(model, processor) -> torch.Tensor:
    inputs = processor(text=["<image>\nWhat is this?"], images=tiny_images(1))
    with torch.no_grad():
        return model(**inputs).logits


def test_hub_name_shape():
    assert is_hub_name("BAAI/Bunny-v1_0-3B") and is_hub_name("microsoft/phi-2@main")
    assert not is_hub_name("/abs/path") and not is_hub_name("./runs/x") and not is_hub_name("model")


def test_hub_names_resolve_from_the_cache_offline(tmp_path):
    cache = tmp_path / "hf-cache"
    # a model folder of ours, a release whose mm_vision_tower is a hub id, and backbones to assemble from
    cache_repo(cache, "testorg/tiny-bunny", tiny_model_folder(tmp_path, name="ours"))
    release, _, _ = release_folder(tmp_path / "rel", mm_vision_tower="testorg/tiny-tower")
    cache_repo(cache, "testorg/tiny-tower", tmp_path / "rel" / "tower")
    model, processor = tiny_model(family="qwen2", seed=3)
    llm = tmp_path / "llm"
    model.language_model.save_pretrained(llm)
    processor.tokenizer.save_pretrained(llm)
    cache_repo(cache, "testorg/tiny-llm", llm)

    expected = _logits(*bunny.load_model(tmp_path / "ours")).sum().item()
    got = run_offline(cache, f"""
import json, bunny, torch
from test_hub import _logits
from bunny.model.assemble import assemble_model
out = {{}}
out["ours"] = _logits(*bunny.load_model("testorg/tiny-bunny")).sum().item()
m, p = bunny.load_model({str(release)!r})
out["release_encoder"] = m.config.vision_encoder
m, p = assemble_model("testorg/tiny-tower", "testorg/tiny-llm")
out["assembled"] = [m.config.vision_encoder, m.config.llm_family]
try:
    bunny.load_model("testorg/not-there")
except FileNotFoundError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
""")
    assert abs(got["ours"] - expected) < 1e-3
    assert got["release_encoder"] == "siglip"
    assert got["assembled"] == ["siglip", "qwen2"]
    assert "testorg/not-there" in got["error"] and str(cache) in got["error"] and "HF_HUB_OFFLINE=1" in got["error"]
