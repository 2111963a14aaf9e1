"""The synthetic world on disk, and the Python API that writes it: ``generate_world``.

Layout under ``out_dir``::

    images/pool/*.jpg, images/instruct/*.jpg   the pool's and the instruction data's images
    pool.json          the raw pool as `plain` LLaVA samples (stage 1 data, before curation)
    instruct.json      instruction data (LLaVA JSON), image paths relative to images/
    defects.parquet    per pool sample: id, image, defect, source, is_defective
    scenes.jsonl       the facts of every image (pool, instruct and each benchmark's)
    bench/<task>/      the eight benchmarks in their official layouts; bench/meta.json: per task the
                       headline metric, its chance level and maximum, the numbers of questions/images
    world.json         the settings, counts and timings; a second call with the same settings
                       returns the world already there instead of writing it again

Everything is a function of the settings: the same seed writes the same files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bunny.data.synthetic.bench import TASKS, writer
from bunny.data.synthetic.bench.common import BenchContext
from bunny.data.synthetic.instruct import IMAGE_KINDS, build_instruct
from bunny.data.synthetic.pool import DEFAULT_DEFECTS, build_pool, pool_sample
from bunny.data.synthetic.scenes import Scene, encode, render, sample_scene

FORMAT_VERSION = 1


@dataclass
class WorldConfig:
    n_images: int = 3000  # pool samples
    seed: int = 0
    image_size: int = 48
    grid: int = 3
    n_instruct: int | None = None  # image conversations; default: as many as the pool
    text_share: float = 0.1  # text-only conversations, as a share of the instruction data
    bench_size: int = 200  # about this many questions per benchmark
    defects: dict = field(default_factory=lambda: dict(DEFAULT_DEFECTS))
    instruct_kinds: dict = field(default_factory=lambda: dict(IMAGE_KINDS))  # share of each conversation kind
    max_turns: int = 4  # turns of a multi-turn conversation: 2..max_turns

    def resolved(self) -> WorldConfig:
        d = asdict(self)
        if d["n_instruct"] is None:
            d["n_instruct"] = self.n_images
        return WorldConfig(**d)

    def key(self) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, **asdict(self.resolved())}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass
class World:
    """What ``generate_world`` wrote: paths, per-benchmark chance levels, counts, scene facts."""

    root: Path
    config: WorldConfig
    counts: dict
    bench: dict  # task -> {"headline", "metrics": {name: {"chance", "max"}}, "questions", "images"}
    seconds: float
    reused: bool = False

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def pool_json(self) -> Path:
        return self.root / "pool.json"

    @property
    def instruct_json(self) -> Path:
        return self.root / "instruct.json"

    @property
    def defects_parquet(self) -> Path:
        return self.root / "defects.parquet"

    @property
    def bench_dir(self) -> Path:
        return self.root / "bench"

    def task_dir(self, task: str) -> Path:
        return self.root / "bench" / task

    def chance(self, task: str) -> float:
        b = self.bench[task]
        return b["metrics"][b["headline"]]["chance"]

    def scenes(self) -> dict[str, dict]:
        """``{key: {"split", "background", "grid", "objects": [...]}}``; keys are image paths relative
        to images/ for pool and instruct, and ``bench/<task>/<path or id>`` for benchmarks."""
        out = {}
        with open(self.root / "scenes.jsonl", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                out[d.pop("key")] = d
        return out

    @staticmethod
    def load(root: str | Path) -> World:
        root = Path(root)
        meta = json.loads((root / "world.json").read_text())
        cfg = WorldConfig(**meta["config"])
        return World(root, cfg, meta["counts"], meta["bench"], meta["seconds"], reused=True)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=None)


def generate_world(
    out_dir: str | Path,
    n_images: int = 3000,
    seed: int = 0,
    *,
    image_size: int = 48,
    grid: int = 3,
    n_instruct: int | None = None,
    text_share: float = 0.1,
    bench_size: int = 200,
    defects: dict | None = None,
    instruct_kinds: dict | None = None,
    max_turns: int = 4,
    tasks: tuple[str, ...] = TASKS,
    overwrite: bool = False,
) -> World:
    """Write the synthetic world to ``out_dir`` (see the module docstring for the layout).

    ``n_images`` pool samples (defects included, in ``defects`` proportions), ``n_instruct`` image
    conversations (default ``n_images``; kinds in ``instruct_kinds`` shares, multi-turn ones with up to
    ``max_turns`` turns) plus ``text_share`` text-only ones, and about ``bench_size``
    questions per benchmark from held-out scenes. A folder already holding this exact world is
    reused unless ``overwrite``.
    """
    cfg = WorldConfig(n_images, seed, image_size, grid, n_instruct, text_share, bench_size,
                      dict(DEFAULT_DEFECTS if defects is None else defects),
                      dict(IMAGE_KINDS if instruct_kinds is None else instruct_kinds), max_turns).resolved()
    if image_size % grid:
        raise ValueError(f"image_size {image_size} must be a multiple of grid {grid}")
    root = Path(out_dir)
    meta_path = root / "world.json"
    if meta_path.exists() and not overwrite:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == cfg.key() and meta.get("tasks") == list(tasks):
            return World.load(root)
    t0 = time.perf_counter()
    for sub in ("images", "bench"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
    root.mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence(seed)
    rng_pool, rng_inst, _ = (np.random.default_rng(s) for s in ss.spawn(3))
    timings = {}
    scene_lines: list[dict] = []

    t = time.perf_counter()
    records = _write_pool(root, cfg, rng_pool, scene_lines)
    timings["pool"] = time.perf_counter() - t

    t = time.perf_counter()
    samples, inst_scenes, kinds = _write_instruct(root, cfg, rng_inst, scene_lines)
    timings["instruct"] = time.perf_counter() - t

    # benchmarks, from scenes whose facts no training image has
    t = time.perf_counter()
    forbidden = {r["scene"].signature() for r in records if r["scene"] is not None}
    forbidden |= {s.signature() for _, s in inst_scenes}
    bench_meta = _write_benchmarks(root, cfg, tasks, forbidden, scene_lines)
    timings["bench"] = time.perf_counter() - t

    with open(root / "scenes.jsonl", "w", encoding="utf-8") as f:
        for line in scene_lines:
            f.write(json.dumps(line) + "\n")
    defect_counts: dict[str, int] = {}
    for r in records:
        defect_counts[r["defect"]] = defect_counts.get(r["defect"], 0) + 1
    counts = {
        "pool": len(records),
        "defects": defect_counts,
        "instruct": len(samples),
        "instruct_kinds": kinds,
        "bench_questions": {k: v["questions"] for k, v in bench_meta.items()},
    }
    seconds = time.perf_counter() - t0
    timings = {k: round(v, 3) for k, v in timings.items()}
    meta = {"key": cfg.key(), "config": asdict(cfg), "tasks": list(tasks), "counts": counts,
            "bench": bench_meta, "seconds": round(seconds, 3), "timings": timings}
    (root / "world.json").write_text(json.dumps(meta, indent=1))
    return World(root, cfg, counts, bench_meta, seconds)


def _write_pool(root: Path, cfg: WorldConfig, rng: np.random.Generator, scene_lines: list[dict]) -> list[dict]:
    """The raw pool (images, ``pool.json``, ``defects.parquet``); appends each image's facts."""
    records, images = build_pool(cfg.n_images, rng, cfg.image_size, cfg.grid, cfg.defects)
    for rel, data in images.items():
        p = root / "images" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    _write_json(root / "pool.json", [pool_sample(r) for r in records])
    pd.DataFrame(
        {
            "id": [r["id"] for r in records],
            "image": [r["image"] for r in records],
            "defect": [r["defect"] for r in records],
            "source": [r["source"] for r in records],
            "is_defective": [r["defect"] != "none" for r in records],
        }
    ).to_parquet(root / "defects.parquet", index=False)
    for r in records:
        facts = r["scene"].to_dict() if r["scene"] is not None else {"background": None, "grid": cfg.grid,
                                                                      "objects": []}
        scene_lines.append({"key": r["image"], "split": "pool", **facts})
    return records


