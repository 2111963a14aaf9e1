"""Training throughput: bunny's trainer vs transformers' LlavaForConditionalGeneration + a plain padded loop.

    .venv/bin/python benchmarks/bench_train.py [--out /tmp/bench-train]     # all variants, then the sweep
    .venv/bin/python benchmarks/bench_train.py --sweep-only                 # only the 4-run sweep

One run, same small config and data for every variant (the issue's): SigLIP 6 layers / 384 wide at
224 px, patch 16 (196 image tokens); Qwen2 8 layers / 768 wide, 12 heads, 4 KV heads, vocab 32k;
batch 8; bf16 autocast; text lengths lognormal (median ~60 tokens), 10% text-only samples.

- baseline: ``LlavaForConditionalGeneration`` (same sizes), PEFT LoRA on the LLM's Linear layers (stage 2)
  or only the projector trainable (stage 1), a shuffled DataLoader padding each batch to its longest
  sample, full-vocabulary logits at every position: what a tutorial gives.
- bunny: ``bunny.train.run`` with the same recipe; then each technique switched off in turn (length
  grouping, logits only at supervised positions), packing switched on, and for stage 1 the feature cache.
- a 4-run stage-1 sweep (4 learning rates, one epoch each), with and without the feature cache, timed end
  to end (model build, validation, cache, steps, save).

Each variant trains one full epoch over the same 96 samples (so length grouping, which changes which
samples share a batch, is compared on the same work) in its own process (peak memory = its max RSS)
with one torch thread. Throughput is
reported as samples per second of *process CPU time* (the machine is shared, wall time varies 2x between
identical runs; with one thread CPU time is the idle-machine wall time) and as wall samples/s. MFU: the
useful FLOPs of a sample (counted with torch's FlopCounterMode on bunny's packed, supervised-logits step:
the work every variant must do) x samples/s, over this machine's bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

VISION = dict(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
              num_attention_heads=6)
TEXT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
BATCH = 8
N_SAMPLES = 96  # 12 steps of batch 8: one epoch per variant
WORDS = ("the a red blue green cat dog sits on mat image shows car tree house what is in this picture left right "
         "of and with small large circle square there are two three objects near far top bottom colour shape").split()


# ---------------------------------------------------------------------------------------------- data
def make_data(root: Path, seed: int = 0) -> dict:
    """LLaVA JSON with lognormal text lengths, 224 px JPEG images, and a tokenizer trained on the text."""
    import numpy as np
    from PIL import Image

    from bunny.backbones.tokenizer import save, train_tokenizer

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(N_SAMPLES):
        q = int(np.clip(rng.lognormal(np.log(14), 0.5), 3, 200))
        a = int(np.clip(rng.lognormal(np.log(40), 0.8), 2, 800))
        text_q = " ".join(rng.choice(WORDS, q))
        text_a = " ".join(rng.choice(WORDS, a))
        s = {"id": str(i), "conversations": [{"from": "human", "value": text_q}, {"from": "gpt", "value": text_a}]}
        if rng.random() > 0.1:
            name = f"{i:04d}.jpg"
            arr = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "images" / name, quality=90)
            s["image"] = name
            s["conversations"][0]["value"] = "<image>\n" + text_q
        samples.append(s)
    (root / "data.json").write_text(json.dumps(samples))
    texts = [t["value"] for s in samples for t in s["conversations"]]
    save(train_tokenizer(texts, vocab_size=2000), root / "tokenizer", model_max_length=2048)
    return {"data": str(root / "data.json"), "images": str(root / "images"), "tokenizer": str(root / "tokenizer")}


# ---------------------------------------------------------------------------------------------- workers
def bunny_config(paths: dict, out: Path, stage: str, steps: int, **over):
    from bunny.train.config import LoraSection, TinyBackbones, TrainConfig

    base = dict(
        stage=stage, tune="lora" if stage == "finetune" else "projector", output_dir=out,
        tiny=TinyBackbones(vision=dict(VISION), text=dict(TEXT), tokenizer=paths["tokenizer"]),
        data_path=paths["data"], image_folder=paths["images"], template="bunny",
        image_aspect_ratio="pad" if stage == "finetune" else "square", image_check="none",
        per_device_train_batch_size=BATCH, global_batch_size=BATCH, max_steps=steps, logging_steps=1,
        save_steps=0, progress_bar=False, report_to=["jsonl"], bf16=True, cpu_threads=1, warmup_ratio=0.0,
        learning_rate=2e-4 if stage == "finetune" else 1e-3, mm_projector_lr=2e-5 if stage == "finetune" else None,
        lora=LoraSection(r=128, alpha=256, dropout=0.05), model_max_length=2048, seed=0,
    )
    base.update(over)
    return TrainConfig(**base)


def worker_bunny(paths: dict, out: Path, stage: str, steps: int, warmup: int, over: dict) -> dict:
    from bunny.train import run
    from bunny.train.metrics import read_metrics

    run(bunny_config(paths, out, stage, steps + warmup, **over))
    records = read_metrics(out)[warmup:]
    return {"cpu_s": [r["cpu_s"] for r in records], "wall_s": [r["step_s"] for r in records]}


def worker_baseline(paths: dict, stage: str, steps: int, warmup: int) -> dict:
    """The tutorial loop: transformers' Llava, shuffled padded batches, full logits everywhere."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from bunny.data.samples import read_samples
    from bunny.data.templates import IGNORE_INDEX, get_template
    from bunny.model.processing import BunnyImageProcessor

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=SiglipVisionConfig(**VISION), text_config=Qwen2Config(**TEXT),
                         image_token_id=image_id, vision_feature_layer=-2, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu", image_seq_length=196)
    model = LlavaForConditionalGeneration(config)
    model.train()
    if stage == "finetune":
        from peft import LoraConfig, get_peft_model

        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=targets))
        for p in model.base_model.model.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
        lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        proj = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        opt = torch.optim.AdamW([{"params": lora, "lr": 2e-4}, {"params": proj, "lr": 2e-5}])
    else:
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        opt = torch.optim.AdamW(model.model.multi_modal_projector.parameters(), lr=1e-3)
    template = get_template("plain" if stage == "pretrain" else "bunny")
    images = BunnyImageProcessor(224, [0.5] * 3, [0.5] * 3, "pad" if stage == "finetune" else "square")
    samples, _ = read_samples(paths["data"])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            s = samples[i]
            ids, labels = template.encode(s.conversations, tok, image_id, 196)
            item = {"ids": torch.tensor(ids), "labels": torch.tensor(labels)}
            if s.images:
                item["pixels"] = torch.from_numpy(images.preprocess_one(Path(paths["images"]) / s.images[0]))
            return item

    def collate(items):
        width = max(len(it["ids"]) for it in items)
        ids = torch.full((len(items), width), tok.pad_token_id)
        labels = torch.full((len(items), width), IGNORE_INDEX)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = it["ids"], it["labels"], 1
        pix = [it["pixels"] for it in items if "pixels" in it]
        return ids, labels, mask, (torch.stack(pix) if pix else None)

    loader = torch.utils.data.DataLoader(DS(), batch_size=BATCH, shuffle=True, collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    cpu, wall = [], []
    it = iter(loader)
    for step in range(steps + warmup):
        t, c = time.time(), time.process_time()
        ids, labels, mask, pix = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            cpu.append(time.process_time() - c)
            wall.append(time.time() - t)
    return {"cpu_s": cpu, "wall_s": wall}


def worker_sweep(paths: dict, out: Path, steps: int, cache: bool) -> dict:
    """4 stage-1 runs (a learning-rate sweep), end to end (model build, data, cache, steps, save)."""
    from bunny.train import run

    t, c = time.time(), time.process_time()
    for k, lr in enumerate((3e-4, 1e-3, 3e-3, 1e-2)):
        over = {"learning_rate": lr}
        if cache:
            over["feature_cache"] = out / "cache"
        run(bunny_config(paths, out / f"run{k}", "pretrain", steps, **over))
    return {"total_cpu_s": time.process_time() - c, "total_wall_s": time.time() - t}


def worker_flops(paths: dict, stage: str) -> dict:
    """Useful FLOPs per sample: bunny's packed step with logits at supervised positions only."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bunny.data.dataset import Collator
    from bunny.data.samples import read_samples
    from bunny.data.templates import get_template
    from bunny.train.builder import build_start_model
    from bunny.train.data import texts_of
    from bunny.train.engines import LossModule
    from bunny.train.stages import configure_trainable

    torch.set_num_threads(1)
    cfg = bunny_config(paths, Path(tempfile.mkdtemp()), stage, 1)
    samples, _ = read_samples(paths["data"])
    model, processor, _ = build_start_model(cfg, lambda: texts_of(samples))
    configure_trainable(model, cfg)
    model.train()
    from bunny.data.dataset import SupervisedDataset

    ds = SupervisedDataset(samples, tokenizer=processor.tokenizer, template=get_template(cfg.template),
                           image_token_id=processor.image_token_id, num_image_tokens=processor.num_image_tokens,
                           image_folder=paths["images"], image_processor=processor.image_processor,
                           image_mode=cfg.image_aspect_ratio)
    loss_module = LossModule(model, True, torch.bfloat16, torch.device("cpu"))
    collate = Collator(processor.tokenizer.pad_token_id, pack=True, pack_length=4096)
    total, n = 0, 0
    for start in range(0, 16, BATCH):
        b = collate([ds[i] for i in range(start, start + BATCH)])
        with FlopCounterMode(display=False) as fc:
            loss = loss_module(input_ids=b["input_ids"], labels=b["labels"], num_items=b["n_targets"],
                               position_ids=b["position_ids"], pixel_values=b.get("pixel_values"))
            loss.backward()
        total += fc.get_total_flops()
        n += b["n_samples"]
        model.zero_grad(set_to_none=True)
    return {"flops_per_sample": total / n, "tokens_per_sample": float(ds.lengths.mean())}


def peak_bf16_flops(seconds: float = 3.0) -> float:
    """This machine's bf16 matmul peak (one thread, as the variants run): 1024^3 products, best of many."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    b = torch.randn(1024, 1024, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.time() + seconds
    while time.time() < end:
        c = time.process_time()
        for _ in range(4):
            a @ b
        dt = time.process_time() - c
        if dt > 0:
            best = max(best, 4 * 2 * 1024**3 / dt)
    return best


# ---------------------------------------------------------------------------------------------- driver
def spawn(args: argparse.Namespace, name: str, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--out", str(args.out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = result["own_rss_mb"]  # the worker's own max RSS (its whole life)
    print(f"  {name}: done", file=sys.stderr, flush=True)
    return result


def run_worker(spec: dict, out: Path) -> None:
    paths = spec["paths"]
    kind = spec["kind"]
    if kind == "bunny":
        res = worker_bunny(paths, out / spec["name"], spec["stage"], spec["steps"], spec["warmup"], spec["over"])
    elif kind == "baseline":
        res = worker_baseline(paths, spec["stage"], spec["steps"], spec["warmup"])
    elif kind == "sweep":
        res = worker_sweep(paths, out / spec["name"], spec["steps"], spec["cache"])
    elif kind == "flops":
        res = worker_flops(paths, spec["stage"])
    elif kind == "peak":
        res = {"bf16_flops": peak_bf16_flops()}
    else:
        raise ValueError(kind)
    res["own_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def print_sweep(sweep: dict, steps: int) -> None:
    no, yes = sweep[False], sweep[True]
    print(f"\n4-run stage-1 sweep ({steps} steps each, end to end): without cache "
          f"{no['total_cpu_s']:.0f} CPU-s ({no['total_wall_s']:.0f} s wall), with cache {yes['total_cpu_s']:.0f} CPU-s "
          f"({yes['total_wall_s']:.0f} s wall): {no['total_cpu_s'] / yes['total_cpu_s']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-steps", type=int, default=N_SAMPLES // BATCH, help="steps of each sweep run (one epoch)")
    p.add_argument("--sweep-only", action="store_true", help="run only the 4-run feature-cache sweep")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-train")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker), args.out)
        return
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    paths = make_data(args.out / "data")
    if args.sweep_only:
        sweep = {c: spawn(args, f"sweep cache={c}", {"kind": "sweep", "paths": paths, "name": f"sweep-{c}",
                                                     "steps": args.sweep_steps, "cache": c}) for c in (False, True)}
        print_sweep(sweep, args.sweep_steps)
        return
    common = {"paths": paths, "steps": N_SAMPLES // BATCH, "warmup": 0}  # one epoch, every step timed
    peak = spawn(args, "bf16 peak", {"kind": "peak", "paths": paths})["bf16_flops"]
    flops = {st: spawn(args, f"flops {st}", {"kind": "flops", "paths": paths, "stage": st})
             for st in ("finetune", "pretrain")}
    # build the feature cache once (its own short run) so the cached variant measures reuse
    spawn(args, "cache build", {**common, "kind": "bunny", "name": "cache-build", "stage": "pretrain", "steps": 1,
                                "warmup": 0, "over": {"feature_cache": str(args.out / "cache")}})
    variants = [
        ("finetune", "baseline: Llava + padded loop", {"kind": "baseline"}),
        ("finetune", "bunny", {"kind": "bunny", "over": {}}),
        ("finetune", "bunny - length grouping", {"kind": "bunny", "over": {"group_by_length": False}}),
        ("finetune", "bunny - supervised-only logits", {"kind": "bunny", "over": {"loss_on_supervised_only": False}}),
        ("finetune", "bunny + packing", {"kind": "bunny", "over": {"packing": True}}),
        ("pretrain", "baseline: Llava + padded loop", {"kind": "baseline"}),
        ("pretrain", "bunny", {"kind": "bunny", "over": {}}),
        ("pretrain", "bunny - length grouping", {"kind": "bunny", "over": {"group_by_length": False}}),
        ("pretrain", "bunny - supervised-only logits", {"kind": "bunny", "over": {"loss_on_supervised_only": False}}),
        ("pretrain", "bunny + feature cache (warm)", {"kind": "bunny",
                                                      "over": {"feature_cache": str(args.out / "cache")}}),
    ]
    rows = []
    for k, (stage, name, spec) in enumerate(variants):
        res = spawn(args, f"{stage} / {name}", {**common, **spec, "stage": stage, "name": f"v{k}"})
        cpu, wall = sum(res["cpu_s"]), sum(res["wall_s"])
        n = BATCH * len(res["cpu_s"])
        sps = n / cpu
        rows.append({"stage": stage, "variant": name, "samples_per_cpu_s": sps, "samples_per_wall_s": n / wall,
                     "mfu": flops[stage]["flops_per_sample"] * sps / peak, "peak_rss_mb": res["peak_rss_mb"],
                     "step_cpu_s": statistics.median(res["cpu_s"])})
    sweep = {c: spawn(args, f"sweep cache={c}", {"kind": "sweep", "paths": paths, "name": f"sweep-{c}",
                                                 "steps": args.sweep_steps, "cache": c}) for c in (False, True)}

    print(f"\nbf16 matmul peak (1 thread): {peak / 1e9:.1f} GFLOP/s; useful FLOPs/sample: "
          f"stage 2 {flops['finetune']['flops_per_sample'] / 1e9:.1f} G, stage 1 "
          f"{flops['pretrain']['flops_per_sample'] / 1e9:.1f} G (mean {flops['finetune']['tokens_per_sample']:.0f} "
          "tokens/sample)\n")
    print("| stage | variant | samples/CPU-s | vs baseline | samples/wall-s | MFU (bf16) | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for stage in ("finetune", "pretrain"):
        base = next(r for r in rows if r["stage"] == stage and r["variant"].startswith("baseline"))
        for r in (r for r in rows if r["stage"] == stage):
            label = "stage 2 (LoRA r=128)" if stage == "finetune" else "stage 1 (projector)"
            print(f"| {label} | {r['variant']} | {r['samples_per_cpu_s']:.3f} | "
                  f"{r['samples_per_cpu_s'] / base['samples_per_cpu_s']:.2f}x | {r['samples_per_wall_s']:.3f} | "
                  f"{100 * r['mfu']:.1f}% | {r['peak_rss_mb']:.0f} |")
    print_sweep(sweep, args.sweep_steps)
    (args.out / "results.json").write_text(json.dumps({"peak": peak, "flops": flops, "rows": rows, "sweep": sweep},
                                                      indent=1))


if __name__ == "__main__":
    main()
