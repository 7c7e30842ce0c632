#!/usr/bin/env bash
# Issue 7's GPU check in one call on a lent GPU machine (the `device` tool): one ResNet9
# DP-SGD step at 512 px, DP vs non-DP per image, in NCHW and NHWC (channels_last) side by
# side, with the parity check of every mode in both layouts. The training core needs only
# torch and Opacus there; the H200 image has torch but not Opacus, so carry its wheel:
#
#   mkdir -p .whl && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl opacus==1.6.0
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
#
# The table lands in $OUT/bench_dp_512.md. Targets: bk <= 1.3x non-DP at 512 px; NHWC
# should be faster than NCHW on the GPU (resources.memory_format: auto assumes it).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --no-deps --quiet .whl/opacus-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
out="${OUT:-.}/bench_dp_512.md"
python3 benchmarks/bench_dp_step.py --size 512 --device cuda --batch 32 --reps 7 \
    --modes nondp,hooks,ew,bk --memory-format both --budget-mb 40960 --check-size 64 | tee "$out"
