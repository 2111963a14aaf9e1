"""The training config: one dataclass, read from YAML plus ``key=value`` overrides.

Keys are flat (``learning_rate=2e-4``, ``output_dir=runs/x``) except the ``lora`` section
(``lora.r=64``), so a command line reads like the original LLaVA/Bunny scripts. Every key is
documented here; ``bunny train CONFIG --help`` does not list them, this file and docs/training.md do.

Validation happens before anything heavy is built: an unknown key names every known one, a wrong
type names the field, a missing data file or image folder names the path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bunny.config import ConfigError, load_config, to_dict
from bunny.train.metrics import check_report_to

__all__ = ["LoraSection", "TinyBackbones", "TrainConfig", "load_train_config", "ConfigError", "to_dict"]


@dataclass
class LoraSection:
    """LoRA on the language model (stage 2). ``targets: all-linear`` = every ``nn.Linear`` of the LLM
    except ``lm_head`` (the paper's choice); or a list of module leaf names (``[q_proj, v_proj]``)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise ValueError(f"lora.targets: 'all-linear' or a list of module names, got {self.targets!r}")


@dataclass
class TinyBackbones:
    """Randomly initialised tiny backbones (examples, tests, benchmarks): no download needed.

    ``vision`` and ``text`` are keyword overrides for the tiny vision/text configs (e.g.
    ``{hidden_size: 64, num_hidden_layers: 2}``); ``llm_family`` picks the text model class.
    """

    vision_encoder: str = "siglip"
    llm_family: str = "qwen2"
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    seed: int = 0
    tokenizer: str | None = None
    """A tokenizer folder, or null: train a small byte-level BPE on the training data's text (saved in
    ``output_dir/tokenizer`` and reused on resume)."""
    vocab_size: int = 1024
    """Size of the BPE trained when ``tokenizer`` is null."""


@dataclass
class TrainConfig:
    # ---- what to train -------------------------------------------------------------------------
    stage: Literal["pretrain", "finetune"] = "pretrain"
    """pretrain = stage 1 (alignment: only the projector trains); finetune = stage 2 (instruction)."""
    tune: Literal["projector", "lora", "full"] | None = None
    """What trains in the LLM: projector only (default for pretrain), lora (default for finetune), full."""
    output_dir: Path = Path("runs/train")
    """Run folder: metrics.jsonl, loss.png, checkpoints/, final/ (the model), mm_projector.safetensors."""

    # ---- the model -----------------------------------------------------------------------------
    model_name_or_path: Path | None = None
    """Start from a complete bunny model folder, or its hub name (``org/name``, see bunny.model.hub);
    overrides vision_tower/language_model."""
    vision_tower: str | None = None
    """Vision encoder checkpoint folder on disk (e.g. a download of google/siglip-so400m-patch14-384)."""
    vision_encoder: str | None = None
    """Registry name of the encoder family (siglip, clip, eva_clip); null = read from the checkpoint."""
    language_model: str | None = None
    """LLM checkpoint folder on disk, with its tokenizer (e.g. a download of microsoft/phi-2), a hub name,
    or a ``.gguf`` file (converted once to a cached folder, see bunny.model.gguf)."""
    llm_family: str | None = None
    """Registry name of the LLM family (phi-1.5, phi-2, phi-3, stablelm-2, qwen1.5, qwen2, minicpm, llama-3,
    generic); null = from the checkpoint's model_type."""
    tiny: TinyBackbones | None = None
    """Random tiny backbones instead of vision_tower/language_model (see TinyBackbones)."""
    projector_type: str = "mlp2x_gelu"
    """linear, mlp{N}x_gelu, identity, avgpool2x2_<projector> (a new projector; ignored for a loaded model)."""
    projector_init: Literal["default", "zero_out"] = "default"
    """A new projector's output layer: as the projector type initialises it (Bunny/LLaVA), or zeroed
    (``zero_out``: every image token starts as the same zero vector and grows along the captions'
    gradient; on the demo's stage 1 it left the loss plateau within about 50 steps, docs/demo.md).
    Ignored when the projector is loaded (projector_from, a model folder, a resumed run)."""
    projector_from: Path | None = None
    """Stage-1 output_dir (or its final/ folder, or an mm_projector.safetensors file): the projector to
    start from. When no backbones are named, the stage-1 model folder is the whole starting point."""
    vision_feature_layer: int = -2
    """Encoder hidden state the features come from (-2: second-to-last block, as Bunny)."""
    s2_scales: list[int] | None = None
    """S^2 multi-scale (v1.1 models): e.g. [384, 768, 1152]."""
    image_aspect_ratio: Literal["pad", "square"] | None = None
    """Image preprocessing: square (plain resize; default for pretrain) or pad (default for finetune)."""
    template: str | None = None
    """Chat template: plain (default for pretrain) or the LLM family's (bunny, phi3, llama3, ...)."""
    attn_implementation: str | None = None
    """Unset (default): the LLM's SDPA as ``bunny_sdpa``, which on a CPU runs short sequences (keys <= 176)
    through the math kernel's float32 maths per key/value head group, 1.5-2x faster to train there
    (bunny/model/attention.py); or exactly one of sdpa, eager, flash_attention_2, bunny_sdpa."""
    fused_elementwise: bool | Literal["auto"] = "auto"
    """Compile only the LLM's RMSNorms, SiLU-gated MLP products, attention blocks' rotary embeddings (on
    ``bunny_sdpa``, CPU) and the loss's cross-entropy into fused kernels (matmuls stay eager), and fold
    each peft LoRA Linear into one ``addmm`` (bunny/model/fused.py). auto = on for a CPU run (one process or DDP) of
    an LLM at least 512 wide, where the one-off compile (5-25 s) pays back within a few steps; true also
    on a GPU (inductor + triton), DeepSpeed or FSDP, none of them measured here."""
    trust_remote_code: bool = False
    """Allow an LLM folder's own Python code (generic family only); off unless you trust the folder."""

    # ---- data ----------------------------------------------------------------------------------
    data_path: list[Path] | Path | None = None
    """LLaVA JSON list or JSONL file(s)."""
    image_folder: Path | None = None
    """Folder the samples' image paths are relative to."""
    model_max_length: int = 2048
    """Longest sample in tokens, image tokens included (longer samples are validation errors)."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """error: stop before training and list every problem; skip: train without the bad samples (each logged)."""
    image_check: Literal["decode", "open", "exists", "none"] = "decode"
    """How validation checks images before training: decode fully (catches truncated files), open the
    header only (fast on millions of images), check existence, or nothing."""
    allow_images_outside_folder: bool = False
    """Accept image paths that are absolute or climb out of image_folder with ``..`` (refused by default:
    such a path reads files the data set does not own)."""
    group_by_modality_length: bool = True
    """Image and text-only samples in separate global batches (as Bunny/LLaVA's group_by_modality_length)."""
    group_by_length: bool = True
    """Samples of similar length share micro-batches (sorted inside windows of length_group_window global batches)."""
    length_group_window: int = 16
    """Global batches per length-sorting window (larger: less padding, less randomness in batch make-up)."""
    packing: bool = False
    """Padding-free packing of each micro-batch into rows of at most model_max_length tokens
    (attention kept inside each sample)."""
    dataloader_num_workers: int = 0
    """Processes decoding images and tokenizing in parallel with training."""
    max_samples: int | None = None
    """Use only the first N samples (quick runs)."""

    # ---- optimisation --------------------------------------------------------------------------
    learning_rate: float = 2e-4
    """Peak lr of the LLM's trained weights (LoRA or full), and of the projector in stage 1."""
    mm_projector_lr: float | None = None
    """Projector lr when the LLM also trains (stage 2); null = learning_rate."""
    vision_tower_lr: float | None = None
    """lr of the vision tower when unfreeze_vision_tower; null = learning_rate."""
    unfreeze_vision_tower: bool = False
    weight_decay: float = 0.0
    """AdamW weight decay of matrices (biases and norms are exempt)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps to run; -1 = num_train_epochs over the data."""
    per_device_train_batch_size: int = 16
    """Samples per micro-batch on each process."""
    gradient_accumulation_steps: int | None = None
    global_batch_size: int | None = None
    """Samples per optimizer step over all processes; sets gradient_accumulation_steps from the world
    size (so 1 process and 8 processes train the same recipe). Give one of the two."""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    """Linear warmup over ceil(ratio x total steps) steps."""
    warmup_steps: int | None = None
    """Warmup steps (overrides warmup_ratio)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast (weights stay fp32 for trainable parts). auto = on with CUDA, off on CPU."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the LLM's (and a trained vision tower's) blocks."""
    trim_memory: bool = False
    """After each optimizer step, give freed memory back to the OS (glibc malloc_trim; CPU runs). Keeps
    the resident size between steps at the live tensors instead of the largest step so far; costs ~0.1 s
    a step with GBs freed (and the page faults of taking them back), so it is off by default."""
    mmap_threshold_mb: int | None = None
    """CPU runs: allocations of at least this many MB get their own mmap, returned when freed (glibc
    mallopt), so RSS stays at the live tensors instead of a fragmented heap (e.g. 1; costs page faults)."""
    base_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the frozen weights (half the memory in bfloat16); trained weights always stay float32
    (master weights), so this needs bf16 autocast."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA settings (tune: lora): lora.r, lora.alpha, lora.dropout, lora.targets, lora.bias."""
    bits: Literal[4, 8, 16] = 16
    """QLoRA: 4 or 8-bit base LLM through bitsandbytes (CUDA only)."""
    feature_cache: Path | None = None
    """Stage 1 only: folder for the frozen encoder's outputs, computed once and reused across
    epochs and runs (keyed by the encoder's weights and the preprocessing)."""
    loss_on_supervised_only: bool = True
    """Apply lm_head only at positions that carry a label (same loss, far less memory/compute)."""
    loss_chunk_size: int | None = None
    """With loss_on_supervised_only: apply lm_head and the loss over this many supervised positions at
    a time, recomputed in backward (a large vocabulary's logits never exist whole; e.g. 512). null = all at once."""
    seed: int = 42
    """Seeds the data order, dropout and any new weights (projector, LoRA)."""

    # ---- scale-out -----------------------------------------------------------------------------
    distributed: Literal["auto", "none", "ddp", "deepspeed", "fsdp"] = "auto"
    """auto = DDP when launched by torchrun with more than one process, else none."""
    deepspeed: Path | None = None
    """A DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json); implies distributed=deepspeed."""
    device: str | None = None
    """cuda / cpu; null = cuda when available."""
    cpu_threads: int | None = None
    """torch intra-op threads per process (null = torch's default). Tiny models on a busy CPU run
    faster with 1: their ops are too small to split."""

    # ---- logging and checkpoints ---------------------------------------------------------------
    logging_steps: int = 1
    """Optimizer steps per metrics.jsonl line (loss and rates averaged over them)."""
    save_steps: int = 500
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    save_total_limit: int = 2
    """Checkpoints kept (the newest)."""
    resume: bool | Literal["auto"] | Path = False
    """true/auto = resume from the newest checkpoint in output_dir (auto: if one exists); or a path."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """jsonl is always written; tensorboard when the package is installed; wandb (Weights & Biases, the
    run config and the JSONL's metrics; WANDB_MODE=offline writes output_dir/wandb); none."""
    progress_bar: bool = True
    save_merged: bool = False
    """LoRA runs: also write final_merged/ (the LoRA merged into the base)."""
    stop_after_steps: int | None = None
    """Exit (as if killed) after this many steps: for tests of resume."""

    def __post_init__(self) -> None:
        if self.tune is None:
            self.tune = "projector" if self.stage == "pretrain" else "lora"
        if self.template is None and self.stage == "pretrain":
            self.template = "plain"
        if self.image_aspect_ratio is None:
            self.image_aspect_ratio = "square" if self.stage == "pretrain" else "pad"
        if self.deepspeed is not None and self.distributed == "auto":
            self.distributed = "deepspeed"
        if self.distributed == "deepspeed" and self.deepspeed is None:
            raise ValueError("distributed: deepspeed needs deepspeed: <path to a DeepSpeed JSON config>")
        if self.per_device_train_batch_size <= 0:
            raise ValueError("per_device_train_batch_size must be positive")
        if self.gradient_accumulation_steps is not None and self.global_batch_size is not None:
            raise ValueError("give gradient_accumulation_steps or global_batch_size, not both")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps <= 0:
            raise ValueError("gradient_accumulation_steps must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if self.bits != 16 and self.tune != "lora":
            raise ValueError("bits 4/8 (QLoRA) needs tune: lora")
        if self.feature_cache is not None and (self.tune != "projector" or self.unfreeze_vision_tower):
            raise ValueError("feature_cache needs a frozen vision tower (stage 1, tune: projector)")
        if self.base_dtype != "float32" and self.bf16 is False:
            raise ValueError(f"base_dtype {self.base_dtype} needs bf16 autocast (bf16: true or auto)")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size must be positive (or null), got {self.loss_chunk_size}")
        if self.save_total_limit < 1:
            raise ValueError("save_total_limit must be at least 1")
        if isinstance(self.data_path, Path):
            self.data_path = [self.data_path]
        check_report_to(self.report_to)

    # -------------------------------------------------------------------------------------------
    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_step = self.per_device_train_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size {self.per_device_train_batch_size} x {world_size} process(es)"
            )
        return self.global_batch_size // per_step

    def check_paths(self) -> None:
        """Fail early, naming the path, when an input file or folder is missing."""
        from bunny.model.gguf import is_gguf
        from bunny.model.hub import is_hub_name

        problems = []
        for p in self.data_path or []:
            if not Path(p).is_file():
                problems.append(f"data_path: file not found: {p}")
        if not self.data_path:
            problems.append("data_path: required (a LLaVA JSON/JSONL file)")
        if self.image_folder is not None and not Path(self.image_folder).is_dir():
            problems.append(f"image_folder: folder not found: {self.image_folder}")
        if self.model_name_or_path is not None:
            name = str(self.model_name_or_path)
            if is_gguf(name):
                problems.append(f"model_name_or_path: {name} is a GGUF LLM file, not a Bunny model folder; give it as "
                                "language_model (with vision_tower) to assemble a model on it")
            elif not Path(name).expanduser().exists() and not is_hub_name(name):
                problems.append(f"model_name_or_path: not found: {name}")
        if self.projector_from is not None and not Path(self.projector_from).exists():
            problems.append(f"projector_from: not found: {self.projector_from}")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            problems.append(f"deepspeed: file not found: {self.deepspeed}")
        for key in ("vision_tower", "language_model"):
            value = getattr(self, key)
            if value and is_gguf(value):  # a local file, whatever its shape (bunny.model.gguf)
                if not Path(value).expanduser().is_file():
                    problems.append(f"{key}: GGUF file not found: {value}")
                continue
            # A value that looks like a local path must exist; otherwise it is a hub id.
            if value and (value.startswith((".", "/", "~")) or Path(value).exists()):
                if not Path(value).expanduser().exists():
                    problems.append(f"{key}: folder not found: {value}")
        if (
            self.model_name_or_path is None
            and self.tiny is None
            and self.projector_from is None
            and not (self.vision_tower and self.language_model)
        ):
            problems.append(
                "the model: give model_name_or_path, or vision_tower + language_model, or tiny: {...}, "
                "or (stage 2) projector_from: <a stage-1 output_dir>"
            )
        if problems:
            raise ConfigError("; ".join(problems))


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training config (YAML + ``key=value`` overrides) and check its paths."""
    cfg = load_config(TrainConfig, path, overrides)
    cfg.check_paths()
    return cfg


def known_keys() -> list[str]:
    return sorted(f.name for f in dataclasses.fields(TrainConfig))
