#!/usr/bin/env bash
# scripts/gpu_check.sh [--cpu] [--out DIR] [--size full|small|tiny] [--sections a,b] [--prepare] ...
# Issue 22's GPU check in one command: every figure to DIR/gpu_check.json and DIR/gpu_check.md; exit 0 when every
# result agrees with its CPU reference within tolerance, 1 when one does not, 2 bad usage or a missing package,
# 3 when a section crashed or did not run. The work is in scripts/gpu_check.py; this wrapper only picks the
# interpreter ($PYTHON, else python3, else python) and keeps its output unbuffered for a log.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
if [ -z "$python" ]; then
  echo "gpu_check: no python3 or python on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$python" "$here/gpu_check.py" "$@"
