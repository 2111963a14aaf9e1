"""Question families about a scene, shared by the instruction data and the benchmarks.

Each family returns a ``QA`` with the exact answer and the answer space (used to draw multiple-choice
distractors and to compute chance levels). Yes/no families take ``want`` (True/False) so a caller can
build balanced pairs (MME: one yes and one no question per image; POPE: positives and negatives).
Answers are words: colors, shapes, positions, number words ("two"), "Yes"/"No".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bunny.data.synthetic.scenes import (
    BACKGROUND_NAMES,
    COLOR_NAMES,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    all_positions,
    position_name,
)

SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
YES, NO = "Yes", "No"
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4}
# A tiny French lexicon for the "translation" skill (pure-text instruct data and MME text_translation).
FRENCH = {
    "red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
    "orange": "orange", "circle": "cercle", "square": "carré", "triangle": "triangle",
    "diamond": "losange", "small": "petit", "large": "grand",
}
# Context sentences some multiple-choice questions carry (MMBench "hint", ScienceQA "hint").
HINTS = (
    "The picture shows flat shapes on a board of three rows and three columns.",
    "A circle has no corners, a triangle has three and a square has four.",
    "Look at the image carefully.",
)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    family: str
    space: tuple[str, ...]  # every answer this family could give for this question


def plural(shape: str) -> str:
    return shape + "s"


def a(noun_phrase: str) -> str:
    """``"a red circle"``, ``"an orange square"``."""
    return ("an " if noun_phrase[:1] in "aeiou" else "a ") + noun_phrase


def _choice(rng: np.random.Generator, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _at(o: Obj, grid: int) -> str:
    pos = position_name(o.row, o.col, grid)
    return "in the center" if pos == "center" else f"at the {pos}"


# ------------------------------------------------------------------------------- referring to things
def _unique(scene: Scene, o: Obj, pred: Callable[[Obj], bool]) -> bool:
    return pred(o) and sum(pred(x) for x in scene.objects) == 1


def refer(scene: Scene, o: Obj, rng: np.random.Generator, avoid: str = "") -> str:
    """A noun phrase that picks out ``o`` alone, never naming the attribute ``avoid``
    (``color``, ``shape``, ``size`` or ``position``): what a question about that attribute needs."""
    g = scene.grid
    noun = "object" if avoid == "shape" else o.shape
    forms: list[tuple[str, Callable[[Obj], bool]]] = []
    if avoid != "shape":
        forms.append((f"the {o.shape}", lambda x: x.shape == o.shape))
    if avoid != "color":
        forms.append((f"the {o.color} {noun}", lambda x: x.color == o.color and (avoid == "shape" or x.shape == o.shape)))
    if avoid != "size":
        forms.append((f"the {o.size} {noun}", lambda x: x.size == o.size and (avoid == "shape" or x.shape == o.shape)))
    if avoid not in ("size", "color"):
        forms.append(
            (f"the {o.size} {o.color} {noun}",
             lambda x: x.size == o.size and x.color == o.color and (avoid == "shape" or x.shape == o.shape))
        )
    ok = [text for text, pred in forms if _unique(scene, o, pred)]
    if ok:
        # prefer the shortest forms, with some variety
        ok.sort(key=len)
        return ok[0] if rng.random() < 0.7 else _choice(rng, ok)
    if avoid == "position":
        raise LookupError("no reference without position")
    return f"the {noun} {_at(o, g)}"


def _can_refer(scene: Scene, o: Obj, rng: np.random.Generator, avoid: str) -> str | None:
    try:
        return refer(scene, o, rng, avoid)
    except LookupError:
        return None


# ----------------------------------------------------------------------------- short-answer families
def q_color(scene, rng, want=None):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "color")
    return QA(f"What color is {ref}?", o.color, "color", COLOR_NAMES)


def q_shape(scene, rng, want=None):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "shape")
    q = _choice(rng, (f"What shape is {ref}?", f"Which shape is {ref}?"))
    return QA(q, o.shape, "shape", SHAPES)


def q_size(scene, rng, want=None):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "size")
    return QA(f"Is {ref} small or large?", o.size, "size", SIZES)


def q_position(scene, rng, want=None):
    o = _choice(rng, scene.objects)
    ref = _can_refer(scene, o, rng, "position")
    if ref is None:
        return None
    q = _choice(rng, (f"Where is {ref}?", f"In which part of the image is {ref}?"))
    return QA(q, position_name(o.row, o.col, scene.grid), "position", tuple(all_positions(scene.grid)))


def q_count(scene, rng, want=None):
    n = len(scene.objects)
    q = _choice(rng, ("How many objects are there?", "How many shapes are in the image?",
                      "How many objects are in the picture?"))
    return QA(q, NUMBER_WORDS[n], "count", NUMBER_WORDS[1:5])


def q_count_attr(scene, rng, want=None):
    if rng.random() < 0.5:
        shape = _choice(rng, SHAPES)
        n = sum(o.shape == shape for o in scene.objects)
        q = f"How many {plural(shape)} are there?"
    else:
        color = _choice(rng, COLOR_NAMES)
        n = sum(o.color == color for o in scene.objects)
        q = f"How many {color} objects are there?"
    return QA(q, NUMBER_WORDS[n], "count_attr", NUMBER_WORDS[0:5])


def q_background(scene, rng, want=None):
    q = _choice(rng, ("What is the background?", "What kind of background does the image have?"))
    return QA(q, scene.background, "background", BACKGROUND_NAMES)


def q_what_at(scene, rng, want=None):
    """What is at a position: an object name, or "nothing"."""
    g = scene.grid
    if rng.random() < 0.75:
        o = _choice(rng, scene.objects)
        r, c, ans = o.row, o.col, o.name
    else:
        free = [(r, c) for r in range(g) for c in range(g) if scene.at(r, c) is None]
        if not free:
            return None
        r, c = _choice(rng, free)
        ans = "nothing"
    pos = position_name(r, c, g)
    where = "in the center" if pos == "center" else f"at the {pos}"
    names = tuple(f"{c} {s}" for c in COLOR_NAMES for s in SHAPES) + ("nothing",)
    return QA(f"What is {where}?", ans, "what_at", names)


def q_corners(scene, rng, want=None):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "shape")
    return QA(f"How many corners does {ref} have?", NUMBER_WORDS[CORNERS[o.shape]], "corners",
              (NUMBER_WORDS[0], NUMBER_WORDS[3], NUMBER_WORDS[4]))


def q_side(scene, rng, want=None):
    """Left/right or above/below between two objects (GQA-style choice question)."""
    if len(scene.objects) < 2:
        return None
    i, j = rng.choice(len(scene.objects), size=2, replace=False)
    a, b = scene.objects[int(i)], scene.objects[int(j)]
    ra, rb = refer(scene, a, rng, "position"), refer(scene, b, rng, "position")
    if a.col != b.col and (a.row == b.row or rng.random() < 0.5):
        ans = "left" if a.col < b.col else "right"
        return QA(f"Is {ra} to the left or to the right of {rb}?", ans, "side", ("left", "right"))
    if a.row != b.row:
        ans = "above" if a.row < b.row else "below"
        return QA(f"Is {ra} above or below {rb}?", ans, "side", ("above", "below"))
    return None


SHORT_FAMILIES: dict[str, Callable] = {
    "color": q_color,
    "shape": q_shape,
    "size": q_size,
    "position": q_position,
    "count": q_count,
    "count_attr": q_count_attr,
    "background": q_background,
    "what_at": q_what_at,
    "corners": q_corners,
    "side": q_side,
}


# -------------------------------------------------------------------------------- yes/no families
def _yn(want: bool) -> str:
    return YES if want else NO


def _absent_category(scene, rng, prefer: list[str] | None = None) -> str:
    present = scene.categories()
    if prefer:
        for name in prefer:
            if name not in present:
                return name
    while True:
        name = f"{_choice(rng, COLOR_NAMES)} {_choice(rng, SHAPES)}"
        if name not in present:
            return name


def yn_exists(scene, rng, want: bool):
    name = _choice(rng, scene.objects).name if want else _absent_category(scene, rng)
    q = _choice(rng, (f"Is there {a(name)} in the image?", f"Is there {a(name)} in this image?"))
    return QA(q, _yn(want), "exists", (YES, NO))


def yn_exists_attr(scene, rng, want: bool):
    present = {o.shape for o in scene.objects} if rng.random() < 0.5 else {o.color for o in scene.objects}
    pool = SHAPES if next(iter(present)) in SHAPES else COLOR_NAMES
    cands = [x for x in pool if (x in present) == want]
    if not cands:
        return None
    x = _choice(rng, cands)
    q = f"Are there any {plural(x)} in the image?" if x in SHAPES else f"Is there any {x} object in the image?"
    return QA(q, _yn(want), "exists_attr", (YES, NO))


def yn_count(scene, rng, want: bool):
    n = len(scene.objects)
    m = n if want else _choice(rng, [k for k in range(1, 5) if k != n])
    q = "Is there one object in this image?" if m == 1 else f"Are there {NUMBER_WORDS[m]} objects in this image?"
    return QA(q, _yn(want), "count_yn", (YES, NO))


def yn_relation(scene, rng, want: bool):
    if len(scene.objects) < 2:
        return None
    i, j = rng.choice(len(scene.objects), size=2, replace=False)
    a, b = scene.objects[int(i)], scene.objects[int(j)]
    rels = []
    if a.col != b.col:
        rels += [("to the left of", a.col < b.col), ("to the right of", a.col > b.col)]
    if a.row != b.row:
        rels += [("above", a.row < b.row), ("below", a.row > b.row)]
    rels = [(r, truth) for r, truth in rels if truth == want]
    if not rels:
        return None
    rel, _ = _choice(rng, rels)
    ra, rb = refer(scene, a, rng, "position"), refer(scene, b, rng, "position")
    return QA(f"Is {ra} {rel} {rb}?", _yn(want), "relation", (YES, NO))


def yn_at(scene, rng, want: bool):
    o = _choice(rng, scene.objects)
    ref = _can_refer(scene, o, rng, "position")
    if ref is None:
        return None
    g = scene.grid
    true = position_name(o.row, o.col, g)
    pos = true if want else _choice(rng, [p for p in all_positions(g) if p != true])
    where = "in the center" if pos == "center" else f"at the {pos}"
    return QA(f"Is {ref} {where}?", _yn(want), "at", (YES, NO))


def yn_color(scene, rng, want: bool):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "color")
    c = o.color if want else _choice(rng, [c for c in COLOR_NAMES if c != o.color])
    return QA(f"Is {ref} {c}?", _yn(want), "color_yn", (YES, NO))


def yn_shape(scene, rng, want: bool):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "shape")
    s = o.shape if want else _choice(rng, [s for s in SHAPES if s != o.shape])
    return QA(f"Is {ref} a {s}?", _yn(want), "shape_yn", (YES, NO))


def yn_size(scene, rng, want: bool):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "size")
    s = o.size if want else _choice(rng, [s for s in SIZES if s != o.size])
    return QA(f"Is {ref} {s}?", _yn(want), "size_yn", (YES, NO))


def yn_background(scene, rng, want: bool):
    b = scene.background if want else _choice(rng, [b for b in BACKGROUND_NAMES if b != scene.background])
    q = _choice(rng, (f"Is the background {b}?", f"Does this image have a {b} background?"))
    return QA(q, _yn(want), "background_yn", (YES, NO))


def yn_identity(scene, rng, want: bool):
    """Is the object at a place a given color+shape (MME 'celebrity': who is this one)."""
    o = _choice(rng, scene.objects)
    name = o.name
    if not want:
        if rng.random() < 0.5:
            name = f"{_choice(rng, [c for c in COLOR_NAMES if c != o.color])} {o.shape}"
        else:
            name = f"{o.color} {_choice(rng, [s for s in SHAPES if s != o.shape])}"
    pos = position_name(o.row, o.col, scene.grid)
    where = "in the center" if pos == "center" else f"at the {pos}"
    return QA(f"Is the object {where} {a(name)}?", _yn(want), "identity", (YES, NO))


def altered(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one fact changed (a color, a shape, or the background)."""
    objs = list(scene.objects)
    k = int(rng.integers(len(objs)))
    o = objs[k]
    what = rng.integers(3)
    if what == 0:
        objs[k] = Obj(o.shape, _choice(rng, [c for c in COLOR_NAMES if c != o.color]), o.size, o.row, o.col)
        return Scene(scene.background, tuple(objs), scene.grid)
    if what == 1:
        objs[k] = Obj(_choice(rng, [s for s in SHAPES if s != o.shape]), o.color, o.size, o.row, o.col)
        return Scene(scene.background, tuple(objs), scene.grid)
    return Scene(_choice(rng, [b for b in BACKGROUND_NAMES if b != scene.background]), scene.objects, scene.grid)


