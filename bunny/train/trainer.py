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
from bunny.data.samples import DataValidationError, SampleIssue
from bunny.data.templates import get_template
from bunny.train import checkpointing as ckpt_io
from bunny.train.builder import PROJECTOR_FILE, build_start_model
from bunny.train.config import ConfigError, TrainConfig
from bunny.train.data import build_dataset, data_fingerprint, fingerprint_changes, read_raw, texts_of
from bunny.train.distributed import DistInfo, setup, teardown
from bunny.train.engines import LossModule, build_engine
from bunny.train.memory import fix_mmap_threshold, release_free_memory
from bunny.train.metrics import plot_loss
from bunny.train.schedule import resync_lr, warmup_steps_for
from bunny.train.stages import check_qlora_available, configure_trainable, trainable_summary
from bunny.train.window import StepWindow

log = logging.getLogger("bunny.train")

#: config keys that may change between a run and its resumption (they do not change the maths)
RUNTIME_KEYS = {
    "output_dir", "resume", "logging_steps", "save_steps", "save_total_limit", "report_to", "progress_bar",
    "stop_after_steps", "dataloader_num_workers", "device", "save_merged", "image_check", "feature_cache",
    "cpu_threads", "allow_images_outside_folder", "trim_memory", "mmap_threshold_mb",
}


#: config keys that may change on resume to extend (or shorten) a run; the lr schedule is then the
#: one planned for the new total (docs/training.md, "Extending a run")
EXTENDABLE_KEYS = {"max_steps", "num_train_epochs"}


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


def _handle_bad_images(micro: list[dict[str, Any]], step: int, cfg: TrainConfig, dist: DistInfo,
                       save: Any, n_samples: int) -> None:
    """Samples whose image failed to load in this step (see ``SupervisedDataset._stand_in``).

    ``skip``: log each (file, sample id, step); they train as stand-ins with no targets.
    ``error``: save a checkpoint of the state before this step (nothing is lost, and ``--resume``
    after fixing the data continues exactly), then stop with the same problem report as validation.
    """
    bad = [issue for batch in micro for issue in batch.get("bad", ())]
    if cfg.on_bad_sample == "skip":
        for issue in bad:
            log.warning("step %d: %s; trained as a blank image without targets (on_bad_sample: skip)", step + 1, issue)
        return
    n_bad = int(dist.all_reduce_sum(len(bad))) if dist.world_size > 1 else len(bad)
    if n_bad == 0:
        return
    save(step)
    if not bad:  # another process found it and reports it
        bad = [SampleIssue("(another process)", step + 1, "image", "a sample of this step failed to load")]
    raise DataValidationError(bad, n_samples)


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
    out = _prepare(cfg, dist)
    resume_from, resume_state = _resume_point(cfg, out)
    samples, read_issues = read_raw(cfg)
    model, processor, base_folder = build_start_model(cfg, lambda: texts_of(samples), dist.is_main, dist.barrier)
    dataset, data_fp = _dataset(cfg, samples, read_issues, model, processor, dist, resume_from, resume_state)
    base_folder = _lora_base(cfg, model, processor, base_folder, out, dist)
    autocast_dtype = _place_model(cfg, model, dist)
    _attach_feature_cache(cfg, model, processor, dataset, dist, autocast_dtype)
    plan, total_steps, warmup, accum = _plan(cfg, dataset, dist)
    engine = _engine(cfg, model, dataset, dist, autocast_dtype, total_steps, warmup, accum)
    start_step = _resume(engine, resume_from, resume_state, total_steps, dist)

    spe = plan.steps_per_epoch
    collator = Collator(pad_token_id=int(processor.tokenizer.pad_token_id), pack=cfg.packing,
                        pack_length=cfg.model_max_length)
    batches = _Batches(dataset, plan, collator, cfg, dist.rank, pin=dist.device.type == "cuda")
    window = StepWindow(cfg, dist, out, spe, total_steps, start_step, resumed=resume_from is not None)

    def save(step: int) -> None:
        state = {"step": step, "epoch": step / spe, "world_size": dist.world_size, "total_steps": total_steps,
                 "global_batch_size": plan.global_batch_size, "recipe": _recipe_digest(cfg), "engine": engine.kind,
                 "data": data_fp}
        ckpt_io.save_checkpoint(out, step, rank=dist.rank, keep=cfg.save_total_limit, state=state,
                                write_main=lambda tmp: None, write_all=lambda tmp: engine.save(tmp, dist.rank),
                                barrier=dist.barrier)

    # ---- the loop: one optimizer step per global batch of the plan ------------------------------
    trim = cfg.trim_memory and dist.device.type == "cpu"
    step = start_step
    while step < total_steps:
        epoch, in_epoch = divmod(step, spe)
        denominators = [max(1, int(dataset.targets[b].sum())) for b in plan.global_batches(epoch)]
        it = iter(batches.loader(epoch, in_epoch))
        for s in range(in_epoch, min(spe, in_epoch + total_steps - step)):
            micro = [next(it) for _ in range(accum)]  # the whole step first: a bad image stops it before it runs
            _handle_bad_images(micro, step, cfg, dist, save, len(dataset))
            for a, batch in enumerate(micro):
                with engine.accumulating(last=a == accum - 1):
                    loss = engine.forward(num_items=denominators[s], **_to_device(batch, dist.device))
                    engine.backward(loss)
                window.add(loss, batch)
            lrs = engine.lrs()  # the rates this step uses (the scheduler moves them in step())
            grad_norm = engine.step()
            if trim:
                release_free_memory()
            step += 1
            window.step_done(step, lrs, grad_norm)
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps:
                save(step)
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                window.close()
                log.info("stopped after step %d (stop_after_steps)", step)
                return None
        del it
    window.close()
    return _finish(cfg, engine, model, processor, samples, base_folder, out, dist, total_steps, t_start)


