#!/usr/bin/env bash
# Every GPU measurement of the project in one call of the device tool (see bench/RESULTS.md):
#   run(command="bash bench/gpu_session.sh", carry=[".whl", ".carry"], timeout_s=600)
# .whl: jsonargparse + docstring_parser + typeshed_client wheels (the GPU image lacks them);
# .carry/cifar10-jpg.tar.gz: the real CIFAR-10 images (only the accuracy sweep needs them).
# Results land in $OUT. Each stage has its own time limit so one slow stage cannot starve the
# others. SWEEP=1 adds the 15-epoch HUG tuning sweep (about 4 more minutes; SWEEP_NAME picks
# one of bench/accuracy_runs.py's SWEEPS, default hug15b, the round after hug15).
set -uo pipefail
export PYTHONUNBUFFERED=1 JSONARGPARSE_DEPRECATION_WARNINGS=off OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/bench"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, lightning, torchmetrics, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'torchvision', torchvision.__version__)"
} | tee "$OUT/machine.txt"
stage() { echo "=== $1 ($(date +%T))"; }

stage "GPU tests: no host sync per step, device batches = CPU batches"
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3

# first: what decides (b)/(a) (issue 6): device time kernel by kernel, then host time

stage "(a) vs (b) device time per step, kernel by kernel"
timeout 60 python3 bench/profile_host.py --device cuda --compare --steps 20 --top 25 \
    2>> "$OUT/bench.err" | tee "$OUT/compare.md" | cut -c1-160
stage "host time per step that Lightning adds: NullBackbone (no compute), (b) - (a)"
timeout 70 python3 bench/train_bench.py --device cuda --overhead --measure a b b0 bcli --repeats 2 \
    --steps 500 --warmup 50 --json "$OUT/overhead.json" 2>> "$OUT/bench.err" | grep "|"

stage "train_bench, eager: throughput ((b0): bare LightningModule; (bcli): the command's Trainer)"
timeout 140 python3 bench/train_bench.py --device cuda --measure a b b0 bcli c hug --repeats 2 \
    --steps 300 --json "$OUT/throughput.json" 2>> "$OUT/bench.err" | grep "|"
stage "train_bench, eager: NC collectors, epoch times"
timeout 120 python3 bench/train_bench.py --device cuda --measure nc10 nc100 eval --repeats 2 \
    --json "$OUT/nc.json" 2>> "$OUT/bench.err" | grep "|"
stage "host profile, K=100, collectors on"
timeout 40 python3 bench/profile_host.py --device cuda --classes 100 --epochs 3 --top 22 \
    2>> "$OUT/bench.err" > "$OUT/profile.txt"; head -60 "$OUT/profile.txt" | cut -c1-150

if [ "${SWEEP:-0}" = 1 ]; then
  stage "HUG 15-epoch sweep ${SWEEP_NAME:-hug15b} (8 fits at once on the one GPU)"
  mkdir -p /tmp/data && tar xzf .carry/cifar10-jpg.tar.gz -C /tmp/data
  timeout 230 python3 bench/accuracy_runs.py --root /tmp/data/cifar10-jpg \
      --sweep "${SWEEP_NAME:-hug15b}" \
      --epochs 15 --seeds 0 --parallel 8 --robust-batches 0 --out /tmp/acc \
      --json "$OUT/sweep.json" 2>&1 | grep -E "^done|^\||^###" | tee "$OUT/sweep.md"
fi

stage "train_bench, torch.compile (a), (b), (b0), hug (loss compiled too in (b), hug), counters"
TORCH_LOGS=recompiles,graph_breaks timeout 150 python3 bench/train_bench.py --device cuda \
    --compile --compile-loss --measure a b b0 hug --repeats 1 --json "$OUT/compile.json" \
    2> "$OUT/compile.log" \
    | grep "|"; grep -c -i "recompil\|graph break" "$OUT/compile.log"
stage "end"
grep -v "pytree\|LeafSpec\|Tip:\|available:\|LOCAL_RANK\|stopped\|bfloat16\|float32_matmul" \
    "$OUT/bench.err" | tail -15