def yn_caption(scene, rng, want: bool):
    """Does a whole caption describe the image (MME 'posters': recognise the whole picture)."""
    from bunny.data.synthetic.scenes import caption

    s = scene if want else altered(scene, rng)
    return QA(f"Does the caption \"{caption(s, rng)}\" describe this image?", _yn(want), "caption_yn", (YES, NO))


def yn_count_attr(scene, rng, want: bool):
    color = _choice(rng, sorted({o.color for o in scene.objects}))
    n = sum(o.color == color for o in scene.objects)
    m = n if want else _choice(rng, [k for k in range(0, 5) if k != n])
    q = f"Is there one {color} object in this image?" if m == 1 else f"Are there {NUMBER_WORDS[m]} {color} objects in this image?"
    return QA(q, _yn(want), "count_attr_yn", (YES, NO))


def yn_corners(scene, rng, want: bool):
    o = _choice(rng, scene.objects)
    ref = refer(scene, o, rng, "shape")
    k = CORNERS[o.shape] if want else _choice(rng, [k for k in (0, 3, 4) if k != CORNERS[o.shape]])
    q = f"Does {ref} have no corners?" if k == 0 else f"Does {ref} have {NUMBER_WORDS[k]} corners?"
    return QA(q, _yn(want), "corners_yn", (YES, NO))