def _write_instruct(root: Path, cfg: WorldConfig, rng: np.random.Generator, scene_lines: list[dict]
                    ) -> tuple[list[dict], list[tuple[str, Scene]], dict[str, int]]:
    """Instruction images and ``instruct.json`` -> (samples, (image, scene) pairs, count per kind)."""
    inst_scenes: list[tuple[str, Scene]] = []
    (root / "images" / "instruct").mkdir(parents=True, exist_ok=True)
    for i in range(cfg.n_instruct):
        s = sample_scene(rng, cfg.grid)
        rel = f"instruct/{i:06d}.jpg"
        (root / "images" / rel).write_bytes(encode(render(s, cfg.image_size, rng), "JPEG", quality=92))
        inst_scenes.append((rel, s))
        scene_lines.append({"key": rel, "split": "instruct", **s.to_dict()})
    n_text = int(round(cfg.n_instruct * cfg.text_share / max(1e-9, 1 - cfg.text_share)))
    samples = build_instruct(inst_scenes, n_text, rng, cfg.instruct_kinds, cfg.max_turns)
    kinds: dict[str, int] = {}
    for smp in samples:
        k = smp.pop("kind")
        kinds[k] = kinds.get(k, 0) + 1
    _write_json(root / "instruct.json", samples)
    return samples, inst_scenes, kinds


def _write_benchmarks(root: Path, cfg: WorldConfig, tasks: tuple[str, ...], forbidden: set,
                      scene_lines: list[dict]) -> dict:
    """Every benchmark of ``tasks`` under ``bench/`` (each from its own random stream) -> meta."""
    bench_meta = {}
    for task, s in zip(tasks, np.random.SeedSequence(cfg.seed).spawn(4 + len(tasks))[4:]):
        ctx = BenchContext(np.random.default_rng(s), cfg.image_size, cfg.grid, set(forbidden))
        task_dir = root / "bench" / task
        task_dir.mkdir(parents=True, exist_ok=True)
        bench_meta[task] = writer(task).write(task_dir, ctx, cfg.bench_size)
        for key, facts in ctx.scenes.items():
            scene_lines.append({"key": f"bench/{task}/{key}", "split": f"bench/{task}", **facts})
    _write_json(root / "bench" / "meta.json", bench_meta)
    return bench_meta
