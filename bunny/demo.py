"""The whole Bunny recipe on the synthetic world, on a CPU, in minutes; nothing is downloaded.

    synth -> backbones (tokenizer, SigLIP-style model, small LM; cached) -> curate the raw pool with the
    SigLIP embeddings -> stage 1 (align) -> stage 2 (instruct) -> the eight benchmarks -> report

and the data-centric comparison: the same recipe with the raw pool in place of the coreset, at the
same number of steps. Every step runs through the project's own entry points (``generate_world``,
``bunny.curate``, ``bunny.train.run``, ``bunny.eval.runner``), on backbone folders laid out like
google/siglip-so400m and microsoft/phi-2.

examples:
  bunny demo                          # full demo into runs/demo (report: runs/demo/report.md)
  bunny demo --quick --out /tmp/q     # the quick version (about 3 minutes)
  bunny demo --config configs/demo/full.yaml stage2.max_steps=800

Writes under --out: world/, curate/, coreset/ and raw_pool/ (stage1/, stage2/, eval/ each),
report.md with its PNGs, summary.json (per task {score, chance, max}, and {"coreset", "raw_pool"}).
The backbones are cached in --cache (default ~/.cache/bunny/demo): a second run skips them.
See docs/demo.md.
"""

from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:  # before OpenMP starts: spinning threads crawl on a shared CPU
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bunny.backbones import BackboneSettings  # noqa: E402
from bunny.backbones.language import LMSettings  # noqa: E402
from bunny.backbones.vision import VisionSettings  # noqa: E402
from bunny.curate.config import CurateConfig  # noqa: E402
from bunny.data.synthetic.bench import TASKS  # noqa: E402
from bunny.demo_probes import mean_gain  # noqa: E402

ARMS = ("coreset", "raw_pool")


# ------------------------------------------------------------------------------------------ config
# A web crawl is noisy: over half of this pool is defective, and two in five of its captions describe
# another image (35% another scene's caption, 5% a blank image), so what curation removes matters. With
# a fifth mismatched (15/20/5/15%) the 5,000-step LM read the raw pool's noisier projector almost as well
# as the coreset's: +0.089 / +0.040 / +0.021 at training seeds 0-2, against +0.31 / +0.50 / +0.07 / +0.10
# at seeds 0-3 with this mix (docs/demo.md, "The pool's mix").
DEMO_DEFECTS = {"near_duplicate": 0.10, "mismatched_caption": 0.35, "blank_image": 0.05, "low_info_caption": 0.05}
# Instruction data dense in questions: multi-turn conversations carry up to 8 answers per image.
DEMO_KINDS = {"short": 0.25, "yesno": 0.15, "mc": 0.15, "multi": 0.35, "describe": 0.06, "caption": 0.04}


@dataclass
class WorldSection:
    n_images: int = 3000
    n_instruct: int | None = 4000
    text_share: float = 0.1
    bench_size: int = 200
    defects: dict = field(default_factory=lambda: dict(DEMO_DEFECTS))
    instruct_kinds: dict = field(default_factory=lambda: dict(DEMO_KINDS))
    max_turns: int = 8
    seed: int = 0


@dataclass
class EvalSection:
    batch_size: int = 32
    max_new_tokens: int = 8  # every answer of the world is a word or two
    caption_probe_images: int = 48  # held-out images the stage-1 model captions (probe ladder, rung d)


def _demo_curate() -> CurateConfig:
    """The coreset recipe for the world (docs/demo.md, "Curation on the demo's world", says why these
    differ from LAION's): a caption-length filter (the world's true captions have 9 words or more, web
    filler like "IMG_4821.jpg" 3 or fewer), dedup at the calibrated threshold keeping the biggest file
    of each group (a mirror's copy is re-encoded smaller), and the top half by image-caption similarity
    (about 45% of the pool left after dedup carries another scene's caption or a blank image)."""
    return CurateConfig(clusters=16, kmeans_train_size=100_000, dedup_threshold=0.993, keep="largest",
                        min_caption_words=5, image_text_band=(0.0, 0.5), centroid_band=(0.0, 1.0), sample=None,
                        embed_batch_size=128, shard_size=100_000, image_mode="square", seed=0)


