"""Score tables and the run report: ``report.md`` next to a bar chart, scores beside Bunny-v1.0-3B's.

The published numbers come from each task's ``published()`` (RECIPE.md: Bunny-v1.0-3B, SigLIP-SO +
Phi-2, LoRA). Sub-category rows (MME subtasks, POPE splits, MMBench categories, MMMU subjects...)
have no published counterpart and show ours only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bunny.eval.tasks import Task, flatten

PUBLISHED_MODEL = "Bunny-v1.0-3B"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def score_rows(task: Task, scores: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(metric, ours, published or None)`` rows: headline first, then the other keys in order."""
    flat = flatten(scores)
    published = task.published()
    keys = list(flat)
    if task.headline in flat:
        keys.remove(task.headline)
        keys.insert(0, task.headline)
    # published top-level metrics right after the headline
    for k in reversed([k for k in published if k in flat and k != task.headline]):
        keys.remove(k)
        keys.insert(1, k)
    rows = [(k, flat[k], published.get(k)) for k in keys]
    for k, v in published.items():
        if k not in flat:
            rows.append((k, None, v))
    return rows


def format_table(task: Task, scores: Mapping[str, Any]) -> str:
    """A plain-text table for the terminal."""
    rows = score_rows(task, scores)
    meta = scores.get("meta", {})
    head = f"{task.name}" + (f" ({meta.get('split')})" if meta.get("split") else "")
    lines = [head]
    if rows:
        w = max(len(r[0]) for r in rows)
        lines.append(f"  {'metric':<{w}}  {'ours':>9}  {PUBLISHED_MODEL:>14}")
        for k, v, p in rows:
            lines.append(f"  {k:<{w}}  {_fmt(v) if v is not None else '-':>9}  {_fmt(p) if p is not None else '':>14}")
    if meta:
        lines.append(f"  questions {meta.get('questions')}, answered {meta.get('answered')}, missing "
                     f"{meta.get('missing')}, unknown ids {meta.get('unknown_ids')}")
    for p in scores.get("submission", []):
        lines.append(f"  submission file for the official server: {p}")
    return "\n".join(lines)


def write_scores(path: str | Path, scores: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _headline_pairs(results: Mapping[str, tuple[Task, Mapping[str, Any]]]) -> list[tuple[str, float | None, float | None, float]]:
    """(label, ours, published, scale max) for the chart: each task's top-level published metrics
    (or its headline when none is published)."""
    out = []
    for name, (task, scores) in results.items():
        flat = flatten(scores)
        keys = list(task.published()) or [task.headline]
        for k in keys:
            ours = flat.get(k)
            if ours is None and k not in task.published():
                continue
            scale = task.headline_max if k == task.headline else 100.0
            if name == "mme":
                scale = 2000.0 if k == "perception" else 800.0
            label = name if k == task.headline or len(keys) == 1 else f"{name} {k}"
            if name == "mme":
                label = "MME-P" if k == "perception" else "MME-C"
            out.append((label, ours, task.published().get(k), scale))
    return out


def plot(results: Mapping[str, tuple[Task, Mapping[str, Any]]], path: str | Path, title: str = "") -> Path | None:
    """Bar chart of every task's headline (as % of its maximum; MME out of 2000/800), ours beside
    the published model's."""
    pairs = _headline_pairs(results)
    if not pairs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p[0] for p in pairs]
    ours = [100 * (p[1] or 0.0) / p[3] for p in pairs]
    pub = [100 * p[2] / p[3] if p[2] is not None else 0.0 for p in pairs]
    x = range(len(pairs))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(pairs) + 2), 4))
    w = 0.38
    b1 = ax.bar([i - w / 2 for i in x], ours, w, label="this model")
    ax.bar([i + w / 2 for i in x], pub, w, label=PUBLISHED_MODEL, color="#bbbbbb")
    for rect, p in zip(b1, pairs):
        if p[1] is not None:
            ax.annotate(_fmt(p[1]), (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("% of the metric's maximum")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(title or "benchmarks")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, results: Mapping[str, tuple[Task, Mapping[str, Any]]], model_id: str = "",
                 extra: Mapping[str, Any] | None = None) -> Path:
    """``report.md`` + ``scores.png`` in ``out_dir``: a summary table (headline metrics beside
    the published ones), then one table per task with every sub-category."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(results, out_dir / "scores.png", title=model_id)
    lines = [f"# Evaluation report{': ' + model_id if model_id else ''}", ""]
    if extra:
        for k, v in extra.items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    lines += ["## Summary", "", f"| benchmark | metric | ours | {PUBLISHED_MODEL} |", "|---|---|---:|---:|"]
    for name, (task, scores) in results.items():
        flat = flatten(scores)
        keys = list(task.published()) or [task.headline]
        if task.headline not in keys:
            keys.insert(0, task.headline)
        for k in keys:
            v = flat.get(k)
            p = task.published().get(k)
            ours = _fmt(v) if v is not None else ("submit the file to the server" if scores.get("submission") else "-")
            lines.append(f"| {name} ({scores.get('meta', {}).get('split') or '-'}) | {k} | {ours} | "
                         f"{_fmt(p) if p is not None else ''} |")
    if png:
        lines += ["", f"![scores]({png.name})"]
    for name, (task, scores) in results.items():
        meta = scores.get("meta", {})
        lines += ["", f"## {name}", "",
                  f"{meta.get('questions')} questions, {meta.get('answered')} answered, {meta.get('missing')} "
                  f"missing (scored wrong), {meta.get('unknown_ids')} unknown ids in the answers file.", ""]
        rows = score_rows(task, scores)
        if rows:
            lines += [f"| metric | ours | {PUBLISHED_MODEL} |", "|---|---:|---:|"]
            for k, v, p in rows:
                lines.append(f"| {k} | {_fmt(v) if v is not None else '-'} | {_fmt(p) if p is not None else ''} |")
        for p in scores.get("submission", []):
            lines.append(f"\nSubmission file for the official server: `{p}`")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
