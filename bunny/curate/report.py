"""The funnel report: ``funnel.json`` (count after each step, timings, the config) and ``funnel.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TIMING_ONLY = ("kmeans", "cluster")  # steps that drop nothing: in funnel.json for their time, not in the plot
LABELS = {
    "input": "input",
    "embed": "embedded (readable)",
    "filter": "basic filter",
    "dedup": "k-means + dedup",
    "image_text": "image-text band",
    "centroid": "centroid band",
    "sample": "random sample",
}


def write_funnel(out: Path, funnel: dict[str, Any]) -> None:
    (out / "funnel.json").write_text(json.dumps(funnel, indent=2) + "\n")
    plot_funnel(funnel, out / "funnel.png")


def _timing_before(steps: list[dict[str, Any]], step: dict[str, Any]) -> list[dict[str, Any]]:
    """The timing-only steps (k-means, assignment) just before ``step``: their time is part of its cost."""
    i = steps.index(step)
    out = []
    while i > 0 and steps[i - 1]["step"] in TIMING_ONLY:
        i -= 1
        out.append(steps[i])
    return out


def plot_funnel(funnel: dict[str, Any], path: Path) -> None:
    """Horizontal bars, one per step, with the count and the share of the input it keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = [s for s in funnel["steps"] if s["step"] not in TIMING_ONLY]
    total = max(steps[0]["count"], 1)
    names = [LABELS.get(s["step"], s["step"]) + ("" if s.get("enabled", True) else " (off)") for s in steps]
    counts = [s["count"] for s in steps]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(steps) + 1.2), dpi=110)
    colors = ["#4c72b0" if s.get("enabled", True) else "#b0b0b0" for s in steps]
    bars = ax.barh(range(len(steps)), counts, color=colors)
    ax.invert_yaxis()
    ax.set_yticks(range(len(steps)), names)
    ax.set_xlim(0, max(counts) * 1.35 if max(counts) else 1)
    for bar, c, s in zip(bars, counts, steps):
        seconds = s.get("seconds", 0.0) + sum(t.get("seconds", 0.0) for t in _timing_before(funnel["steps"], s))
        timing = f", {seconds:.1f} s" if s["step"] != "input" and s.get("enabled", True) else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {c:,} ({100 * c / total:.1f}%{timing})",
                va="center", fontsize=9)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("samples after the step (share of the input, seconds of the step)")
    title = funnel.get("title") or "bunny curate: samples after each step"
    ax.set_title(title, fontsize=11)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
