#!/usr/bin/env bash
# The GPU check of issue [8 of 11]: run from the repository root on a machine with a GPU, in at most
# 8 minutes (each part under its own `timeout`). Installs nothing heavy: torch must be there already.
#
#   bash benchmarks/device_check.sh            # results and logs in $OUT if set, else benchmarks/results
#
#   (a) the device, model and contract tests with DDLM_DEVICE=cuda (tests taking the `device`
#       fixture run on the CPU and on CUDA; the trainer and CLI tests run on CUDA)       <= 120 s
#   (b) benchmarks/device_bench.py: bf16 matmul rate, training tok/s and MFU (eager and compiled),
#       sampler tok/s; writes device_<gpu>.json (rows past its 220 s budget skipped)   <= 250 s
#   (c) 200 steps of the text8 recipe, when data/text8 exists (placeholder: someone else's part) <= 90 s
# A failing part does not stop the later ones; the script exits non-zero if any failed.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DDLM_CACHE="${DDLM_CACHE:-/tmp/ddlm-cache}"
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"

if ! python -c "import ddlm" 2>/dev/null; then
    echo "ddlm does not import: pip install -e . (its dependencies must already be installed)"
    pip install -q --no-build-isolation -e . || pip install -q --no-deps --no-build-isolation -e .
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
nvidia-smi -L || echo "nvidia-smi not found"

status=0

echo "== (a) tests on cuda"
DDLM_DEVICE=cuda timeout 120 python -m pytest -q -x -p no:cacheprovider \
    tests/test_device.py tests/test_model.py tests/test_contract.py 2>&1 | tee "$RESULTS/device_check_tests.log" \
    || status=1

echo "== (b) device benchmark"
timeout 250 python benchmarks/device_bench.py --out "$RESULTS" --budget-s 220 2>&1 \
    | tee "$RESULTS/device_check_bench.log" || status=1

echo "== (c) text8 recipe, 200 steps"
# PLACEHOLDER (owned by the text8 part of issue [8 of 11]): its runner sets the options after --train.steps.
if [ -f data/text8 ]; then
    timeout 90 python -m ddlm train --config recipes/text8.yaml --method mdlm --train.steps 200 \
        --out "$RESULTS/text8_mdlm_200" 2>&1 | tee "$RESULTS/device_check_text8.log" || status=1
else
    echo "skipped: data/text8 not found"
fi

exit "$status"
