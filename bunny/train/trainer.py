"""One training stage, top to bottom: ``run(cfg) -> output_dir/final``.

    set up processes -> read data -> start model -> validate data -> what trains -> feature cache
    -> batch plan + schedule -> engine -> resume -> loop (micro-batches, step, log, checkpoint)
    -> final/ (+ loss.png)

Everything a step needs is known before it runs: the plan says which samples form each global
batch, and the loss denominator (supervised targets of the whole global batch) comes from token
counts measured during validation, so no communication is needed to normalise the loss and a
resumed run replays exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bunny.config import to_dict
from bunny.data.dataset import BatchPlan, Collator
from bunny.data.templates import get_template
from bunny.train import checkpointing as ckpt_io
from bunny.train.builder import PROJECTOR_FILE, build_start_model
from bunny.train.config import ConfigError, TrainConfig
from bunny.train.data import build_dataset, read_raw, texts_of
from bunny.train.distributed import DistInfo, setup, teardown
from bunny.train.engine import LossModule, build_engine
from bunny.train.metrics import MetricsWriter, plot_loss
from bunny.train.schedule import warmup_steps_for
from bunny.train.stages import check_qlora_available, configure_trainable, trainable_summary

log = logging.getLogger("bunny.train")

#: config keys that may change between a run and its resumption (they do not change the maths)
RUNTIME_KEYS = {
    "output_dir", "resume", "logging_steps", "save_steps", "save_total_limit", "report_to", "progress_bar",
    "stop_after_steps", "dataloader_num_workers", "device", "save_merged", "image_check", "feature_cache",
    "cpu_threads",
}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.bf16 == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cfg.bf16 else None


def _recipe_digest(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_KEYS}


def _setup_logging(main: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def check_packing(model: Any, device: torch.device) -> None:
    """Packing relies on the LLM building a per-sample causal mask from restarting ``position_ids``.
    Probe it: two short sequences packed in one row must give the logits they give alone."""
    llm = model.language_model
    vocab = int(model.config.text_config.vocab_size)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, min(vocab, 1000), (1, 5), generator=g).to(device)
    b = torch.randint(0, min(vocab, 1000), (1, 4), generator=g).to(device)
    pos = torch.cat([torch.arange(5), torch.arange(4)]).unsqueeze(0).to(device)
    was = llm.training
    llm.eval()
    with torch.no_grad():
        alone = llm(input_ids=b, use_cache=False).logits[0]
        packed = llm(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits[0, 5:]
    llm.train(was)
    if not torch.allclose(alone.float(), packed.float(), atol=1e-4, rtol=1e-3):
        raise ConfigError(
            f"packing: the language model ({type(llm).__name__}, attention {model.config.text_config._attn_implementation}) "
            "lets packed samples attend to each other; use packing: false (or attn_implementation: sdpa/eager/"
            "flash_attention_2)"
        )


class _Batches:
    """This rank's micro-batches for one epoch, from a given step (a DataLoader over the plan)."""

    def __init__(self, dataset, plan: BatchPlan, collator: Collator, cfg: TrainConfig, rank: int,
                 pin: bool) -> None:
        self.dataset, self.plan, self.collator, self.cfg, self.rank, self.pin = dataset, plan, collator, cfg, rank, pin

    def loader(self, epoch: int, start_step: int):
        micro = self.plan.micro_batches(epoch, self.rank, start_step)
        workers = self.cfg.dataloader_num_workers
        # Its own generator: creating an iterator draws a seed, which must not move the global torch
        # RNG (dropout), or a resumed run (a new iterator mid-epoch) would drift from an uninterrupted one.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch * 1009 + self.rank)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=micro, collate_fn=self.collator, num_workers=workers,
            pin_memory=self.pin, prefetch_factor=4 if workers else None, persistent_workers=False, generator=gen,
        )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "image_features")
    return {k: (batch[k].to(device, non_blocking=True) if torch.is_tensor(batch.get(k)) else None) for k in keys}


def _progress(cfg: TrainConfig, main: bool, total: int, initial: int):
    if not (main and cfg.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr)


def run(cfg: TrainConfig) -> Path | None:
    """Run one stage as ``cfg`` says; returns ``output_dir/final`` (None when stopped early by
    ``stop_after_steps``). Under ``torchrun`` every process calls this."""
    dist = setup(cfg.device, need_group=cfg.distributed in ("deepspeed", "fsdp"))
    try:
        final = _run(cfg, dist)
    except BaseException:
        teardown(dist, barrier=False)
        raise
    teardown(dist)
    return final


