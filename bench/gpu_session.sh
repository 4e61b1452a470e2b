#!/usr/bin/env bash
# Every GPU measurement of the project in one call of the device tool (see bench/RESULTS.md):
#   run(command="bash bench/gpu_session.sh", carry=[".whl", ".carry"], timeout_s=600)
# .whl: jsonargparse + docstring_parser + typeshed_client wheels (the GPU image lacks them);
# .carry/cifar10-jpg.tar.gz: the real CIFAR-10 images. Results land in $OUT. Each stage has its
# own time limit so one slow stage cannot starve the others (about 9 minutes in all).
set -uo pipefail
export PYTHONUNBUFFERED=1 JSONARGPARSE_DEPRECATION_WARNINGS=off OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, lightning, torchmetrics, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'torchvision', torchvision.__version__)"
} | tee "$OUT/machine.txt"
mkdir -p /tmp/data && (tar xzf .carry/cifar10-jpg.tar.gz -C /tmp/data &)
stage() { echo "=== $1 ($(date +%T))"; }

stage "GPU tests: no host sync per step, device batches = CPU batches"
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rA 2>&1 \
    | tail -15 | tee "$OUT/gpu_tests.txt"

stage "train_bench, eager"
timeout 160 python3 bench/train_bench.py --device cuda --repeats 2 \
    --json "$OUT/train_bench.json" 2> "$OUT/train_bench.err" | tee "$OUT/train_bench.md"

stage "HUG 15-epoch sweep (8 fits at once on the one GPU)"
timeout 230 python3 bench/accuracy_runs.py --root /tmp/data/cifar10-jpg --sweep hug15 \
    --epochs 15 --seeds 0 --parallel 8 --robust-batches 0 --out /tmp/acc \
    --json "$OUT/sweep.json" 2>&1 | grep -E "^done|^\||^###" | tee "$OUT/sweep.md"

stage "train_bench, torch.compile (a) and (b)"
timeout 110 python3 bench/train_bench.py --device cuda --compile --measure a b --repeats 1 \
    --json "$OUT/train_bench_compile.json" 2> "$OUT/compile.err" | tee "$OUT/compile.md"
stage "end"
tail -3 "$OUT/train_bench.err" "$OUT/compile.err" /tmp/acc/run*_s0.log 2>/dev/null | tail -40
