"""Scenes of the synthetic world: sampling, rendering (PIL) and describing them in words.

A scene is 1-4 objects on a ``grid x grid`` board over a named background. Each object has a shape,
a color, a size and a cell; at most one object per cell, and an object never leaves its cell, so
with the default 48 px / 3x3 grid one 16 px vision patch sees exactly one cell. Every fact is known,
so every question about a scene has an exact answer.

The sampler has mild priors on purpose (shapes and colors are not uniform, and each background
favours some colors) so that POPE's "popular" and "adversarial" negatives mean what they mean on
COCO: frequent objects, and objects that co-occur with the ones in the image.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
SHAPE_WEIGHTS = (0.32, 0.28, 0.22, 0.18)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
BACKGROUNDS = {
    "snow": (236, 236, 240),
    "sand": (222, 200, 150),
    "sky": (185, 212, 240),
    "night": (40, 42, 58),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# Per background, a multiplier on each color's base weight: the co-occurrence structure POPE's
# adversarial split exploits.
BACKGROUND_COLOR_PRIOR = {
    "snow": {"red": 2.0, "blue": 1.6},
    "sand": {"orange": 2.0, "yellow": 1.6},
    "sky": {"green": 2.0, "purple": 1.6},
    "night": {"yellow": 2.0, "red": 1.6},
}
COLOR_WEIGHTS = (0.24, 0.19, 0.17, 0.15, 0.13, 0.12)  # in COLOR_NAMES order
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# How many objects a scene has (1..4).
COUNT_WEIGHTS = (0.25, 0.3, 0.25, 0.2)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        """``"red circle"``: the object category (what POPE asks about)."""
        return f"{self.color} {self.shape}"

    @property
    def full_name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    grid: int = 3

    def signature(self) -> tuple:
        """Everything that defines the scene's facts (two scenes with one signature ask the same)."""
        return (self.background, self.grid, tuple(sorted(dataclasses.astuple(o) for o in self.objects)))

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "grid": self.grid,
            "objects": [dataclasses.asdict(o) for o in self.objects],
        }

    @staticmethod
    def from_dict(d: dict) -> Scene:
        return Scene(d["background"], tuple(Obj(**o) for o in d["objects"]), d.get("grid", 3))

    def at(self, row: int, col: int) -> Obj | None:
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None

    def categories(self) -> set[str]:
        return {o.name for o in self.objects}


def position_name(row: int, col: int, grid: int = 3) -> str:
    """``"top left"``, ``"center"``, ... on the 3x3 grid; ``"row 2, column 3"`` otherwise."""
    if grid == 3:
        rows = ("top", "", "bottom")
        cols = ("left", "", "right")
        name = f"{rows[row]} {cols[col]}".strip()
        return name or "center"
    return f"row {row + 1}, column {col + 1}"


def all_positions(grid: int = 3) -> list[str]:
    return [position_name(r, c, grid) for r in range(grid) for c in range(grid)]


def sample_scene(rng: np.random.Generator, grid: int = 3, max_objects: int = 4) -> Scene:
    """One scene drawn from the world's priors."""
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    prior = BACKGROUND_COLOR_PRIOR[background]
    cw = np.array([w * prior.get(c, 1.0) for c, w in zip(COLOR_NAMES, COLOR_WEIGHTS)])
    cw /= cw.sum()
    counts = np.array(COUNT_WEIGHTS[:max_objects], dtype=float)
    n = 1 + int(rng.choice(len(counts), p=counts / counts.sum()))
    cells = rng.choice(grid * grid, size=n, replace=False)
    objects = []
    for cell in sorted(int(c) for c in cells):
        objects.append(
            Obj(
                shape=SHAPES[rng.choice(len(SHAPES), p=SHAPE_WEIGHTS)],
                color=COLOR_NAMES[rng.choice(len(COLOR_NAMES), p=cw)],
                size=SIZES[rng.integers(len(SIZES))],
                row=cell // grid,
                col=cell % grid,
            )
        )
    return Scene(background, tuple(objects), grid)


# ----------------------------------------------------------------------------------------- render
SUPERSAMPLE = 2
SIZE_FRACTION = {"small": 0.45, "large": 0.85}


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render(scene: Scene, size: int = 48, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene`` at ``size`` x ``size`` pixels.

    ``rng`` adds the natural variation of a photo: background noise, a small shift of each object
    inside its cell and a slight tint; without it the drawing is exact (objects centred, flat colours).
    Objects always stay inside their cell, and the cell's centre pixel is always the object's colour.
    """
    s = SUPERSAMPLE
    big = size * s
    cell = big / scene.grid
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    if rng is not None:
        arr = bg + rng.normal(0, 4, size=(big // s, big // s, 1)).astype(np.int16)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB").resize((big, big), Image.NEAREST)
    else:
        img = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        r = SIZE_FRACTION[o.size] * cell / 2
        # small enough that the cell's centre stays inside every shape
        slack = min((cell / 2 - r) * 0.8, 0.3 * r)
        cx = (o.col + 0.5) * cell
        cy = (o.row + 0.5) * cell
        color = np.array(COLORS[o.color], dtype=float)
        if rng is not None:
            cx += float(rng.uniform(-slack, slack))
            cy += float(rng.uniform(-slack, slack))
            color = color + rng.uniform(-8, 8, size=3)
        fill = tuple(int(v) for v in np.clip(color, 0, 255))
        pts = _shape_points(o.shape, cx, cy, r)
        if pts is not None:
            draw.polygon(pts, fill=fill)
        elif o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:  # square: same area feel as the circle
            q = r * 0.9
            draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    return img.resize((size, size), Image.BOX)


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    """Deterministic bytes of ``img`` in ``fmt`` (JPEG or PNG)."""
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ describing
def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _at(pos: str) -> str:
    return "in the center" if pos == "center" else f"at the {pos}"


def object_phrase(o: Obj, grid: int = 3) -> str:
    return f"a {o.size} {o.color} {o.shape} {_at(position_name(o.row, o.col, grid))}"


def description(scene: Scene) -> str:
    """The canonical detailed description: every object with size, color, shape and place, in
    reading order (row by row, as the vision patches), then the count and the background."""
    n = len(scene.objects)
    objs = _join([object_phrase(o, scene.grid) for o in scene.objects])
    noun = "object" if n == 1 else "objects"
    return f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun} on a {scene.background} background: {objs}."


CAPTION_TEMPLATES = (
    "{objs} on {bg}",
    "{objs}, {bg} background",
    "a picture of {objs} on a {bg} background",
    "{n} shapes on {bg}: {objs}",
    "{bg} scene with {objs}",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A web-style true caption: every object and the background, in varied wording and order."""
    objs = list(scene.objects)
    order = rng.permutation(len(objs))
    parts = [object_phrase(objs[i], scene.grid) for i in order]
    t = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    n = len(objs)
    if "{n} shapes" in t and n == 1:
        t = CAPTION_TEMPLATES[0]
    return t.format(objs=_join(parts), bg=scene.background, n=NUMBER_WORDS[n])
