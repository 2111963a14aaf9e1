"""The demo's report: ``report.md`` and its plots (the curation funnel with the injected defects each
step removed, loss curves, the benchmark table, coreset vs raw pool).

The world knows which pool samples carry which defect (``defects.parquet``), and curation says which
step dropped each sample (``dropped.parquet``), so the funnel can show what each step removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from bunny.data.synthetic.bench import TASKS
from bunny.data.synthetic.pool import DEFECT_NAMES

DEFECT_COLORS = {"none": "#4c72b0", "near_duplicate": "#dd8452", "mismatched_caption": "#c44e52",
                 "blank_image": "#8c8c8c", "low_info_caption": "#937860"}
ARM_COLORS = {"coreset": "#4c72b0", "raw_pool": "#dd8452"}


def defect_funnel(curate_dir: Path, world) -> dict[str, Any]:
    """Per curation step: how many samples of each defect type it dropped, and what remains after it."""
    truth = pd.read_parquet(world.defects_parquet)[["id", "defect"]]
    dropped = pd.read_parquet(Path(curate_dir) / "dropped.parquet")[["key", "step"]].rename(columns={"key": "id"})
    funnel = json.loads((Path(curate_dir) / "funnel.json").read_text())
    # steps that ran and could drop something (a disabled filter or band is left out of the table)
    steps = [s["step"] for s in funnel["steps"]
             if s["step"] not in ("input", "kmeans", "cluster") and s.get("enabled", True)]
    merged = truth.merge(dropped, on="id", how="left")
    remaining = {d: int((truth["defect"] == d).sum()) for d in DEFECT_NAMES}
    rows = [{"step": "input", "removed": {d: 0 for d in DEFECT_NAMES}, "remaining": dict(remaining)}]
    for step in steps:
        removed = {d: int(((merged["step"] == step) & (merged["defect"] == d)).sum()) for d in DEFECT_NAMES}
        if step == "embed" and not any(removed.values()):
            continue  # every image decoded: nothing to show
        remaining = {d: remaining[d] - removed[d] for d in DEFECT_NAMES}
        rows.append({"step": step, "removed": removed, "remaining": dict(remaining)})
    final = rows[-1]["remaining"]
    pool_defective = int((truth["defect"] != "none").sum())
    kept_defective = sum(v for d, v in final.items() if d != "none")
    kept = sum(final.values())
    return {"steps": rows, "pool": len(truth), "pool_defective": pool_defective, "kept": kept,
            "kept_defective": kept_defective,
            "defect_rate_pool": round(pool_defective / max(len(truth), 1), 4),
            "defect_rate_coreset": round(kept_defective / max(kept, 1), 4)}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_defect_funnel(defects: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = defects["steps"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.4), dpi=110)
    for i, r in enumerate(rows):
        left = 0
        for d in DEFECT_NAMES:
            n = r["remaining"][d]
            ax.barh(i, n, left=left, color=DEFECT_COLORS[d], label=d.replace("_", " ") if i == 0 else None)
            left += n
        gone = sum(v for k, v in r["removed"].items() if k != "none")
        note = f"{left}" + (f"  (-{gone} defective, -{r['removed']['none']} clean)" if i else "")
        ax.text(left, i, " " + note, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_yticks(range(len(rows)), [r["step"].replace("_", "-") for r in rows])
    ax.set_xlim(0, rows[0]["remaining"]["none"] * 2.2 + 1)
    ax.set_xlabel("pool samples left after the step, by injected defect")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("curation funnel: what each step removed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def plot_losses(out: Path, arms: list[str], backbone_figures: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    v, lm = backbone_figures.get("vision", {}), backbone_figures.get("lm", {})
    if v.get("losses"):
        axes[0].plot(v["losses"], label="SigLIP sigmoid loss", color="#55a868")
    if lm.get("losses"):
        axes[0].plot(lm["losses"], label="LM loss (text)", color="#8172b2")
    axes[0].set_title("backbones")
    for ax, stage in zip(axes[1:], ("stage1", "stage2")):
        for arm in arms:
            pts = _losses(out / arm / stage)
            if pts:
                ax.plot(*zip(*pts), label=arm.replace("_", " "), color=ARM_COLORS[arm])
        ax.set_title({"stage1": "stage 1 (align, projector)", "stage2": "stage 2 (instruct)"}[stage])
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_benchmarks(results: dict[str, dict], path: Path) -> Path:
    plt = _plt()
    arms = list(results)
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=110)
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        gains = [results[arm][t]["gain"] for t in TASKS]
        xs = [i + (k - (len(arms) - 1) / 2) * width for i in range(len(TASKS))]
        ax.bar(xs, gains, width, color=ARM_COLORS[arm], label=f"{arm.replace('_', ' ')} (mean {_mean(gains):.2f})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(0.5, color="gray", linewidth=0.6, linestyle="--")
    ax.set_xticks(range(len(TASKS)), TASKS)
    ax.set_ylabel("(score - chance) / (max - chance)")
    ax.set_ylim(min(-0.1, min(results[a][t]["gain"] for a in arms for t in TASKS) - 0.05), 1.05)
    ax.set_title("the eight benchmarks: normalised gain over chance")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def write_report(out: Path, cfg, world, bb, funnel: dict, defects: dict, results: dict[str, dict],
                 summary: dict) -> Path:
    """``out/report.md`` with funnel.png, losses.png and benchmarks.png beside it."""
    from bunny.config import to_dict

    arms = list(results)
    plot_defect_funnel(defects, out / "funnel.png")
    plot_losses(out, arms, bb.figures, out / "losses.png")
    plot_benchmarks(results, out / "benchmarks.png")
    lines = [f"# bunny demo{' (quick)' if summary.get('quick') else ''}", ""]
    gains = summary["gain"]
    lines += ["The whole recipe on the synthetic world: curate the raw pool, align (stage 1), instruct "
              "(stage 2), evaluate on the eight benchmarks. Normalised gain = (score - chance) / (max - chance): "
              "0 is random answering, 1 is every answer right.", ""]
    lines += [f"**Mean normalised gain: {gains['coreset']['mean']:.3f} (coreset)"
              + (f" vs {gains['raw_pool']['mean']:.3f} (raw pool, same steps)" if "raw_pool" in gains else "")
              + f".** Total time {summary['seconds']['total']:.0f} s, peak memory {summary['peak_rss_mb']:.0f} MiB.", ""]

    if "bootstrap" in summary:
        b = summary["bootstrap"]
        lines += [f"Coreset minus raw pool: **{b['difference']:+.3f}** mean normalised gain, 95% interval "
                  f"[{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}] over questions ({b['method']}, {b['rounds']} rounds). "
                  "It does not include the run-to-run spread of training: stage 1's outcome alone moves with "
                  "its seed by more than this (docs/demo.md).", ""]
    if "ladder" in summary:
        from bunny.demo_probes import ladder_lines

        lines += ["## Probe ladder: each link of the chain, measured", "",
                  "(a) the vision tower's features carry the scene facts (linear heads, held-out scenes); (b) the "
                  "SigLIP embeddings curation uses tell captions and scenes apart; (c) the LM answers held-out "
                  "questions from ideal image slots; (d) after stage 1, the MLLM's captions of held-out images, read "
                  "back fact by fact (chance: colour+shape about 0.04, background 0.25); (e) the benchmarks.", ""]
        lines += [f"- {line}" for line in ladder_lines(summary["ladder"])] + [""]

    lines += ["## Benchmarks", "", "| task | metric | chance | max | " + " | ".join(
        f"{a.replace('_', ' ')} score | gain" for a in arms) + " |", "|---|---|---:|---:|" + "---:|---:|" * len(arms)]
    for t in TASKS:
        r = results[arms[0]][t]
        cells = " | ".join(f"{results[a][t]['score']:.1f} | {results[a][t]['gain']:.3f}" for a in arms)
        lines.append(f"| {t} | {r['metric']} | {r['chance']:.1f} | {r['max']:.0f} | {cells} |")
    lines.append("| **mean gain** | | | | " + " | ".join(f"| **{gains[a]['mean']:.3f}**" for a in arms) + " |")
    lines += ["", "![benchmarks](benchmarks.png)", ""]
    lines += ["Per-task details (sub-scores, answers): " + ", ".join(f"[{a}]({a}/eval/report.md)" for a in arms), ""]

    lines += ["## Curation: the coreset and the injected defects", ""]
    lines += [f"The raw pool has {defects['pool']} samples, {defects['pool_defective']} of them defective "
              f"({100 * defects['defect_rate_pool']:.0f}%); the coreset keeps {defects['kept']}, "
              f"{defects['kept_defective']} defective ({100 * defects['defect_rate_coreset']:.1f}%).", ""]
    head = ["step"] + [d.replace("_", " ") for d in DEFECT_NAMES]
    lines += ["| " + " | ".join(head) + " | left |", "|---" + "|---:" * len(DEFECT_NAMES) + "|---:|"]
    for r in defects["steps"]:
        if r["step"] == "input":
            cells = [str(r["remaining"][d]) for d in DEFECT_NAMES]
        else:
            cells = [f"-{r['removed'][d]}" for d in DEFECT_NAMES]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + f" | {sum(r['remaining'].values())} |")
    lines += ["", "![curation funnel](funnel.png)", "",
              f"Curation settings: `{json.dumps(_curate_summary(to_dict(cfg.curate)))}`; step timings in "
              "[curate/funnel.json](curate/funnel.json).", ""]

    lines += ["## Training", "", "![losses](losses.png)", ""]
    lines += [f"- stage 1: `{json.dumps(cfg.stage1)}`", f"- stage 2: `{json.dumps(cfg.stage2)}`", ""]
    bf = bb.figures
    v, lm = bf.get("vision", {}), bf.get("lm", {})
    lines += ["## Backbones (made here)", "",
              f"Folders in `{bb.root}`{' (reused from the cache)' if bb.reused else ''}: `siglip/` (SiglipModel, "
              f"{v.get('params', 0):,} parameters), `lm/` (PhiForCausalLM, {lm.get('params', 0):,} parameters), "
              "`tokenizer/`.", ""]
    if v:
        lines.append(f"- SigLIP-style model: {v['seconds']} s; sigmoid loss {v['sigmoid_loss_first']} -> "
                     f"{v['sigmoid_loss_last']}; held out: caption retrieval top-1 {v.get('retrieval_top1')}, "
                     f"attribute heads color {v.get('attr_color')} / shape {v.get('attr_shape')} / "
                     f"size {v.get('attr_size')}.")
    if lm:
        lines.append(f"- LM: {lm['seconds']} s; loss {lm['loss_first']} -> {lm['loss_last']}; answering from a "
                     f"description in context (held out, exact match): mean {lm.get('probe', {}).get('mean')}.")
    lines += ["", "## Time and memory", "", "| phase | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()]
    lines += ["", f"Peak resident memory: {summary['peak_rss_mb']:.0f} MiB.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _curate_summary(d: dict) -> dict:
    keys = ("clusters", "dedup_threshold", "keep", "image_text_band", "centroid_band", "sample")
    return {k: d[k] for k in keys if k in d}
