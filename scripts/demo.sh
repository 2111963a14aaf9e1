#!/usr/bin/env bash
# Set up .venv (if needed) and run the embedded demo. Extra arguments go to `bunny demo`
# (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bunny demo "$@"