@dataclass
class DemoConfig:
    world: WorldSection = field(default_factory=WorldSection)
    # the shipped set (bunny/backbones/shipped): aux_weight 3 keeps the per-cell shape readable from the
    # patch tokens (held-out shape probe 0.79 at 1, 0.97 at 3); the LM's 5,000 steps (2,500 before) took
    # its multiple choice on ideal slots from 0.71 to 0.78 and the full demo's mean from 0.48 to 0.58
    # (docs/demo.md)
    backbones: BackboneSettings = field(default_factory=lambda: BackboneSettings(
        vision=VisionSettings(aux_weight=3.0), lm=LMSettings(steps=5000, multi_share=0.5, readout_weight=0.3)))
    curate: CurateConfig = field(default_factory=_demo_curate)
    # stage 1: the projector alone, `plain` captions of the coreset (or the raw pool), as the recipe's.
    # Its output layer starts at zero and lr 5e-3 is reached over 30 steps: with the default init a run
    # stayed on the loss plateau (the LM captioning from its prior) for 55-935 steps, or for good in one
    # run of four; zeroed, with the 30-step warmup, every run measured left it within 45-75 steps, the
    # quick preset's 150 steps included (docs/demo.md, "Leaving the plateau").
    stage1: dict = field(default_factory=lambda: {
        "max_steps": 1000, "learning_rate": 5e-3, "per_device_train_batch_size": 32, "warmup_steps": 30,
        "projector_init": "zero_out"})
    # stage 2: LoRA on every Linear of the LM, the projector at a tenth of its rate (the recipe's ratio)
    stage2: dict = field(default_factory=lambda: {
        "tune": "lora", "lora": {"r": 64, "alpha": 128, "dropout": 0.05}, "max_steps": 600,
        "learning_rate": 1e-3, "mm_projector_lr": 1e-4, "per_device_train_batch_size": 16, "warmup_ratio": 0.03})
    eval: EvalSection = field(default_factory=EvalSection)
    compare_raw_pool: bool = True
    calibrate_dedup: bool = True
    """Set curate.dedup_threshold from held-out pairs measured on the SigLIP model just trained (its
    cosine scale is not CLIP ViT-L's, for which the paper's 0.86 was chosen): see calibrated_threshold."""
    cpu_threads: int | None = None


def quick_config() -> DemoConfig:
    """``--quick``: the same pipeline and the same (shipped) backbones, smaller numbers."""
    cfg = DemoConfig()
    cfg.world = WorldSection(n_images=1500, n_instruct=1500, bench_size=100)
    # the 8-minute budget: 400 stage-1 steps (14 s per 150 here) ground the coreset at every seed measured
    # (caption precision 0.61-0.71; at 150 steps 0.29-0.56 with the readout LM): docs/demo.md
    cfg.stage1 = {**cfg.stage1, "max_steps": 400}
    cfg.stage2 = {**cfg.stage2, "max_steps": 300}
    return cfg


def load_demo_config(path: str | Path | None, overrides: list[str], quick: bool) -> DemoConfig:
    from bunny.config import from_dict, load_config, parse_overrides, to_dict

    if path is not None:
        return load_config(DemoConfig, path, overrides)
    base = to_dict(quick_config() if quick else DemoConfig())
    if overrides:
        from bunny.config import merge_dicts  # the same merge load_config applies

        base = merge_dicts(base, parse_overrides(overrides))
    return from_dict(DemoConfig, base, "demo preset" + (" (quick)" if quick else ""))


