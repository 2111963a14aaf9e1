"""MME: 14 yes/no subtasks, two questions per image (one "Yes", one "No").

The world has no text, faces or buildings, so each subtask asks for the world fact closest in
spirit (docs/synthetic.md lists them): posters -> does a whole caption describe the image,
celebrity -> is the object at a place a given color+shape, scene -> the background, landmark ->
shape, artwork -> size, OCR -> exact count of one color, commonsense -> corners of a shape,
numerical -> count plus k, text_translation -> object names in French, code -> "let n be the
number of objects, is n greater than k".

Layout as the official release: posters/celebrity/scene/landmark/artwork keep ``images/`` and
``questions_answers_YN/``; the others keep the image and its ``.txt`` side by side. Each txt line is
``question<TAB>Yes|No``.
"""

from __future__ import annotations

from pathlib import Path

from bunny.data.synthetic.bench.common import BenchContext, metrics
from bunny.data.synthetic.questions import ask

SUFFIX = " Please answer yes or no."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# subtask -> (yes/no families, minimum objects in the scene)
SUBTASKS = {
    "existence": (("exists",), 1),
    "count": (("count_yn",), 1),
    "position": (("relation", "at"), 2),
    "color": (("color_yn",), 1),
    "posters": (("caption_yn",), 1),
    "celebrity": (("identity",), 1),
    "scene": (("background_yn",), 1),
    "landmark": (("shape_yn",), 1),
    "artwork": (("size_yn",), 1),
    "OCR": (("count_attr_yn",), 1),
    "commonsense_reasoning": (("corners_yn",), 1),
    "numerical_calculation": (("plus_yn",), 1),
    "text_translation": (("french_yn",), 1),
    "code_reasoning": (("greater_yn",), 1),
}
FOLDERED = {"posters", "celebrity", "scene", "landmark", "artwork"}


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 0


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    per = max(2, round(size / (2 * len(SUBTASKS))))
    n_q = 0
    for sub, (families, min_obj) in SUBTASKS.items():
        ext = ".png" if sub in COGNITION else ".jpg"
        k = 0
        while k < per:
            scene = ctx.scene(min_obj)
            fam = families[int(ctx.rng.integers(len(families)))]
            yes, no = ask(fam, scene, ctx.rng, want=True), ask(fam, scene, ctx.rng, want=False)
            if yes is None or no is None:
                continue
            stem = f"{k + 1:012d}"
            if sub in FOLDERED:
                rel_img, rel_txt = f"{sub}/images/{stem}{ext}", f"{sub}/questions_answers_YN/{stem}.txt"
            else:
                rel_img, rel_txt = f"{sub}/{stem}{ext}", f"{sub}/{stem}.txt"
            ctx.save(scene, out, rel_img)
            lines = [f"{yes.question}{SUFFIX}\tYes", f"{no.question}{SUFFIX}\tNo"]
            (out / rel_txt).parent.mkdir(parents=True, exist_ok=True)
            (out / rel_txt).write_text("\n".join(lines) + "\n", encoding="utf-8")
            n_q += 2
            k += 1
    # random yes/no: acc 50%, acc+ (both of an image right) 25% -> 75 per subtask
    return {
        **metrics(
            "perception",
            perception=(75.0 * len(PERCEPTION), 200.0 * len(PERCEPTION)),
            cognition=(75.0 * len(COGNITION), 200.0 * len(COGNITION)),
        ),
        "questions": n_q,
        "images": per * len(SUBTASKS),
    }
