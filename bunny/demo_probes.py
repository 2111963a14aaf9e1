"""Measurements the demo prints beside its benchmark table, so that a demo that fails says where.

- :func:`caption_probe` (ladder rung d): after stage 1, the model captions held-out images with the
  `plain` template, and each caption is read back fact by fact against the scene it shows.
- :func:`paired_bootstrap`: the coreset-vs-raw-pool difference in mean normalised gain with a 95%
  interval over questions, both arms scored on the same resampled questions.

Rungs a-c (vision features, curation embeddings, the LM on ideal input) are measured where the
backbones are made (``bunny.backbones``); rung e is the benchmark table itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bunny.data.synthetic.scenes import (
    BACKGROUND_NAMES,
    COLOR_NAMES,
    SHAPES,
    SIZES,
    Scene,
    all_positions,
    position_name,
    render,
    sample_scene,
)

_PLACE = "|".join(sorted((re.escape(p) for p in all_positions(3) if p != "center"), key=len, reverse=True))
# "a large red circle at the top left" / "a small blue square in the center" (scenes.object_phrase)
OBJECT_RE = re.compile(
    rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOR_NAMES)}) ({'|'.join(SHAPES)})s? (?:at the ({_PLACE})|in the (center))")


def read_caption(text: str) -> tuple[list[tuple[str, str, str, str]], str | None]:
    """The objects ``(size, color, shape, place)`` and the background a caption states."""
    objects = [(m[0], m[1], m[2], m[3] or m[4]) for m in OBJECT_RE.findall(text)]
    named = [b for b in BACKGROUND_NAMES if re.search(rf"\b{b}\b", text)]
    return objects, (named[0] if len(named) == 1 else None)


def score_caption(text: str, scene: Scene) -> dict[str, float]:
    """Per-caption fact scores: objects stated exactly (all four facts), colour+shape pairs, places,
    the background, the object count; and ``precision``: stated objects that exist."""
    said, background = read_caption(text)
    truth = [(o.size, o.color, o.shape, position_name(o.row, o.col, scene.grid)) for o in scene.objects]
    n = len(truth)
    pairs_said = {(c, s) for _, c, s, _ in said}
    places_said = {(p, s) for _, _, s, p in said}
    return {
        "objects": sum(t in said for t in truth) / n,
        "color_shape": sum((c, s) in pairs_said for _, c, s, _ in truth) / n,
        "shape_place": sum((p, s) in places_said for _, _, s, p in truth) / n,
        "background": float(background == scene.background),
        "count": float(len(said) == n),
        "precision": (sum(t in truth for t in said) / len(said)) if said else 0.0,
    }


def caption_probe(model_dir: str | Path, n: int = 48, seed: int = 90_210, batch_size: int = 16,
                  image_size: int | None = None, max_new_tokens: int = 64) -> dict[str, Any]:
    """Caption ``n`` held-out scenes (drawn from a seed no part of the world uses) with the stage-1
    model and score the captions (:func:`score_caption`, averaged). Chance for ``color_shape`` is
    about 1/24 per object; ``background`` 1/4."""
    from bunny.eval.runner import load_answerer

    answerer = load_answerer(model_dir, template="plain")  # cuda when present
    size = image_size or int(answerer.processor.image_processor.size)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render(sc, size, rng) for sc in scenes]
    texts: list[str] = []
    for i in range(0, n, batch_size):
        chunk = images[i:i + batch_size]
        texts += answerer(["<image>"] * len(chunk), [[im] for im in chunk], max_new_tokens)
    rows = [score_caption(t, sc) for t, sc in zip(texts, scenes)]
    out: dict[str, Any] = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}
    out["n"] = n
    out["examples"] = [{"caption": t, "truth": sc.to_dict()} for t, sc in zip(texts[:3], scenes[:3])]
    return out


# ------------------------------------------------------------------------------------------ bootstrap
def _unit(task: str, doc: Any) -> tuple[str, str]:
    """(stratum, unit) of a question: resampling keeps each task's scoring structure intact (an
    MME image's two questions, an MMBench question's circular copies, POPE's three splits)."""
    if task == "mme":
        return str(doc.meta.get("subtask")), str(doc.meta.get("image"))
    if task == "mmbench":
        return "", str(int(doc.question_id) % 1_000_000)
    if task == "pope":
        return doc.key.split("/", 1)[0], doc.key
    return "", doc.key


