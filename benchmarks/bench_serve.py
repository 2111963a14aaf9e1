"""Load test of `bunny serve` on loopback: dynamic batching vs none, and memory over 1,000 requests.

    .venv/bin/python benchmarks/bench_serve.py                      # the full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_serve.py --requests 64 --memory-requests 200   # quick look

One run builds a small random Bunny model folder (SigLIP-style tower + Qwen2-style LM, trained BPE
tokenizer), then starts `bunny serve` twice on 127.0.0.1: with `--max-batch 1` (no batching, the
baseline) and with dynamic batching (`--max-batch`, `--max-wait-ms`). Each time N closed-loop clients
(64 by default) send chat completions with an image and count failures, latency (p50/p99) and
completion tokens/s. The ratio batched / unbatched tokens/s is the figure (target >= 3x on a
2-core CPU). Then the batching server answers `--memory-requests` more requests in 10 rounds, and
its resident memory (VmRSS) is read while idle after each round: it must stay flat. Everything is
bounded: requests per phase, and a wall-clock limit per phase (`--phase-timeout`), after which the
phase is reported as incomplete. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def build_model(out: Path) -> Path:
    """A small random model (enough compute per token that batching matters, like a real LM)."""
    from bunny.backbones import corpus
    from bunny.backbones.tokenizer import train_tokenizer, wrap
    from bunny.model.layouts.ours import save_model
    from bunny.model.tiny import tiny_model

    tok = wrap(train_tokenizer(corpus(400, seed=0), vocab_size=4096), model_max_length=2048)
    model, processor = tiny_model(tok, vision="siglip", family="qwen2",
                                  vision_overrides=dict(hidden_size=128, intermediate_size=256, image_size=56,
                                                        patch_size=14),
                                  text_overrides=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                                      num_attention_heads=6, num_key_value_heads=2,
                                                      max_position_embeddings=2048))
    return save_model(model, processor, out)


def image_uri(seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def slope_per_1000(samples: list[tuple[int, float]]) -> float:
    """Least-squares trend of RSS (MB) per 1,000 requests: a leak shows as a steady positive slope,
    while the batch working set only makes samples swing around a level."""
    if len(samples) < 2:
        return float("nan")
    xs, ys = [n for n, _ in samples], [mb for _, mb in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


class Server:
    def __init__(self, model: Path, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "bunny.cli", "serve", "--model", str(model), "--host", HOST,
               "--port", str(self.port), "--log-level", "warning", "--max-queue", "512", *extra]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(base: str, model_id: str, clients: int, total: int, max_tokens: int, timeout: float) -> dict:
    """``clients`` closed-loop clients share ``total`` requests; stops early at ``timeout`` seconds."""
    uri = image_uri()
    body = {"model": model_id, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": "What is in this picture?"}]}]}
    latencies: list[float] = []
    failures: list[str] = []
    tokens = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + timeout

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, issued
        while issued < total and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            try:
                resp = await http.post(base + "/v1/chat/completions", json=body)
                if resp.status_code != 200:
                    failures.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    continue
                tokens += resp.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=max(timeout, 60), limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")

    return {"requests": len(lat), "failures": len(failures), "failure_examples": failures[:3],
            "complete": len(lat) + len(failures) >= total, "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "requests_per_s": len(lat) / wall,
            "p50_s": pct(0.50), "p99_s": pct(0.99)}


def phase(model: Path, extra: list[str], args, log: Path, memory: bool = False) -> dict:
    server = Server(model, extra, log)
    try:
        model_id = httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(load(server.base, model_id, min(args.clients, 16), 16, args.max_tokens, args.phase_timeout))
        out = asyncio.run(load(server.base, model_id, args.clients, args.requests, args.max_tokens,
                               args.phase_timeout))
        out["server_stats"] = httpx.get(server.base + "/health", timeout=10).json()
        if memory:
            # RSS is sampled with the server idle, after each of 10 rounds of requests: in-flight
            # samples swing by tens of MB with the batch working set (activations, KV caches, freed
            # and re-mapped by malloc), which hides the trend a leak would show.
            rounds = 10
            per_round = max(1, args.memory_requests // rounds)
            samples: list[tuple[int, float]] = [(0, rss_mb(server.proc.pid))]
            done, failures, tokens, wall, lat = 0, 0, 0, 0.0, []
            for _ in range(rounds):
                r = asyncio.run(load(server.base, model_id, args.clients, per_round, args.memory_tokens,
                                     args.phase_timeout))
                done += r["requests"]
                failures += r["failures"]
                tokens += r["completion_tokens"]
                wall += r["wall_s"]
                lat.append(r["p50_s"])
                time.sleep(0.5)
                samples.append((done, rss_mb(server.proc.pid)))
            out["memory"] = {
                "requests": done, "failures": failures, "complete": done + failures >= per_round * rounds,
                "tokens_per_s": tokens / wall if wall else float("nan"),
                "rss_idle_samples_mb": [(n, round(mb, 1)) for n, mb in samples],
                "rss_growth_mb": round(samples[-1][1] - samples[1][1], 1),  # after the first round
                "rss_slope_mb_per_1000": round(slope_per_1000(samples[1:]), 1),
            }
        return out
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=192, help="requests per load phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=20)
    ap.add_argument("--memory-requests", type=int, default=1000)
    ap.add_argument("--memory-tokens", type=int, default=8)
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the server (the load clients need the other core)")
    ap.add_argument("--memory-tolerance-mb", type=float, default=16.0,
                    help="flat = idle RSS growth and the per-1,000-request trend both within this")
    ap.add_argument("--phase-timeout", type=float, default=240, help="seconds per load phase")
    ap.add_argument("--model", default=None, help="model folder (default: build a small random one)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp_path = Path(tmp)
        model = Path(args.model) if args.model else build_model(tmp_path / "bench-model")
        print(f"model: {model}", flush=True)
        threads = ["--threads", str(args.server_threads)]
        base = phase(model, ["--max-batch", "1", *threads], args, tmp_path / "unbatched.log")
        print(f"no batching:      {base['tokens_per_s']:.1f} tok/s", flush=True)
        dyn = phase(model, ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *threads], args,
                    tmp_path / "batched.log", memory=True)
    ratio = dyn["tokens_per_s"] / base["tokens_per_s"]
    mem = dyn["memory"]
    rows = [("no batching (--max-batch 1)", base),
            (f"dynamic batching (--max-batch {args.max_batch}, --max-wait-ms {args.max_wait_ms:g})", dyn)]
    print(f"\n{args.clients} concurrent clients, {args.max_tokens} new tokens per request, loopback, server "
          f"--threads {args.server_threads}, device: {os.cpu_count()}-CPU machine\n")
    print("| server | requests | failures | p50 latency | p99 latency | tokens/s | rows per batch |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        stats = r["server_stats"]
        per_batch = stats["rows_run"] / max(stats["batches_run"], 1)
        print(f"| {name} | {r['requests']} | {r['failures']} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | "
              f"{r['tokens_per_s']:.1f} | {per_batch:.1f} |")
    print(f"\ntokens/s ratio, batching / none: {ratio:.2f}x (target >= 3x)")
    print(f"memory over {mem['requests']} requests in 10 rounds ({mem['failures']} failed, {args.memory_tokens} "
          f"tokens each): idle RSS after each round (requests, MB) {mem['rss_idle_samples_mb']}; growth after the "
          f"first round {mem['rss_growth_mb']} MB, trend {mem['rss_slope_mb_per_1000']} MB per 1,000 requests")
    if args.json:
        Path(args.json).write_text(json.dumps({"unbatched": base, "batched": dyn, "ratio": ratio}, indent=2))
    failed = base["failures"] + dyn["failures"] + mem["failures"]
    complete = base["complete"] and dyn["complete"] and mem["complete"]
    flat = mem["rss_growth_mb"] <= args.memory_tolerance_mb and mem["rss_slope_mb_per_1000"] <= args.memory_tolerance_mb
    ok = failed == 0 and complete and ratio >= 3 and flat
    print("PASS" if ok else f"FAIL (failures={failed}, complete={complete}, ratio={ratio:.2f}, memory flat={flat})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