def _run(cfg: TrainConfig, dist: DistInfo) -> Path | None:
    t_start = time.time()
    _setup_logging(dist.is_main)
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale_temporaries(out)
    dist.barrier()
    device = dist.device
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    check_qlora_available(cfg, device)
    _seed_all(cfg.seed)
    resume_from = ckpt_io.resolve_resume(out, cfg.resume)
    resume_state = ckpt_io.read_state(resume_from) if resume_from is not None else None
    if resume_state is not None:
        diff = sorted(k for k, v in _recipe_digest(cfg).items() if resume_state.get("recipe", {}).get(k) != v)
        if diff:
            raise ConfigError(f"resume from {resume_from}: the config differs from the run's in {diff}; "
                              "resume with the same recipe (only runtime keys such as save_steps may change)")

    # ---- data (read) and the start model ------------------------------------------------------
    samples, read_issues = read_raw(cfg)
    model, processor, base_folder = build_start_model(cfg, lambda: texts_of(samples), dist.is_main, dist.barrier)
    template = get_template(cfg.template or model.config.chat_template)
    dataset = build_dataset(cfg, samples, read_issues, processor=processor, template=template, dist=dist)
    if dist.is_main:
        n_img = int(dataset.has_image.sum())
        log.info("data: %d samples (%d with images), template %s", len(dataset), n_img, template.name)
        if cfg.tune == "projector" and n_img < len(dataset):
            log.warning("stage 1 trains only the projector: the %d text-only samples cost time and teach it "
                        "nothing", len(dataset) - n_img)

    # ---- what trains ----------------------------------------------------------------------------
    lora = cfg.tune == "lora"
    if lora and base_folder is None and dist.is_main:  # the LoRA folder needs its base on disk
        from bunny.model.checkpoints import save_model

        base_folder = (out / "base").resolve()
        if not (base_folder / "config.json").is_file():
            save_model(model, processor, base_folder)
    elif lora and base_folder is None:
        base_folder = (out / "base").resolve()
    configure_trainable(model, cfg)
    if cfg.base_dtype != "float32":  # frozen weights in half precision, trained ones float32
        model.to(getattr(torch, cfg.base_dtype))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if not cfg.unfreeze_vision_tower:
        model.vision_tower.eval()  # frozen: deterministic features (equal to the feature cache's)
    if cfg.distributed != "fsdp":
        model.to(device)
    if dist.is_main:
        summary = trainable_summary(model)
        log.info("trainable parameters: %s", ", ".join(f"{k} {v['trainable']:,}/{v['total']:,}"
                                                        for k, v in summary.items()))
    if cfg.packing:
        check_packing(model, device)
    autocast_dtype = _autocast_dtype(cfg, device)

    # ---- stage-1 feature cache ----------------------------------------------------------------
    if cfg.feature_cache is not None:
        from bunny.train.feature_cache import FeatureCache, fingerprint

        preprocessing = {**processor.image_processor.to_dict(), "mode": dataset.image_mode}
        fp, covers = fingerprint(model.vision_tower, preprocessing, autocast_dtype or torch.float32)
        cache = FeatureCache(cfg.feature_cache, fp, covers)
        keys = sorted({rel for s in dataset.samples for rel in s.images})
        n_new = cache.build(keys, dataset.load_pixels, model.vision_tower, batch_size=32, device=device,
                            autocast_dtype=autocast_dtype, rank=dist.rank, world_size=dist.world_size,
                            barrier=dist.barrier, progress=dist.is_main and cfg.progress_bar)
        if dist.is_main:
            log.info("feature cache %s: %d images encoded, %d reused", cache.dir, n_new, len(keys) - n_new)
        dataset.feature_cache = cache

    # ---- plan and schedule ----------------------------------------------------------------------
    accum = cfg.grad_accum(dist.world_size)
    plan = BatchPlan(dataset.lengths, dataset.has_image, cfg.per_device_train_batch_size, dist.world_size, accum,
                     seed=cfg.seed, group_by_length=cfg.group_by_length,
                     group_by_modality=cfg.group_by_modality_length, length_window=cfg.length_group_window)
    spe = plan.steps_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * spe))
    warmup = warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    if dist.is_main:
        log.info("plan: global batch %d (%d x %d processes x %d accumulation), %d steps/epoch, %d steps, "
                 "warmup %d%s", plan.global_batch_size, cfg.per_device_train_batch_size, dist.world_size, accum,
                 spe, total_steps, warmup,
                 f", {plan.dropped_per_epoch} samples/epoch beyond the last full global batch" if plan.dropped_per_epoch
                 else "")

    blank = "none"
    if dist.world_size > 1:
        sharded = cfg.distributed in ("deepspeed", "fsdp")
        tower = (sharded or cfg.unfreeze_vision_tower) and dataset.feature_cache is None
        blank = "tower" if tower else "projector"
    loss_module = LossModule(model, cfg.loss_on_supervised_only, autocast_dtype, device, blank_images=blank)
    engine = build_engine(model, loss_module, cfg, dist, total_steps, warmup, accum)

    start_step = 0
    if resume_from is not None:
        engine.load(resume_from, dist.rank)
        if not ckpt_io.load_rng(resume_from, dist.rank):
            log.warning("resume: no RNG state for rank %d in %s (world size changed?)", dist.rank, resume_from)
        start_step = int(resume_state["step"])
        if dist.is_main:
            log.info("resumed from %s at step %d", resume_from, start_step)

    collator = Collator(pad_token_id=int(processor.tokenizer.pad_token_id), pack=cfg.packing,
                        pack_length=cfg.model_max_length)
    batches = _Batches(dataset, plan, collator, cfg, dist.rank, pin=device.type == "cuda")
    metrics = MetricsWriter(out, resume_step=start_step if resume_from is not None else None,
                            report_to=cfg.report_to, run_config=to_dict(cfg)) if dist.is_main else None
    bar = _progress(cfg, dist.is_main, total_steps, start_step)

    def save(step: int) -> None:
        state = {"step": step, "epoch": step / spe, "world_size": dist.world_size, "total_steps": total_steps,
                 "global_batch_size": plan.global_batch_size, "recipe": _recipe_digest(cfg), "engine": engine.kind}
        ckpt_io.save_checkpoint(out, step, rank=dist.rank, keep=cfg.save_total_limit, state=state,
                                write_main=lambda tmp: None, write_all=lambda tmp: engine.save(tmp, dist.rank),
                                barrier=dist.barrier)

    # ---- the loop -------------------------------------------------------------------------------
    step = start_step
    window_t, window_cpu, window_samples, window_tokens = time.time(), time.process_time(), 0, 0
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    logged_steps = 0
    stopped = False
    while step < total_steps and not stopped:
        epoch, in_epoch = divmod(step, spe)
        global_batches = plan.global_batches(epoch)
        denominators = [max(1, int(dataset.targets[b].sum())) for b in global_batches]
        it = iter(batches.loader(epoch, in_epoch))
        for s in range(in_epoch, spe):
            if step >= total_steps:
                break
            denom = denominators[s]
            for a in range(accum):
                batch = next(it)
                inputs = _to_device(batch, device)
                with engine.accumulating(last=a == accum - 1):
                    loss = engine.forward(num_items=denom, **inputs)
                    engine.backward(loss)
                loss_acc += loss.detach().double()
                window_samples += batch["n_samples"]
                window_tokens += batch["n_tokens"]
            lrs = engine.lrs()  # the rates this step uses (the scheduler moves them in step())
            grad_norm = engine.step()
            step += 1
            logged_steps += 1
            if step % cfg.logging_steps == 0 or step == total_steps:
                loss_sum = dist.all_reduce_sum(loss_acc)  # sum over processes of per-micro-batch shares
                samples_all = float(dist.all_reduce_sum(window_samples))
                tokens_all = float(dist.all_reduce_sum(window_tokens))
                elapsed = max(time.time() - window_t, 1e-9)
                record = {
                    "step": step,
                    "epoch": round(step / spe, 4),
                    "loss": float(loss_sum) / logged_steps,
                    "lr": max(lrs.values()),
                    "grad_norm": float(grad_norm),
                    "samples_per_s": samples_all / elapsed,
                    "tokens_per_s": tokens_all / elapsed,
                    "step_s": elapsed / logged_steps,
                    "cpu_s": (time.process_time() - window_cpu) / logged_steps,  # this process's CPU time per step
                    **{f"lr/{k}": v for k, v in lrs.items()},
                }
                if metrics is not None:
                    metrics.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
                loss_acc.zero_()
                logged_steps = 0
                window_t, window_cpu, window_samples, window_tokens = time.time(), time.process_time(), 0, 0
            if bar is not None:
                bar.update(1)
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps:
                save(step)
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                stopped = True
                break
        del it
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    if stopped:
        log.info("stopped after step %d (stop_after_steps)", step)
        return None

    # ---- final ----------------------------------------------------------------------------------
    final = out / "final"
    gathered = engine.consolidate()
    if gathered is not None and dist.is_main:  # sharded weights: load them into a fresh copy of the model
        model, processor, _ = build_start_model(cfg, lambda: texts_of(samples), True, lambda: None)
        configure_trainable(model, cfg)
        missing, unexpected = model.load_state_dict(gathered, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    if dist.is_main:
        _write_final(cfg, model, processor, final, base_folder, out)
        plot_loss(out)
        log.info("done: %d steps in %.1f s; model in %s", total_steps, time.time() - t_start, final)
    dist.barrier()
    return final


def _write_final(cfg: TrainConfig, model: Any, processor: Any, final: Path, base_folder: Path | None,
                 out: Path) -> None:
    from safetensors.torch import save_file

    from bunny.model.checkpoints import configure_generation, save_model
    from bunny.train.stages import disable_gradient_checkpointing, llm_of

    llm = llm_of(model)
    disable_gradient_checkpointing(model)
    if hasattr(llm.config, "use_cache"):
        llm.config.use_cache = True
    model.eval()
    configure_generation(model, processor)
    if cfg.tune == "lora":
        from bunny.train.lora_io import save_lora_run

        assert base_folder is not None
        save_lora_run(model, processor, final, base_folder)
        if cfg.save_merged:
            from bunny.model.checkpoints import load_model

            merged, proc = load_model(final)  # a LoRA folder loads merged into its base
            save_model(merged, proc, out / "final_merged")
    else:
        save_model(model, processor, final)
    proj = {k: v.detach().cpu().contiguous() for k, v in model.mm_projector.state_dict().items()}
    save_file(proj, str(out / PROJECTOR_FILE), metadata={"format": "pt"})