def _half(units: dict[tuple[str, str], list[Any]], rng: np.random.Generator) -> list[Any]:
    by_stratum: dict[str, list[tuple[str, str]]] = {}
    for key in units:
        by_stratum.setdefault(key[0], []).append(key)
    docs: list[Any] = []
    for keys in by_stratum.values():
        pick = rng.choice(len(keys), size=max(1, len(keys) // 2), replace=False)
        for i in sorted(int(j) for j in pick):
            docs += units[keys[i]]
    return docs


def paired_bootstrap(tasks: Sequence[Any], answers: Mapping[str, Mapping[str, Mapping[str, str]]],
                     gain: Callable[[str, dict], float], rounds: int = 400, seed: int = 0) -> dict[str, Any]:
    """95% interval of the difference in mean normalised gain between two arms.

    ``answers[arm][task]`` maps question keys to answer texts; ``gain(task, scores)`` turns a task's
    scores into its normalised gain. Half-sampling: each round keeps a random half of every
    task's units (stratified as :func:`_unit` says) and scores both arms on the same half with the
    task's own scorer. A half-sample statistic has about the variance of the full-sample one
    (the finite-population factor (n-m)/(n-1) halves the 1/m), so its spread gives the interval
    without duplicating question ids, which the official scorers do not allow.
    """
    arms = list(answers)
    if len(arms) != 2:
        raise ValueError(f"paired_bootstrap compares two arms, got {arms}")
    rng = np.random.default_rng(seed)
    units = {}
    for t in tasks:
        u: dict[tuple[str, str], list[Any]] = {}
        for d in t.docs():
            u.setdefault(_unit(t.name, d), []).append(d)
        units[t.name] = u

    def mean_gain(arm: str, docs_of: Mapping[str, list[Any]]) -> float:
        return float(np.mean([gain(t.name, t.score(answers[arm][t.name], docs=docs_of[t.name])) for t in tasks]))

    full = {t.name: t.docs() for t in tasks}
    point = mean_gain(arms[0], full) - mean_gain(arms[1], full)
    diffs = []
    for _ in range(rounds):
        docs_of = {name: _half(u, rng) for name, u in units.items()}
        diffs.append(mean_gain(arms[0], docs_of) - mean_gain(arms[1], docs_of))
    d = np.asarray(diffs)
    # the half-samples spread around the full-sample value: centre the interval on it
    lo, hi = np.percentile(d - d.mean(), [2.5, 97.5]) + point
    return {"arms": arms, "difference": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "rounds": rounds, "method": "stratified half-sampling over questions, paired"}


# ------------------------------------------------------------------------------------------ the ladder
def mean_gain(table: Mapping[str, Mapping[str, Any]]) -> float:
    return round(sum(v["gain"] for v in table.values()) / len(table), 4)


def compare_arms(world: Any, out: Path, arms: Sequence[str], rounds: int = 400) -> dict:
    """The coreset-vs-raw-pool difference with its 95% interval over questions (``paired_bootstrap``)."""
    from bunny.data.synthetic.bench import TASKS
    from bunny.eval.tasks import build_task, get_value, read_answers

    tasks = [build_task(t, world.bench_dir) for t in TASKS]
    answers = {arm: {t.name: read_answers(out / arm / "eval" / t.name / "answers.jsonl").texts for t in tasks}
               for arm in arms}

    def gain(task: str, scores: dict) -> float:
        b = world.bench[task]
        m = b["metrics"][b["headline"]]
        return (float(get_value(scores, b["headline"])) - m["chance"]) / (m["max"] - m["chance"])

    return paired_bootstrap(tasks, answers, gain, rounds=rounds)


def probe_ladder(figures: dict, stage1: dict[str, dict], results: dict[str, dict]) -> dict:
    """Each link of the chain, measured: (a) vision features -> scene facts, (b) embeddings for
    curation, (c) the LM answering from ideal image slots, (d) stage-1 captions of held-out images,
    (e) the benchmarks. A demo that fails shows here which link broke."""
    v, lm = figures.get("vision", {}), figures.get("lm", {})
    return {
        "a_vision_facts": {k: v.get(f"attr_{k}") for k in ("shape", "color", "size", "background", "empty")},
        "b_curation_embeddings": {k: v.get(k) for k in ("retrieval_top1", "match_auc", "dup_cos_p5",
                                                        "altered_cos_p95", "other_cos_p99")},
        "c_lm_ideal_input": lm.get("probe", {}),
        "d_stage1_captions": {arm: {k: p[k] for k in ("objects", "color_shape", "shape_place", "background",
                                                      "count", "precision")} for arm, p in stage1.items()},
        "e_benchmarks": {arm: mean_gain(r) for arm, r in results.items()},
    }


def ladder_lines(ladder: dict) -> list[str]:
    """The ladder as a few printable lines (console and report)."""
    def fmt(d: dict) -> str:
        return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())

    lm = ladder["c_lm_ideal_input"]
    lines = [f"(a) vision features -> facts (held out): {fmt(ladder['a_vision_facts'])}",
             f"(b) curation embeddings: {fmt(ladder['b_curation_embeddings'])}",
             f"(c) LM on ideal image slots (held-out questions): mean {lm.get('mean', float('nan')):.2f}"]
    lines += [f"(d) stage-1 captions, {arm}: {fmt(p)}" for arm, p in ladder["d_stage1_captions"].items()]
    lines += [f"(e) benchmarks, mean normalised gain: {fmt(ladder['e_benchmarks'])}"]
    return lines
