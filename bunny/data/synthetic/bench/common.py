"""What every benchmark writer shares: held-out scenes, images, chance levels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bunny.data.synthetic.scenes import NUMBER_WORDS, Scene, encode, render, sample_scene


@dataclass
class BenchContext:
    """Scenes for one benchmark: drawn from the world's priors, never one whose facts equal a
    training scene's (``forbidden`` holds the signatures of the pool and instruction scenes)."""

    rng: np.random.Generator
    image_size: int = 48
    grid: int = 3
    forbidden: set = field(default_factory=set)
    scenes: dict[str, dict] = field(default_factory=dict)  # image path (relative to the task dir) -> facts

    def scene(self, min_objects: int = 1) -> Scene:
        for _ in range(10_000):
            s = sample_scene(self.rng, self.grid)
            sig = s.signature()
            if len(s.objects) >= min_objects and sig not in self.forbidden:
                self.forbidden.add(sig)  # no two images of one benchmark share their facts either
                return s
        raise RuntimeError("could not draw a held-out scene; the world is too small for its size")

    def image(self, scene: Scene) -> Image.Image:
        return render(scene, self.image_size, self.rng)

    def save(self, scene: Scene, task_dir: Path, rel: str, fmt: str | None = None) -> bytes:
        """Render ``scene`` to ``task_dir/rel`` (format from the extension) and remember its facts."""
        fmt = fmt or ("PNG" if rel.lower().endswith(".png") else "JPEG")
        data = encode(self.image(scene), fmt)
        path = task_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.scenes[rel] = scene.to_dict()
        return data

    def remember(self, scene: Scene, key: str) -> None:
        self.scenes[key] = scene.to_dict()


def metrics(headline: str, **named: tuple[float, float]) -> dict:
    """``{"headline": name, "metrics": {name: {"chance": c, "max": m}}}`` (values as scores.json has them)."""
    return {"headline": headline, "metrics": {k: {"chance": round(c, 4), "max": m} for k, (c, m) in named.items()}}


def mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


def digits(answer: str) -> str:
    """Number words as digits (what VQAv2 annotators write for counts)."""
    return str(NUMBER_WORDS.index(answer)) if answer in NUMBER_WORDS else answer
