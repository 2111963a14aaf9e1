"""Our model vs transformers' LlavaForConditionalGeneration on the same weights: training step and
generation throughput, in one process, interleaved runs, median of repeats.

    .venv/bin/python benchmarks/bench_model.py                 # tiny + small configs, CPU
    .venv/bin/python benchmarks/bench_model.py --configs small --device cuda --dtype bfloat16

Ratio = ours / Llava throughput (>= 0.95 is the target: ours must be no slower). Both models hold
identical weights (ours exported with ``bunny.model.layouts.llava``) and get identical inputs; the logits are
checked equal before timing so the comparison is of the same computation. Where ours does less work
by design it is counted: Bunny runs the vision tower only up to its feature layer, Llava runs every
block and the pooling head and then picks ``hidden_states[-2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bunny.model.layouts.llava import LLAVA_TO_OURS_EXPORT, llava_config, to_llava_state_dict
from bunny.model.layouts.weights import rename_keys
from bunny.model.modeling import BunnyConfig, BunnyForConditionalGeneration
from bunny.model.tiny import tiny_text_config, tiny_vision_config

CONFIGS = {
    # name: (vision overrides, text overrides, vocab, batch, text tokens per row, new tokens)
    "tiny": (dict(), dict(), 1024, 4, 48, 32),
    "small": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                   image_size=224, patch_size=16),
              dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4), 8192, 4, 64, 32),
}


def build_pair(name: str, device: str, dtype: torch.dtype):
    vision, text, vocab, *_ = CONFIGS[name]
    config = BunnyConfig(vision_config=tiny_vision_config("siglip", **vision),
                         text_config=tiny_text_config("qwen2", vocab_size=vocab, **text),
                         vision_encoder="siglip", llm_family="qwen2", image_token_id=vocab - 1)
    torch.manual_seed(0)
    ours = BunnyForConditionalGeneration(config)
    from transformers import LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration(llava_config(config))
    state, _ = rename_keys(to_llava_state_dict(ours), LLAVA_TO_OURS_EXPORT)
    missing, unexpected = llava.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k not in (llava.all_tied_weights_keys or {})], missing
    return ours.to(device, dtype), llava.to(device, dtype), config


def make_inputs(config, name: str, device: str, dtype: torch.dtype):
    _, _, vocab, batch, n_text, _ = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    n_img = config.num_image_tokens
    text = torch.randint(0, vocab - 2, (batch, n_text), generator=g)
    ids = torch.cat([text[:, :4], torch.full((batch, n_img), config.image_token_id), text[:, 4:]], dim=1)
    size = config.image_size
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device, dtype),
    }


def timed(fn, device: str, clock: str) -> float:
    """Seconds ``fn`` takes: wall clock, or this process's CPU time (``cpu``: on a machine other jobs
    share, CPU time measures the work done rather than how long the scheduler kept us waiting)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = now()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return now() - t


def train_step(model, inputs):
    def run():
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def generate(model, inputs, new_tokens: int):
    def run():
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
    return run


def bench(name: str, device: str, dtype: torch.dtype, repeats: int, clock: str) -> list[tuple[str, float, float]]:
    ours, llava, config = build_pair(name, device, dtype)
    inputs = make_inputs(config, name, device, dtype)
    ours.eval()
    llava.eval()
    with torch.no_grad():
        a, b = ours(**inputs).logits.float(), llava(**inputs).logits.float()
    assert torch.allclose(a, b, atol=1e-3 if dtype == torch.float32 else 5e-2), (a - b).abs().max()
    ours.train()
    llava.train()
    batch, new = inputs["input_ids"].shape[0], CONFIGS[name][5]
    tokens = inputs["input_ids"].numel()
    rows = []
    for label, make, count in (("fwd+bwd", train_step, tokens), ("generate", None, batch * new)):
        times: dict[str, list[float]] = {"ours": [], "llava": []}
        fns = {"ours": make(ours, inputs) if make else generate(ours.eval(), inputs, new),
               "llava": make(llava, inputs) if make else generate(llava.eval(), inputs, new)}
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both alike
            for who in ("ours", "llava"):
                times[who].append(timed(fns[who], device, clock))
        ours_tps = count / statistics.median(times["ours"])
        llava_tps = count / statistics.median(times["llava"])
        rows.append((label, ours_tps, llava_tps))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU time is then a clean work measure)")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: process CPU time (default on CPU); wall: elapsed time (default on CUDA)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    torch.set_num_threads(args.threads)
    print(f"device: {args.device} ({torch.get_num_threads()} threads), dtype {args.dtype}, repeats {args.repeats}, "
          f"clock {clock}")
    print(f"{'config':<7} {'workload':<9} {'ours tok/s':>11} {'llava tok/s':>12} {'ratio':>6}")
    worst = float("inf")
    for name in args.configs.split(","):
        for label, ours_tps, llava_tps in bench(name, args.device, dtype, args.repeats, clock):
            ratio = ours_tps / llava_tps
            worst = min(worst, ratio)
            print(f"{name:<7} {label:<9} {ours_tps:>11.0f} {llava_tps:>12.0f} {ratio:>6.2f}")
    print(f"worst ratio {worst:.2f} (target >= 0.95): {'OK' if worst >= 0.95 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
