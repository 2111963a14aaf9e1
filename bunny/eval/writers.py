"""Write MMMU's Hugging Face parquet layout from plain records (tests and examples).

The other benchmarks are plain JSON/TSV/text files that tests write by hand; MMMU's parquet files
(typed image structs, every column of the real release) need a writer. The synthetic world has
its own writers for all eight (``bunny.data.synthetic.bench``); ``docs/evaluation.md`` has the layouts.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

ImageLike = Image.Image | bytes


def _encode(img: ImageLike, fmt: str = "PNG") -> bytes:
    if isinstance(img, bytes):
        return img
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def write_mmmu(root: str | Path, rows: Sequence[Mapping[str, Any]], split: str = "validation") -> Path:
    """``rows``: ``{"id", "subject", "question", "options" (list), "answer", "question_type",
    "image_1".."image_7" (image or None)}``; one ``<Subject>/<split>-00000-of-00001.parquet`` each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    by_subject: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for subject, srows in by_subject.items():
        cols: dict[str, Any] = {
            "id": pa.array([r["id"] for r in srows], pa.string()),
            "question": pa.array([r["question"] for r in srows], pa.string()),
            "options": pa.array([repr(list(r.get("options") or [])) for r in srows], pa.string()),
            "explanation": pa.array(["" for _ in srows], pa.string()),
        }
        for i in range(1, 8):
            cells = []
            for r in srows:
                img = r.get(f"image_{i}")
                cells.append(None if img is None else {"bytes": _encode(img), "path": None})
            cols[f"image_{i}"] = pa.array(cells, img_type)
        cols["img_type"] = pa.array(["['Diagrams']" for _ in srows], pa.string())
        cols["answer"] = pa.array([r.get("answer", "?") for r in srows], pa.string())
        cols["topic_difficulty"] = pa.array(["Medium" for _ in srows], pa.string())
        cols["question_type"] = pa.array([r["question_type"] for r in srows], pa.string())
        cols["subfield"] = pa.array([r.get("subfield", subject) for r in srows], pa.string())
        d = root / subject
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), d / f"{split}-00000-of-00001.parquet")
    return root
