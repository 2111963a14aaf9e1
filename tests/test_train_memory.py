"""Memory between steps: the metrics carry the resident size, and giving freed memory back to the OS
(``trim_memory``, glibc's malloc_trim) changes nothing in what is trained."""

from __future__ import annotations

import sys

import pytest
import torch
from _train_helpers import tiny_cfg, trainable_tensors

from bunny.train import run
from bunny.train.memory import release_free_memory
from bunny.train.metrics import read_metrics


def test_trim_memory_trains_the_same_tensors_and_rss_is_logged(tmp_path):
    run(tiny_cfg(tmp_path / "trim", max_steps=3, trim_memory=True))
    run(tiny_cfg(tmp_path / "keep", max_steps=3, trim_memory=False))
    a, b = trainable_tensors(tmp_path / "trim"), trainable_tensors(tmp_path / "keep")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [r for r in read_metrics(tmp_path / "trim") if "step" in r]
    assert len(records) == 3 and all(r["rss_mb"] > 10 for r in records)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_memory_returns_freed_pages():
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    blocks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MB in heap-sized blocks (below mmap threshold)
    for blk in blocks:
        blk[::4096] = b"x" * len(blk[::4096])  # touch every page
    high = rss_mb()
    del blocks[:-1]  # the last block keeps the heap top in use, so only a trim can return the rest
    assert release_free_memory()
    assert rss_mb() < high - 128


@pytest.mark.parametrize("family", ["qwen2", "phi-2", "smollm2"])
def test_chunked_head_loss_equals_the_whole_loss_and_gradients(family):
    from _tiny import tiny_images, tiny_model

    model, processor = tiny_model(family=family)
    model.train()
    inputs = processor(text=["<image> describe the cat on the mat", "hello world, the dog"], images=tiny_images(1),
                       padding_side="right")
    labels = inputs["input_ids"].clone()
    labels[:, :3] = -100
    labels[inputs["attention_mask"] == 0] = -100
    labels[inputs["input_ids"] == processor.image_token_id] = -100
    n = int((labels[:, 1:] != -100).sum())
    results = []
    for chunk in (None, 3):
        model.zero_grad(set_to_none=True)
        out = model(**inputs, labels=labels, supervised_logits_only=True, loss_chunk_size=chunk)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads, out.logits))
    (whole, g_whole, logits), (chunked, g_chunked, none) = results
    assert n > 3 and logits.shape[0] == n and none is None  # several chunks; no logits kept
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert g_whole.keys() == g_chunked.keys() and "mm_projector.0.weight" in g_whole
    assert all(torch.allclose(g_whole[k], g_chunked[k], atol=1e-6) for k in g_whole)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_fixed_mmap_threshold_returns_large_frees_at_once():
    import subprocess

    code = ("from bunny.train.memory import fix_mmap_threshold\n"
            "def rss():\n    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
            "import sys\nif sys.argv[1] == 'fixed': assert fix_mmap_threshold(1)\n"
            "big = bytearray(16 * 2**20); del big\n"  # first large free: glibc raises its threshold
            "blocks = [bytearray(8 * 2**20) for _ in range(32)]; keep = bytearray(200_000)\n"
            "high = rss(); del blocks\nprint(high - rss())\n")
    freed = {mode: float(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                        check=True).stdout) for mode in ("fixed", "dynamic")}
    assert freed["fixed"] > 200 and freed["dynamic"] < freed["fixed"] - 100, freed