def yn_plus(scene, rng, want: bool):
    n = len(scene.objects)
    k = int(rng.integers(1, 5))
    m = n + k if want else _choice(rng, [x for x in range(2, 10) if x != n + k])
    return QA(f"Is the number of objects in the image plus {NUMBER_WORDS[k]} equal to {NUMBER_WORDS[m]}?",
              _yn(want), "plus_yn", (YES, NO))


def yn_greater(scene, rng, want: bool):
    n = len(scene.objects)
    cands = [k for k in range(0, 5) if (n > k) == want]
    k = _choice(rng, cands)
    return QA(f"Let n be the number of objects in the image. Is n greater than {NUMBER_WORDS[k]}?",
              _yn(want), "greater_yn", (YES, NO))


def french_name(color: str, shape: str) -> str:
    return f"{FRENCH[shape]} {FRENCH[color]}"


def yn_french(scene, rng, want: bool):
    name = _choice(rng, scene.objects).name if want else _absent_category(scene, rng)
    color, shape = name.split()
    return QA(f"Is there a {french_name(color, shape)} in this image?", _yn(want), "french_yn", (YES, NO))


YN_FAMILIES: dict[str, Callable] = {
    "exists": yn_exists,
    "exists_attr": yn_exists_attr,
    "count_yn": yn_count,
    "relation": yn_relation,
    "at": yn_at,
    "color_yn": yn_color,
    "shape_yn": yn_shape,
    "size_yn": yn_size,
    "background_yn": yn_background,
    "identity": yn_identity,
    "caption_yn": yn_caption,
    "count_attr_yn": yn_count_attr,
    "corners_yn": yn_corners,
    "plus_yn": yn_plus,
    "greater_yn": yn_greater,
    "french_yn": yn_french,
}


