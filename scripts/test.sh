#!/usr/bin/env bash
# Sets up the venv (once) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pytest tests -q "$@"
