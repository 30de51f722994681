#!/usr/bin/env bash
# Every GPU row of benchmarks/run.py, on a lent GPU machine, from the repository root, with the
# folders that benchmarks/gpu/prepare.py wrote (.whl and .gpu) carried. Extra arguments go to run.py.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cp /tmp/site/bin/segue "$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/"  # the harness runs workers by it
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 benchmarks/run.py --only gpu,gpu-pipeline --models .gpu/models "$@"
