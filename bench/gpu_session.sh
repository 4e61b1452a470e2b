#!/usr/bin/env bash
# Every GPU measurement of the project in one call of the device tool (see bench/RESULTS.md):
#   run(command="bash bench/gpu_session.sh", carry=[".whl", ".carry"])
# .whl: jsonargparse + docstring_parser + typeshed_client wheels (the GPU image lacks them);
# .carry/cifar10-jpg.tar.gz: the real CIFAR-10 images. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 JSONARGPARSE_DEPRECATION_WARNINGS=off OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, lightning, torchmetrics, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'torchvision', torchvision.__version__)"
} | tee "$OUT/machine.txt"
mkdir -p /tmp/data && tar xzf .carry/cifar10-jpg.tar.gz -C /tmp/data

echo "=== train_bench"
timeout 170 python3 bench/train_bench.py --device cuda --steps 100 --warmup 25 \
    --json "$OUT/train_bench.json" 2> "$OUT/train_bench.err" | tee "$OUT/train_bench.md"
echo "=== accuracy runs"
timeout 330 python3 bench/accuracy_runs.py --root /tmp/data/cifar10-jpg --epochs 15 \
    --seeds 0 1 --out /tmp/acc --json "$OUT/accuracy.json" 2> "$OUT/accuracy.err" \
    | grep -E "^done|^\||^###" | tee "$OUT/accuracy.md"
tail -5 "$OUT/train_bench.err" "$OUT/accuracy.err"
