#!/usr/bin/env bash
# The GPU check of issue [8 of 11]: run from the repository root on a machine with a GPU, in at most
# 8 minutes (each part under its own `timeout`). Installs nothing heavy: torch must be there already.
#
#   bash benchmarks/device_check.sh            # results and logs in $OUT if set, else benchmarks/results
#
#   (a) the device, model and contract tests with DDLM_DEVICE=cuda (tests taking the `device`
#       fixture run on the CPU and on CUDA; the trainer and CLI tests run on CUDA)       <= 100 s
#   (b) benchmarks/device_bench.py: bf16 matmul rate, training tok/s and MFU (eager and compiled),
#       sampler tok/s; writes device_<gpu>.json (rows past its 150 s budget skipped)   <= 180 s
#   (c) 200 steps of the text8 recipe's MDLM configuration (text8 if data/text8 exists)      <= 100 s
#   (d) torchrun with one GPU: NCCL, FSDP2 (bf16 policy), a sharded checkpoint, then a resume of it
#       in a plain process on the GPU                                                        <= 100 s
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
DDLM_DEVICE=cuda timeout 100 python -m pytest -q -x -p no:cacheprovider \
    tests/test_device.py tests/test_model.py tests/test_contract.py 2>&1 | tee "$RESULTS/device_check_tests.log" \
    || status=1

echo "== (b) device benchmark"
timeout 180 python benchmarks/device_bench.py --out "$RESULTS" --budget-s 150 2>&1 \
    | tee "$RESULTS/device_check_bench.log" || status=1

echo "== (c) the text8 recipe's MDLM row, 200 steps (d768 x 12, L=256, bf16, compiled blocks)"
# text8 itself when data/text8 is there (a GPU machine here cannot download it), else the embedded
# corpus with the same tokenizer, model and optimiser settings
CORPUS=austen; [ -f data/text8 ] && CORPUS=text8:data/text8
timeout 100 python -m ddlm train --method mdlm --data "$CORPUS" --tokenizer char --data.seq_len 256 \
    --model.dim 768 --model.n_layers 12 --model.n_heads 12 --train.batch_size 64 --train.lr 3e-4 \
    --train.warmup_steps 50 --train.steps 200 --train.eval_every 100 --train.dtype bf16 --train.compile true \
    --train.progress false --overwrite --out "$RESULTS/text8_mdlm_200" 2>&1 | tee "$RESULTS/device_check_text8.log" \
    || status=1

echo "== (d) torchrun on the GPU: NCCL, FSDP2 with its bf16 policy, sharded checkpoint, resume"
timeout 60 torchrun --nproc_per_node 1 -m ddlm train --method bd3 --bd3.block_size 16 --data austen \
    --tokenizer char --data.seq_len 256 --train.batch_size 16 --train.steps 20 --train.parallel fsdp2 \
    --train.progress false --train.ckpt_every 10 --overwrite --out "$RESULTS/fsdp2_bd3" 2>&1 \
    | tee "$RESULTS/device_check_fsdp2.log" || status=1
timeout 40 python -m ddlm train --method bd3 --bd3.block_size 16 --data austen --tokenizer char \
    --data.seq_len 256 --train.batch_size 16 --train.steps 30 --train.progress false --train.ckpt_every 10 \
    --out "$RESULTS/fsdp2_bd3" 2>&1 | tee -a "$RESULTS/device_check_fsdp2.log" || status=1

exit "$status"
