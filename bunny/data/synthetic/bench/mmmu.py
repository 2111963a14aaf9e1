"""MMMU (validation): the Hugging Face dataset layout, one parquet per subject.

``<Subject>/validation-00000-of-00001.parquet`` with the official columns: ``id``
(``validation_<Subject>_<n>``), ``question`` (with an ``<image 1>`` placeholder), ``options`` (a
Python list as text), ``explanation``, ``image_1`` .. ``image_7`` (``{"bytes", "path"}`` or null),
``img_type``, ``answer`` (a letter, or the open answer), ``topic_difficulty``, ``question_type``
(``multiple-choice`` | ``open``), ``subfield``. Open answers are words ("three", "red"), the way the
model answers; MMMU's open-answer matching lowercases and looks for the answer in the response.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bunny.data.synthetic.bench.common import BenchContext, mean, metrics
from bunny.data.synthetic.questions import LETTERS, ask, choices_for
from bunny.data.synthetic.scenes import encode

# subject -> (families, subfield); the open questions come from the families marked open
SUBJECTS = {
    "Art": (("color",), "Color theory"),
    "Design": (("shape",), "Visual design"),
    "Math": (("count", "count_attr"), "Counting"),
    "Geography": (("position",), "Maps"),
    "Physics": (("side", "size"), "Mechanics"),
}
OPEN_FAMILIES = {"count", "count_attr", "color"}
OPEN_SHARE = 0.3
N_IMAGES = 7
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("options", pa.string()), ("explanation", pa.string())]
    + [(f"image_{i}", IMAGE_TYPE) for i in range(1, N_IMAGES + 1)]
    + [("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
       ("question_type", pa.string()), ("subfield", pa.string())]
)


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 7


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    rng = ctx.rng
    per = max(2, size // len(SUBJECTS))
    chance = []
    for subject, (fams, subfield) in SUBJECTS.items():
        rows = []
        while len(rows) < per:
            scene = ctx.scene()
            fam = fams[int(rng.integers(len(fams)))]
            qa = ask(fam, scene, rng)
            if qa is None:
                continue
            qid = f"validation_{subject}_{len(rows) + 1}"
            if fam in OPEN_FAMILIES and rng.random() < OPEN_SHARE:
                options, answer, qtype = [], qa.answer.lower(), "open"
                chance.append(1.0 / len(qa.space))
            else:
                options, k = choices_for(qa, rng, 4)
                answer, qtype = LETTERS[k], "multiple-choice"
                chance.append(1.0 / len(options))
            ctx.remember(scene, qid)
            row = {
                "id": qid,
                "question": f"<image 1> {qa.question}",
                "options": repr(options),
                "explanation": "",
                "image_1": {"bytes": encode(ctx.image(scene), "PNG"), "path": f"{qid}_1.png"},
                **{f"image_{i}": None for i in range(2, N_IMAGES + 1)},
                "img_type": "['Diagrams']",
                "answer": answer,
                "topic_difficulty": "Easy",
                "question_type": qtype,
                "subfield": subfield,
            }
            rows.append(row)
        (out / subject).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, out / subject / "validation-00000-of-00001.parquet")
    n = per * len(SUBJECTS)
    return {**metrics("accuracy", accuracy=(100 * mean(chance), 100.0)), "questions": n, "images": n}