# ---- the phases, in the order _run calls them ---------------------------------------------------------
def _prepare(cfg: TrainConfig, dist: DistInfo) -> Path:
    """Logging, the output folder (leftovers of a killed save removed), threads, QLoRA check, seeds."""
    _setup_logging(dist.is_main)
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale_temporaries(out)
    dist.barrier()
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    if cfg.mmap_threshold_mb is not None and dist.device.type == "cpu" and not fix_mmap_threshold(cfg.mmap_threshold_mb):
        log.warning("mmap_threshold_mb: this C library has no glibc mallopt; ignored")
    check_qlora_available(cfg, dist.device)
    _seed_all(cfg.seed)
    return out


def _resume_point(cfg: TrainConfig, out: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from (the newest intact one) and its state; refuses a changed recipe."""
    resume_from = ckpt_io.resolve_resume(out, cfg.resume)
    resume_state = ckpt_io.read_state(resume_from) if resume_from is not None else None
    if resume_state is not None:
        diff = sorted(k for k, v in _recipe_digest(cfg).items()
                      if k not in EXTENDABLE_KEYS and resume_state.get("recipe", {}).get(k) != v)
        if diff:
            raise ConfigError(f"resume from {resume_from}: the config differs from the run's in {diff}; "
                              "resume with the same recipe (only runtime keys such as save_steps may change)")
    return resume_from, resume_state


def _dataset(cfg: TrainConfig, samples: list, read_issues: list, model: Any, processor: Any, dist: DistInfo,
             resume_from: Path | None, resume_state: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """Validate the data with the model's template and tokenizer; on resume, refuse changed data."""
    template = get_template(cfg.template or model.config.chat_template)
    dataset = build_dataset(cfg, samples, read_issues, processor=processor, template=template, dist=dist)
    data_fp = data_fingerprint(cfg, samples, read_issues, len(dataset))
    if resume_state is not None and "data" in resume_state:
        changes = fingerprint_changes(resume_state["data"], data_fp)
        if changes:
            raise ConfigError(f"resume from {resume_from}: the training data changed since the checkpoint "
                              f"({'; '.join(changes)}); resume on the same data, or start a new run")
    if dist.is_main:
        n_img = int(dataset.has_image.sum())
        log.info("data: %d samples (%d with images), template %s", len(dataset), n_img, template.name)
        if cfg.tune == "projector" and n_img < len(dataset):
            log.warning("stage 1 trains only the projector: the %d text-only samples cost time and teach it "
                        "nothing", len(dataset) - n_img)
    return dataset, data_fp


def _lora_base(cfg: TrainConfig, model: Any, processor: Any, base_folder: Path | None, out: Path,
               dist: DistInfo) -> Path | None:
    """A LoRA run's final folder points at its base model on disk: save the start model once if it
    came from no folder (a tiny or assembled model)."""
    if cfg.tune != "lora" or base_folder is not None:
        return base_folder
    base_folder = (out / "base").resolve()
    if dist.is_main and not (base_folder / "config.json").is_file():
        from bunny.model.layouts.ours import save_model

        save_model(model, processor, base_folder)
    return base_folder


def _place_model(cfg: TrainConfig, model: Any, dist: DistInfo) -> torch.dtype | None:
    """What trains, in which dtype, on which device; returns the autocast dtype."""
    device = dist.device
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
    autocast_dtype = _autocast_dtype(cfg, device)
    if _wants_fusion(cfg, model, device):
        from bunny.model.fused import fuse_elementwise, fuse_loss

        fuse_elementwise(model.language_model, autocast_dtype)
        fuse_loss(model, device, autocast_dtype)
    if dist.is_main:
        summary = trainable_summary(model)
        log.info("trainable parameters: %s", ", ".join(f"{k} {v['trainable']:,}/{v['total']:,}"
                                                        for k, v in summary.items()))
    if cfg.packing:
        check_packing(model, device)
    return autocast_dtype


FUSION_MIN_WIDTH = 512
"""``fused_elementwise: auto`` fuses LLMs at least this wide: below it (the demo's 128-wide LM, test
models) the element-wise passes are cheap and the one-off compile would cost more than it saves."""


def _wants_fusion(cfg: TrainConfig, model: Any, device: torch.device) -> bool:
    """auto: a CPU run, one process or DDP (where it was measured; ZeRO-3 and FSDP swap parameters in and
    out around each forward, which a compiled region was not tested against), of a wide enough LLM."""
    if cfg.fused_elementwise != "auto":
        return bool(cfg.fused_elementwise)
    width = getattr(model.config.text_config, "hidden_size", 0) or 0
    return (device.type == "cpu" and width >= FUSION_MIN_WIDTH
            and cfg.distributed not in ("deepspeed", "fsdp"))


def _attach_feature_cache(cfg: TrainConfig, model: Any, processor: Any, dataset: Any, dist: DistInfo,
                          autocast_dtype: torch.dtype | None) -> None:
    """Stage 1 with ``feature_cache``: encode every image once (each process its share), then the
    dataset serves cached features instead of pixels. Every image is read here, before step 1, so a
    bad one stops the run with the problem report (nothing trained yet, nothing to save)."""
    if cfg.feature_cache is None:
        return
    from bunny.data.images import ImageError
    from bunny.train.feature_cache import FeatureCache, fingerprint

    preprocessing = {**processor.image_processor.to_dict(), "mode": dataset.image_mode}
    fp, covers = fingerprint(model.vision_tower, preprocessing, autocast_dtype or torch.float32)
    cache = FeatureCache(cfg.feature_cache, fp, covers)
    keys = sorted({rel for s in dataset.samples for rel in s.images})
    try:
        n_new = cache.build(keys, dataset.load_pixels, model.vision_tower, batch_size=32, device=dist.device,
                            autocast_dtype=autocast_dtype, rank=dist.rank, world_size=dist.world_size,
                            barrier=dist.barrier, progress=dist.is_main and cfg.progress_bar)
    except ImageError as exc:
        bad = [SampleIssue(s.source, s.index, "image", f"failed to load for the feature cache: {exc}", s.id, s.jsonl)
               for s in dataset.samples if any(str(dataset.image_path(r)) in str(exc) for r in s.images)]
        raise DataValidationError(bad or [SampleIssue("(feature cache)", 0, "image", str(exc))], len(dataset)) from None
    if dist.is_main:
        log.info("feature cache %s: %d images encoded, %d reused", cache.dir, n_new, len(keys) - n_new)
    dataset.feature_cache = cache


def _plan(cfg: TrainConfig, dataset: Any, dist: DistInfo) -> tuple[BatchPlan, int, int, int]:
    """The batch plan (which samples form each step), total steps and warmup."""
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
    return plan, total_steps, warmup, accum


def _engine(cfg: TrainConfig, model: Any, dataset: Any, dist: DistInfo, autocast_dtype: torch.dtype | None,
            total_steps: int, warmup: int, accum: int) -> Any:
    """The loss module (with the blank image row several processes need) inside its engine."""
    blank = "none"
    if dist.world_size > 1:
        sharded = cfg.distributed in ("deepspeed", "fsdp")
        tower = (sharded or cfg.unfreeze_vision_tower) and dataset.feature_cache is None
        blank = "tower" if tower else "projector"
    loss_module = LossModule(model, cfg.loss_on_supervised_only, autocast_dtype, dist.device, blank_images=blank,
                             loss_chunk_size=cfg.loss_chunk_size)
    return build_engine(model, loss_module, cfg, dist, total_steps, warmup, accum)


def _resume(engine: Any, resume_from: Path | None, resume_state: dict[str, Any] | None, total_steps: int,
            dist: DistInfo) -> int:
    """Load weights, optimizer, schedule and RNG from the checkpoint; the step to start from."""
    if resume_from is None or resume_state is None:
        return 0
    engine.load(resume_from, dist.rank)
    if not ckpt_io.load_rng(resume_from, dist.rank):
        log.warning("resume: no RNG state for rank %d in %s (world size changed?)", dist.rank, resume_from)
    start_step = int(resume_state["step"])
    if start_step > total_steps:
        raise ConfigError(f"resume from {resume_from}: the run is planned for {total_steps} steps, fewer than the "
                          f"{start_step} already taken; raise max_steps / num_train_epochs")
    if resume_state.get("total_steps", total_steps) != total_steps and dist.is_main:
        log.info("resume: total steps %s -> %d; the lr schedule is now the one planned for %d steps",
                 resume_state.get("total_steps"), total_steps, total_steps)
    resync_lr(engine.scheduler)
    if dist.is_main:
        log.info("resumed from %s at step %d", resume_from, start_step)
    return start_step


def _finish(cfg: TrainConfig, engine: Any, model: Any, processor: Any, samples: list, base_folder: Path | None,
            out: Path, dist: DistInfo, total_steps: int, t_start: float) -> Path:
    """``final/`` (sharded weights gathered into a fresh model first), the projector file, loss.png."""
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

    from bunny.model.generation import configure_generation
    from bunny.model.layouts.ours import save_model
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
            from bunny.model.loading import load_model

            merged, proc = load_model(final)  # a LoRA folder loads merged into its base
            save_model(merged, proc, out / "final_merged")
    else:
        save_model(model, processor, final)
    proj = {k: v.detach().cpu().contiguous() for k, v in model.mm_projector.state_dict().items()}
    save_file(proj, str(out / PROJECTOR_FILE), metadata={"format": "pt"})
