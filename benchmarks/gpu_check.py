"""What only a GPU shows, in one short run (< 8 minutes on one H100); ``--dry``: the same code on the CPU
with shrunk sizes, GPU-only parts reported as skipped with the reason (run it before a GPU is lent).

    bash benchmarks/gpu_check.sh            # on a CUDA machine (a CUDA torch, bitsandbytes, deepspeed)
    bash benchmarks/gpu_check.sh --dry      # or DRY=1: here, on the CPU, end to end

Checks (each one reports ok / skipped (why) / failed (the error), and the run goes on):

1. ``mfu``: a bf16 stage-2 step (bunny's LossModule + OptimizerStep, LoRA r=128 all-linear, frozen
   weights in bf16) on a Phi-2-shaped LLM (32 x 2560, vocab 51,200) behind a SigLIP-so400m-shaped tower
   (27 x 1152, 384 px, 729 image tokens), random weights from configs; FLOPs counted with torch's
   FlopCounterMode, MFU against the measured bf16 matmul peak and against the H100's 989 TFLOP/s
   (goal >= 45%).
2. ``attention``: SDPA forward+backward per backend (flash, memory-efficient, math) at the step's shape,
   and one model step with ``attn_implementation: flash_attention_2`` when the flash-attn package is there.
3. ``qlora``: ``bunny.train`` stage 2 with ``bits: 4`` (bitsandbytes NF4) on a small world, 3 steps.
4. ``zero2``: ``torchrun --nproc_per_node 1 bunny train`` with DeepSpeed ZeRO-2 over NCCL, 3 steps
   (dry: the same torchrun command with DDP over gloo).
5. ``eval``: ``benchmarks/bench_eval.py`` questions/s at batch 1 / 8 / 32 and identical answers.

The figures are appended to ``--out`` (default ``benchmarks/RESULTS_GPU.md``) as one dated section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H100_BF16_DENSE = 989e12  # H100 SXM bf16 dense tensor-core peak (NVIDIA's datasheet)

PHI2 = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=51200, max_position_embeddings=2048)
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14)
DRY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512)
DRY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)


class Check:
    """One named check's outcome: figures, or why it was skipped, or the error."""

    def __init__(self, name: str) -> None:
        self.name, self.status, self.figures, self.detail, self.seconds = name, "ok", {}, "", 0.0

    def skip(self, why: str) -> None:
        self.status, self.detail = "skipped", why


def run_check(name: str, fn: Callable[[Check, argparse.Namespace], None], args: argparse.Namespace) -> Check:
    check = Check(name)
    t = time.time()
    print(f"== {name}", flush=True)
    try:
        fn(check, args)
    except Exception as exc:  # one failing check must not hide the others' figures
        check.status, check.detail = "failed", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    check.seconds = time.time() - t
    print(f"   {check.status} in {check.seconds:.0f} s {check.detail} {json.dumps(check.figures)}", flush=True)
    return check