def ask(family: str, scene: Scene, rng: np.random.Generator, want: bool | None = None, tries: int = 8) -> QA | None:
    """A question of ``family`` about ``scene`` (None when the family does not apply to it)."""
    yn = family in YN_FAMILIES
    fn = YN_FAMILIES[family] if yn else SHORT_FAMILIES[family]
    for _ in range(tries):
        try:
            qa = fn(scene, rng, bool(rng.integers(2)) if want is None else want) if yn else fn(scene, rng)
        except LookupError:  # two identical objects: one cannot be named without its place
            continue
        if qa is not None:
            return qa
    return None


# ------------------------------------------------------------------------------ multiple choice
LETTERS = "ABCDEFGH"


def choices_for(qa: QA, rng: np.random.Generator, n: int = 4) -> tuple[list[str], int]:
    """``n`` options (the answer and distractors from its space, shuffled) and the answer's index."""
    others = [x for x in qa.space if x != qa.answer]
    n = min(n, len(others) + 1)
    picks = [others[i] for i in rng.choice(len(others), size=n - 1, replace=False)]
    opts = picks + [qa.answer]
    order = rng.permutation(n)
    opts = [opts[i] for i in order]
    return opts, opts.index(qa.answer)


MC_STYLES = ("letter", "paren")


def mc_text(question: str, options: list[str], hint: str | None = None, style: str = "letter") -> str:
    """A multiple-choice prompt body (without the image placeholder). ``letter``: the LLaVA/Bunny
    layout (``A. red`` lines, as ScienceQA, MMBench and SEED are asked); ``paren``: MMMU's
    (``(A) red`` lines and a blank line before the instruction)."""
    if style not in MC_STYLES:
        raise ValueError(f"unknown multiple-choice style {style!r}; known: {', '.join(MC_STYLES)}")
    lines = []
    if hint:
        lines.append(hint)
    lines.append(question)
    if style == "letter":
        lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
        return "\n".join(lines) + MC_SUFFIX
    lines += [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\n" + MC_SUFFIX
