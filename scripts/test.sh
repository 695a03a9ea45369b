#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# spin-waiting OpenMP threads slow torch 5-30x when other processes share the 2 cores
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m pytest -q "$@"
