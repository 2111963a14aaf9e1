"""Issue 12.1 at full size: `bunny serve` against ~20 MB prompts (under the default `--max-body-mb 20`).

    .venv/bin/python benchmarks/bench_serve_limits.py [--requests 4] [--mb 19]

Builds the same small model as bench_serve.py (2,048-token context), starts `bunny serve` with the
default body limit, then sends `--requests` bodies of `--mb` MB of prompt text, each far over the
context. For each it prints the refusal time and the server's resident memory (VmRSS) after it.
Before the character bound, each such request was tokenized in full (22-26 s of CPU) and the
server's RSS climbed by gigabytes per request; now each is refused from its length and memory stays
flat. A same-size body refused by a cheap field check is timed beside it (reading + JSON parsing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import HOST, build_model, free_port, rss_mb  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--mb", type=float, default=19.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        port = free_port()
        log = Path(tmp) / "serve.log"
        proc = subprocess.Popen([sys.executable, "-m", "bunny.cli", "serve", "--model", str(model), "--host", HOST,
                                 "--port", str(port), "--log-level", "warning"], stdout=log.open("w"),
                                stderr=subprocess.STDOUT)
        base = f"http://{HOST}:{port}"
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    print(log.read_text()[-2000:])
                    return 1
                time.sleep(0.3)
            text = "the cat sat on the mat " * int(args.mb * 1024 * 1024 / 23)
            body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
            cheap = json.dumps({"messages": [{"role": "user", "content": text}], "temperature": 9}).encode()
            print(f"body {len(body) / 2**20:.1f} MB; server RSS at start {rss_mb(proc.pid):.0f} MB")
            for i in range(args.requests):
                times = []
                for payload in (cheap, body):
                    t0 = time.perf_counter()
                    resp = httpx.post(base + "/v1/chat/completions", content=payload,
                                      headers={"content-type": "application/json"}, timeout=600)
                    times.append(time.perf_counter() - t0)
                err = resp.json().get("error", {})
                print(f"request {i + 1}: HTTP {resp.status_code} {err.get('code')} in {times[1]:.3f} s "
                      f"(same-size parse-only refusal {times[0]:.3f} s); RSS {rss_mb(proc.pid):.0f} MB")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