# ---------------------------------------------------------------------------------------- progress
class Progress:
    """One line per phase with the elapsed time; the phases' own bars (training, evaluation) in between."""

    def __init__(self, phases: list[str], stream=sys.stdout) -> None:
        self.phases, self.stream = phases, stream
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60}:{s % 60:02d}"

    def start(self, name: str, detail: str = "") -> None:
        i = self.phases.index(name) + 1
        self._current = (name, time.perf_counter())
        print(f"[{self.elapsed()}] ({i}/{len(self.phases)}) {name}{': ' + detail if detail else ''}",
              file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(f"          {text}", file=self.stream, flush=True)

    def done(self, text: str = "") -> None:
        name, t = self._current
        self.times[name] = round(time.perf_counter() - t, 1)
        print(f"[{self.elapsed()}]        {name} done in {self.times[name]:.1f} s{' - ' + text if text else ''}",
              file=self.stream, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------- steps
def train_stage(stage: str, overrides: dict, **paths: Any) -> Path:
    """One stage through ``bunny.train.run`` (the code ``bunny train`` runs). float32: at these widths
    bfloat16 autocast is no faster on the CPU and measurably slows learning (docs/demo.md)."""
    from bunny.config import from_dict
    from bunny.train import TrainConfig, run

    cfg = from_dict(TrainConfig, {
        "stage": stage, "save_steps": 0, "report_to": ["jsonl"], "logging_steps": 5, "seed": 0,
        "dataloader_num_workers": 0, "bf16": False, **{k: str(v) for k, v in paths.items()}, **overrides,
    }, f"demo {stage}")
    cfg.check_paths()
    final = run(cfg)
    if final is None:
        raise RuntimeError(f"{stage} stopped before its last step ({cfg.output_dir})")
    return Path(final)


def evaluate(model_dir: Path, bench_dir: Path, out: Path, ev: EvalSection) -> dict[str, dict]:
    """The eight benchmarks with ``bunny.eval``'s runner; ``{task: scores}``."""
    from bunny.eval.runner import load_answerer, run_tasks
    from bunny.eval.tasks import build_task

    answerer = load_answerer(model_dir)  # cuda when present (the runner's default)
    tasks = [build_task(t, bench_dir) for t in TASKS]
    runs = run_tasks(tasks, answerer, out, batch_size=ev.batch_size, model_id=answerer.model_id,
                     max_new_tokens=ev.max_new_tokens, progress=True, report=True, echo=None)
    return {name: r.scores for name, r in runs.items()}


def headline_table(world, scores: dict[str, dict]) -> dict[str, dict]:
    """Per task ``{"score", "chance", "max", "gain"}`` with the world's chance levels."""
    from bunny.eval.tasks import get_value

    out = {}
    for task in TASKS:
        b = world.bench[task]
        m = b["metrics"][b["headline"]]
        score = float(get_value(scores[task], b["headline"]))
        gain = (score - m["chance"]) / (m["max"] - m["chance"])
        out[task] = {"metric": b["headline"], "score": round(score, 2), "chance": m["chance"], "max": m["max"],
                     "gain": round(gain, 4)}
    return out


def calibrated_threshold(vision_figures: dict) -> float:
    """The dedup threshold for this SigLIP model, from held-out pairs: the cosine above which 9 of 10
    re-encoded copies of a fresh scene fall (``dup_cos_p10``; its cosine scale is not CLIP ViT-L's, for
    which the paper's 0.86 was chosen). Lower catches the last copies but chains distinct scenes that
    share most facts into one group (measured on the full world: 0.98 kept 53% of the clean samples,
    0.993 kept 70%); backbones cached before that figure existed fall back to the 5th percentile."""
    return round(vision_figures.get("dup_cos_p10", vision_figures["dup_cos_p5"]), 5)



# --------------------------------------------------------------------------------------------- run
def run_demo(cfg: DemoConfig, out: str | Path, cache: str | Path, quick: bool = False) -> dict:
    """Run everything; returns the summary (also written to ``out/summary.json``)."""
    import torch

    from bunny.backbones import build_backbones
    from bunny.curate.embed import embed_pool
    from bunny.curate.pipeline import run_local
    from bunny.data.synthetic import generate_world
    from bunny.demo_probes import caption_probe, compare_arms, ladder_lines, probe_ladder
    from bunny.demo_report import defect_funnel, write_report

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.cpu_threads or max(1, os.cpu_count() or 1))
    arms = ARMS if cfg.compare_raw_pool else ARMS[:1]
    phases = ["synth", "backbones", "curate"] + [f"{p} ({a})" for a in arms for p in ("stage 1", "stage 2", "eval")]
    phases.append("report")
    prog = Progress(phases)

    w = cfg.world
    prog.start("synth", f"{w.n_images} pool samples, {w.bench_size} questions per benchmark")
    world = generate_world(out / "world", w.n_images, w.seed, n_instruct=w.n_instruct, text_share=w.text_share,
                           bench_size=w.bench_size, defects=w.defects, instruct_kinds=w.instruct_kinds,
                           max_turns=w.max_turns)
    prog.done("reused" if world.reused else f"{world.counts['pool']} pool samples, "
              f"{world.counts['instruct']} conversations")

    prog.start("backbones", f"cache {cache}")
    bb = build_backbones(cache, cfg.backbones, log=prog.note)
    prog.done("cached, skipped" if bb.reused else f"in {bb.root}")

    if cfg.calibrate_dedup:
        cfg.curate.dedup_threshold = calibrated_threshold(bb.figures["vision"])
    prog.start("curate", "SigLIP embeddings -> k-means -> dedup -> image-text band -> centroid band")
    emb = embed_pool(world.pool_json, world.images_dir, bb.vision, out / "curate" / "embeddings", cfg.curate)
    funnel = run_local(emb, out / "curate", cfg.curate)
    defects = defect_funnel(out / "curate", world)
    kept = funnel["steps"][-1]["count"]
    prog.done(f"coreset {kept} of {funnel['steps'][0]['count']}; defective {defects['kept_defective']} "
              f"of {defects['pool_defective']} kept")

    results: dict[str, dict] = {}
    stage1_probe: dict[str, dict] = {}
    data = {"coreset": out / "curate" / "coreset.json", "raw_pool": world.pool_json}
    for arm in arms:
        prog.start(f"stage 1 ({arm})", f"projector on {data[arm].name}")
        s1 = train_stage("pretrain", cfg.stage1, output_dir=out / arm / "stage1", vision_tower=bb.vision,
                         language_model=bb.lm, data_path=data[arm], image_folder=world.images_dir)
        stage1_probe[arm] = caption_probe(s1, n=cfg.eval.caption_probe_images)
        prog.done(f"held-out captions: colour+shape {stage1_probe[arm]['color_shape']:.2f}, "
                  f"place+shape {stage1_probe[arm]['shape_place']:.2f}, background {stage1_probe[arm]['background']:.2f}")
        prog.start(f"stage 2 ({arm})", f"{cfg.stage2.get('tune', 'lora')} on {world.instruct_json.name}")
        s2 = train_stage("finetune", cfg.stage2, output_dir=out / arm / "stage2", projector_from=s1.parent,
                         data_path=world.instruct_json, image_folder=world.images_dir)
        prog.done()
        prog.start(f"eval ({arm})", "the eight benchmarks, greedy")
        scores = evaluate(s2, world.bench_dir, out / arm / "eval", cfg.eval)
        results[arm] = headline_table(world, scores)
        prog.done(f"mean normalised gain {mean_gain(results[arm]):.3f}")

    prog.start("report")
    ladder = probe_ladder(bb.figures, stage1_probe, results)
    for line in ladder_lines(ladder):
        prog.note(line)
    summary: dict[str, Any] = {t: {k: results["coreset"][t][k] for k in ("score", "chance", "max")} for t in TASKS}
    summary.update({arm: {t: {k: results[arm][t][k] for k in ("score", "chance", "max")} for t in TASKS}
                    for arm in arms})
    summary["gain"] = {arm: {"mean": mean_gain(results[arm]), **{t: results[arm][t]["gain"] for t in TASKS}}
                       for arm in arms}
    summary["metric"] = {t: results["coreset"][t]["metric"] for t in TASKS}
    summary["curation"] = defects
    summary["ladder"] = ladder
    if len(arms) == 2:
        summary["bootstrap"] = compare_arms(world, out, arms)
        b = summary["bootstrap"]
        prog.note(f"coreset - raw pool: {b['difference']:+.3f} mean gain, 95% interval [{b['ci95'][0]:+.3f}, "
                  f"{b['ci95'][1]:+.3f}]")
    summary["backbones"] = {"cache": str(bb.root), "reused": bb.reused}
    summary["quick"] = quick
    summary["seconds"] = {**prog.times, "total": round(time.perf_counter() - prog.t0, 1)}
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report = write_report(out, cfg, world, bb, funnel, defects, results, summary)
    summary["seconds"]["total"] = round(time.perf_counter() - prog.t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    prog.done()
    print(f"report: {report}", flush=True)
    return summary


# --------------------------------------------------------------------------------------------- CLI
def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bunny" / "demo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. stage2.max_steps=800 world.n_images=2000")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="the quick version (about 3 minutes on 2 cores)")
    p.add_argument("--config", type=Path, default=None,
                   help="a demo YAML (configs/demo/full.yaml or quick.yaml); default: the built-in preset")
    p.add_argument("--cache", type=Path, default=None, help=f"backbone cache (default {default_cache()})")


def run(args: argparse.Namespace) -> int:
    from bunny.config import ConfigError

    try:
        cfg = load_demo_config(args.config, list(args.overrides), args.quick)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_demo(cfg, args.out, args.cache or default_cache(), quick=args.quick)
    return 0
