"""Write benchmark files in the official layouts (the ones ``bunny.eval.tasks`` reads).

For generated benchmarks (the synthetic world, tests, benchmarks): each function takes plain
records plus images (PIL images or encoded bytes) and writes exactly what the official release
holds, so ``bunny eval`` reads generated and downloaded benchmarks with the same loaders.
See ``docs/evaluation.md`` for each layout.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable, Mapping, Sequence
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


def _save(img: ImageLike, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(_encode(img, fmt))


def write_mme(root: str | Path, items: Iterable[Mapping[str, Any]], images_dir_layout: Sequence[str] = ()) -> Path:
    """``items``: ``{"subtask", "image_name" (with extension), "image", "questions": [(q, "Yes"|"No"), ...]}``.
    Subtasks named in ``images_dir_layout`` use ``images/`` + ``questions_answers_YN/``; the others
    keep images and txt files side by side (the release mixes both)."""
    root = Path(root)
    for it in items:
        sub = root / it["subtask"]
        split_dirs = it["subtask"] in images_dir_layout
        img_dir, qa_dir = (sub / "images", sub / "questions_answers_YN") if split_dirs else (sub, sub)
        _save(it["image"], img_dir / it["image_name"])
        qa_dir.mkdir(parents=True, exist_ok=True)
        stem = Path(it["image_name"]).stem
        (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in it["questions"]), encoding="utf-8")
    return root


def write_pope(root: str | Path, splits: Mapping[str, Iterable[Mapping[str, Any]]],
               images: Mapping[str, ImageLike]) -> Path:
    """``splits``: ``{"random"|"popular"|"adversarial": [{"question_id", "image", "text", "label"}]}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(root / f"coco_pope_{split}.json", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: r[k] for k in ("question_id", "image", "text", "label")}) + "\n")
    for name, img in images.items():
        _save(img, root / "images" / name)
    return root


def write_gqa(root: str | Path, questions: Mapping[str, Mapping[str, Any]], images: Mapping[str, ImageLike],
              split: str = "testdev_balanced") -> Path:
    """``questions``: ``{qid: {"imageId", "question", "answer", ...}}``; images by imageId."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_questions.json").write_text(json.dumps(questions), encoding="utf-8")
    for image_id, img in images.items():
        _save(img, root / "images" / f"{image_id}.jpg")
    return root


def write_vqav2(root: str | Path, questions: Sequence[Mapping[str, Any]], images: Mapping[int, ImageLike],
                split: str = "val2014", annotations: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """``questions``: ``[{"question_id", "image_id", "question"}]``; ``annotations``:
    ``[{"question_id", "image_id", "answers": [{"answer", "answer_confidence", "answer_id"}] x10,
    "answer_type", "question_type", "multiple_choice_answer"}]`` or None for a test split."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    q = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
         "questions": list(questions), "license": {}}
    (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(q), encoding="utf-8")
    if annotations is not None:
        a = {"info": {}, "data_type": "mscoco", "data_subtype": split, "annotations": list(annotations), "license": {}}
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(a), encoding="utf-8")
    img_split = "test2015" if split == "test-dev2015" else split
    for image_id, img in images.items():
        _save(img, root / "images" / f"COCO_{img_split}_{int(image_id):012d}.jpg")
    return root


def write_sqa(root: str | Path, problems: Mapping[str, Mapping[str, Any]], splits: Mapping[str, list[str]],
              images: Mapping[str, ImageLike]) -> Path:
    """``problems``: ``{pid: {"question", "choices", "answer" (index), "hint", "image" ("image.png"|None),
    "split", ...}}``; ``images`` by pid (written to ``images/<split>/<pid>/image.png``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems), encoding="utf-8")
    (root / "pid_splits.json").write_text(json.dumps(splits), encoding="utf-8")
    for pid, img in images.items():
        p = problems[pid]
        _save(img, root / "images" / p["split"] / pid / (p.get("image") or "image.png"))
    return root


def write_seed(root: str | Path, questions: Sequence[Mapping[str, Any]], question_type: Mapping[str, int],
               images: Mapping[str, ImageLike], frames: Mapping[str, ImageLike] | None = None) -> Path:
    """``questions``: SEED-Bench records; ``images`` by data_id, ``frames`` by question_id (videos)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = {"questions": list(questions), "question_type": dict(question_type)}
    (root / "SEED-Bench.json").write_text(json.dumps(data), encoding="utf-8")
    for data_id, img in images.items():
        _save(img, root / "images" / data_id)
    for qid, img in (frames or {}).items():
        _save(img, root / "frames" / f"{qid}.png")
    return root


def circular_copies(row: Mapping[str, Any], letters: str = "ABCD") -> list[dict[str, Any]]:
    """A question and its rotations (MMBench's circular evaluation): copy k moves every option k
    places, keeps the right option's text right, and gets index ``index + k * 1,000,000``."""
    opts = [row[L] for L in letters if row.get(L) not in (None, "")]
    n = len(opts)
    ans = letters.index(row["answer"]) if row.get("answer") else None
    out = []
    for k in range(n):
        r = dict(row)
        r["index"] = int(row["index"]) + k * 1_000_000
        rotated = opts[k:] + opts[:k]
        for i, L in enumerate(letters[:n]):
            r[L] = rotated[i]
        if ans is not None:
            r["answer"] = letters[(ans - k) % n]
        if k:
            r["image"] = str(int(row["index"]))  # the copy points at the row carrying the image
        out.append(r)
    return out


def write_mmbench(root: str | Path, rows: Sequence[Mapping[str, Any]], images: Mapping[int, ImageLike],
                  name: str = "MMBench_DEV_EN", circular: bool = True) -> Path:
    """``rows``: ``{"index", "question", "hint", "A".."D", "answer" (omit for a test split), "category",
    "l2-category"}``; ``images`` by index. With ``circular``, each question gets its rotated copies."""
    import pandas as pd

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for row in rows:
        r = dict(row)
        r["image"] = base64.b64encode(_encode(images[int(row["index"])], "JPEG")).decode()
        out.extend(circular_copies(r) if circular else [r])
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    if not any("answer" in r for r in rows):
        cols.remove("answer")
    df = pd.DataFrame(out).reindex(columns=cols)
    path = root / f"{name}.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path


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
