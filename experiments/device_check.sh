#!/usr/bin/env bash
# The scale path's GPU check, one script: at most 8 minutes on one GPU; writes results/bench/<gpu>.json.
#   experiments/device_check.sh                      on a GPU machine, with its own torch
#   experiments/device_check.sh --tiny --out F.json  every step at a CPU size (tests/test_device_check.py)
# A machine without network gets the package's other requirements as wheels in .whl/ (pip download ...),
# installed here into a scratch site folder; the repository itself is imported from its checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" experiments/device_check.py "$@"