def _device(args: argparse.Namespace):
    import torch

    return torch.device("cpu" if args.dry else "cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _tokenizer():
    from bunny.backbones import corpus
    from bunny.backbones.tokenizer import train_tokenizer, wrap

    return wrap(train_tokenizer(corpus(200, seed=0), vocab_size=1024), model_max_length=4096)


# ---------------------------------------------------------------------------------------------- 1. MFU
def matmul_peak(device, dtype, n: int, seconds: float = 2.0) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        reps += 1
        if reps % 10 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def check_mfu(check: Check, args: argparse.Namespace) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bunny.model.tiny import tiny_model
    from bunny.train.config import LoraSection, TrainConfig
    from bunny.train.engines import LossModule
    from bunny.train.engines.step import OptimizerStep
    from bunny.train.stages import configure_trainable

    device = _device(args)
    text, vision = (DRY_TEXT, DRY_VISION) if args.dry else (PHI2, SO400M)
    batch, text_len, steps = (2, 48, 2) if args.dry else (8, 320, 6)
    torch.manual_seed(0)
    model, processor = tiny_model(_tokenizer(), vision="siglip", family="phi-2", vision_overrides=vision,
                                  text_overrides=text)
    cfg = TrainConfig(stage="finetune", tune="lora", lora=LoraSection(r=128, alpha=256, dropout=0.05), bf16=True,
                      base_dtype="bfloat16")
    configure_trainable(model, cfg)
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.vision_tower.eval()
    model.to(device)
    n_img = processor.num_image_tokens
    seq = n_img + text_len
    ids = torch.randint(10, 1000, (batch, seq), device=device)
    ids[:, 1:1 + n_img] = processor.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n_img + text_len // 2] = -100  # the answer half of the text is supervised
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    loss_module = LossModule(model, True, torch.bfloat16, device)
    optim = OptimizerStep(model, cfg, total_steps=100, warmup=0, fused=device.type == "cuda")
    n_items = int((labels[:, 1:] != -100).sum())

    def step() -> float:
        loss = loss_module(input_ids=ids, labels=labels, num_items=n_items, pixel_values=pixels)
        loss.backward()
        optim()
        return float(loss.detach())

    with FlopCounterMode(display=False) as fc:
        loss = loss_module(input_ids=ids, labels=labels, num_items=n_items, pixel_values=pixels)
        loss.backward()
    flops = fc.get_total_flops()
    model.zero_grad(set_to_none=True)
    step()  # warm-up (kernels, allocator)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        last = step()
    _sync(device)
    dt = (time.perf_counter() - t) / steps
    peak = matmul_peak(device, torch.bfloat16, 512 if args.dry else 8192)
    check.figures = {"shape": f"phi-2-shaped {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
                              f"batch {batch} x {seq} tokens ({n_img} image)" if not args.dry else f"dry: batch {batch} x {seq}",
                     "step_s": round(dt, 4), "gflop_per_step": round(flops / 1e9, 1),
                     "achieved_tflops": round(flops / dt / 1e12, 3), "matmul_peak_tflops": round(peak / 1e12, 3),
                     "mfu_vs_measured_peak": round(flops / dt / peak, 3), "loss": round(last, 4)}
    if device.type == "cuda":
        check.figures["mfu_vs_989_tflops"] = round(flops / dt / H100_BF16_DENSE, 3)
        check.figures["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)


# ---------------------------------------------------------------------------------------------- 2. attention
def check_attention(check: Check, args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = _device(args)
    b, h, s, d = (2, 4, 64, 16) if args.dry else (8, 32, 1049, 80)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    for name, backend in backends.items():
        if device.type != "cuda" and name != "math":
            check.figures[name] = "skipped: a CUDA kernel"
            continue
        try:
            with sdpa_kernel(backend):
                for _ in range(2):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                _sync(device)
                t = time.perf_counter()
                for _ in range(5):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                _sync(device)
            flops = 5 * 3.5 * 2 * 2 * b * h * s * s * d / 2  # causal: half; fwd + bwd (2.5x fwd)
            check.figures[name] = f"{(time.perf_counter() - t) / 5 * 1e3:.2f} ms ({flops / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s)"
        except RuntimeError as exc:
            check.figures[name] = f"unavailable: {str(exc).splitlines()[0][:120]}"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        check.figures["flash_attention_2 model step"] = "skipped: the flash-attn package is not installed"
        return
    if device.type != "cuda":
        check.figures["flash_attention_2 model step"] = "skipped: flash-attn needs CUDA"
        return
    from bunny.model.tiny import tiny_model

    model, processor = tiny_model(_tokenizer(), family="qwen2", dtype=torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    model.to(device).train()
    ids = torch.randint(10, 500, (2, 64), device=device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    check.figures["flash_attention_2 model step"] = f"ok, loss {float(loss):.3f}"


# ---------------------------------------------------------------------------------------------- 3/4. training runs
def _world(args: argparse.Namespace) -> Path:
    from bunny.data.synthetic import generate_world

    root = Path(args.work) / "world"
    generate_world(root, 64, 0, image_size=32, grid=2, bench_size=8, tasks=("pope",))
    return root


def _train_yaml(args: argparse.Namespace, name: str, **over: Any) -> Path:
    import yaml

    w = _world(args)
    cfg = {"stage": "finetune", "data_path": str(w / "instruct.json"), "image_folder": str(w / "images"),
           "tiny": {"vision": dict(DRY_VISION), "text": {k: v for k, v in DRY_TEXT.items() if k != "vocab_size"},
                    "vocab_size": 400},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "per_device_train_batch_size": 4, "global_batch_size": 4,
           "max_steps": 3, "save_steps": 0, "logging_steps": 1, "progress_bar": False, "report_to": ["jsonl"],
           "warmup_ratio": 0.0, "output_dir": str(Path(args.work) / name), "seed": 0, **over}
    path = Path(args.work) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def check_qlora(check: Check, args: argparse.Namespace) -> None:
    from bunny.config import load_config
    from bunny.train import TrainConfig, run

    path = _train_yaml(args, "qlora", bits=4, bf16=True)
    cfg = load_config(TrainConfig, path, [])
    cfg.check_paths()  # the config is valid either way
    if args.dry:
        check.skip("bitsandbytes 4-bit (QLoRA) needs CUDA; config validated")
        return
    import torch

    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    run(cfg)
    losses = _losses(Path(cfg.output_dir))
    check.figures = {"steps": len(losses), "losses": [round(x, 4) for x in losses], "seconds": round(time.time() - t, 1),
                     "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if not all(x == x and x > 0 for x in losses):
        raise RuntimeError(f"QLoRA losses not finite: {losses}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_zero2(check: Check, args: argparse.Namespace) -> None:
    over: dict[str, Any] = {"bf16": True} if not args.dry else {"distributed": "ddp", "cpu_threads": 1}
    if not args.dry:
        over["deepspeed"] = str(REPO / "configs" / "deepspeed" / "zero2.json")
    path = _train_yaml(args, "zero2", **over)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "bunny.cli", "train", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr[-1500:]}")
    losses = _losses(Path(args.work) / "zero2")
    check.figures = {"engine": "DDP over gloo (dry)" if args.dry else "DeepSpeed ZeRO-2 over NCCL",
                     "steps": len(losses), "losses": [round(x, 4) for x in losses], "seconds": round(time.time() - t, 1)}
    if args.dry:
        check.detail = "ZeRO-2 over NCCL needs CUDA GPUs; ran the same torchrun command with DDP over gloo"


# ---------------------------------------------------------------------------------------------- 5. eval
def check_eval(check: Check, args: argparse.Namespace) -> None:
    out = Path(args.work) / "eval.json"
    if args.dry:
        extra = ["--device", "cpu", "--questions", "2", "--batch-sizes", "1,2", "--rounds", "1", "--new-tokens", "1"]
    else:
        extra = ["--device", "cuda", "--questions", "64", "--batch-sizes", "1,8,32", "--rounds", "1"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_eval.py"), *extra, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_eval.py exited {proc.returncode}: {proc.stderr[-1500:]}")
    small = json.loads(out.read_text()).get("small", {})
    check.figures = {f"batch {r['batch']}": f"{r['qps']:.2f} questions/s" for r in small.get("rows", [])}
    check.figures.update({k: v for k, v in small.items() if k != "rows" and not isinstance(v, (dict, list))})


# ---------------------------------------------------------------------------------------------- report
def environment(args: argparse.Namespace) -> dict[str, str]:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if torch.cuda.is_available():
        env["device"] = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores)"
    return env


def write_section(path: Path, args: argparse.Namespace, env: dict, checks: list[Check]) -> None:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n## GPU check{' (DRY: CPU, shrunk sizes)' if args.dry else ''}, {when}", "",
             f"Command: `bash benchmarks/gpu_check.sh{' --dry' if args.dry else ''}`; device: {env['device']}; "
             f"torch {env['torch']}" + (f", CUDA {env['cuda']}" if "cuda" in env else ""), "",
             "| check | status | seconds | figures |", "|---|---|---:|---|"]
    for c in checks:
        figs = "; ".join(f"{k}: {v}" for k, v in c.figures.items()) if isinstance(c.figures, dict) else str(c.figures)
        detail = f" ({c.detail})" if c.detail else ""
        lines.append(f"| {c.name} | {c.status}{detail} | {c.seconds:.0f} | {figs.replace('|', '/')} |")
    with open(path, "a", encoding="utf-8") as f:
        if path.stat().st_size == 0:
            f.write("# GPU check results (benchmarks/gpu_check.sh)\n")
        f.write("\n".join(lines) + "\n")


CHECKS = {"mfu": check_mfu, "attention": check_attention, "qlora": check_qlora, "zero2": check_zero2,
          "eval": check_eval}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", default=os.environ.get("DRY") == "1",
                   help="CPU, shrunk sizes; GPU-only parts reported as skipped (also DRY=1)")
    p.add_argument("--only", default=",".join(CHECKS), help="comma list of checks")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS_GPU.md")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = p.parse_args()
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry (or DRY=1) on a CPU machine", file=sys.stderr)
        return 2
    args.work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    if args.dry:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    env = environment(args)
    print(f"gpu_check{' --dry' if args.dry else ''}: {env}", flush=True)
    checks = [run_check(name, CHECKS[name], args) for name in args.only.split(",")]
    args.out.touch()
    write_section(args.out, args, env, checks)
    print(f"figures appended to {args.out}")
    return 1 if any(c.status == "failed" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
