#!/usr/bin/env bash
# Every GPU measurement of the project in one call of the device tool (see bench/RESULTS.md):
#   run(command="bash bench/gpu_session.sh", carry=[".whl", ".carry"], timeout_s=600)
# .whl: jsonargparse + docstring_parser + typeshed_client wheels (the GPU image lacks them; all
# three are pure Python), fetched here beforehand with e.g.
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl "jsonargparse>=4.39,<5" \
#       "docstring_parser>=0.17" "typeshed_client>=2.8.2"   (pyproject's and jsonargparse's pins)
# .carry/cifar10-jpg.tar.gz: the real CIFAR-10 images (only the accuracy sweep needs them).
# Every file lands in $OUT/results.tgz, rewritten after each stage (the device tool returns at
# most 8 files, so no stage writes to $OUT itself). Each stage has its own time limit, cut to
# what is left of BUDGET_S (default 590: the call's 600 s less a margin; pass the call's
# timeout_s less 10 when it is shorter), so one slow stage cannot starve the others and the
# call ends with its results packed. A stage that fails or times out says so (exit 124:
# timed out). SWEEP=1 adds the 15-epoch HUG tuning sweep (about 4 more minutes; SWEEP_NAME
# picks one of bench/accuracy_runs.py's SWEEPS, default hug15b, the round after hug15).
set -uo pipefail
export PYTHONUNBUFFERED=1 JSONARGPARSE_DEPRECATION_WARNINGS=off OUT="${OUT:-/tmp/out}"
END=$((SECONDS + ${BUDGET_S:-590}))
RES=/tmp/gpu_session
rm -rf "$RES"; mkdir -p "$OUT" "$RES"  # rm: a rerun on the warm machine starts clean
ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/ (see this script's header)"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/bench"
python3 -c "import docstring_parser, typeshed_client, hug_lightning.cli" || exit 1
save() { tar czf "$OUT/results.tgz.part" -C "$RES" . && mv "$OUT/results.tgz"{.part,}; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, lightning, torchmetrics, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'torchvision', torchvision.__version__)"
} | tee "$RES/machine.txt"
# stage NAME SECONDS: prints the header and sets T, the stage's limit cut to the time left
# (20 s kept for the last stage and the packing); fails (the stage is skipped) under 20 s
stage() {
  T=$(( $2 < END - SECONDS - 20 ? $2 : END - SECONDS - 20 ))
  echo "=== $1 ($(date +%T), limit ${T} s)"
  [ "$T" -ge 20 ] || { echo "!!! skipped: ${T} s left of BUDGET_S"; return 1; }
}
# done_stage STATUS: after a stage's pipeline, with its first command's exit status
done_stage() {
  [ "$1" = 0 ] || echo "!!! exit $1 ($([ "$1" = 124 ] && echo timed out || echo failed))"
  save
}
run() { timeout -k 10 "$T" "$@"; }  # -k: a process that ignores SIGTERM is killed 10 s later
table() { grep -E "^(\||###)"; }  # the Markdown table, not the progress bars of (b-cli)

if stage "GPU tests: no host sync per step, device batches = CPU batches" 70; then
  run python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
  done_stage "${PIPESTATUS[0]}"
fi
# first: what decides (b)/(a) (issue 6): device time kernel by kernel, then host time
if stage "(a) vs (b) device time per step, kernel by kernel" 60; then
  run python3 bench/profile_host.py --device cuda --compare --steps 20 --top 25 \
      2>> "$RES/bench.err" | tee "$RES/compare.md" | cut -c1-160
  done_stage "${PIPESTATUS[0]}"
fi
if stage "host time per step that Lightning adds: NullBackbone (no compute), (b) - (a)" 70; then
  run python3 bench/train_bench.py --device cuda --overhead --measure a b b0 bcli --repeats 2 \
      --steps 500 --warmup 50 --json "$RES/overhead.json" 2>> "$RES/bench.err" | table
  done_stage "${PIPESTATUS[0]}"
fi
if stage "train_bench, eager: throughput ((b0): bare module; (bcli): the command's Trainer)" 140
then
  run python3 bench/train_bench.py --device cuda --measure a b b0 bcli c hug --repeats 2 \
      --steps 300 --json "$RES/throughput.json" 2>> "$RES/bench.err" | table
  done_stage "${PIPESTATUS[0]}"
fi
if stage "train_bench, eager: NC collectors, epoch times" 120; then
  run python3 bench/train_bench.py --device cuda --measure nc10 nc100 eval --repeats 2 \
      --json "$RES/nc.json" 2>> "$RES/bench.err" | table
  done_stage "${PIPESTATUS[0]}"
fi
if stage "host profile, K=100, collectors on" 40; then
  run python3 bench/profile_host.py --device cuda --classes 100 --epochs 3 --top 22 \
      2>> "$RES/bench.err" > "$RES/profile.txt"
  done_stage "$?"; head -60 "$RES/profile.txt" | cut -c1-150
fi

if [ "${SWEEP:-0}" = 1 ] &&
    stage "HUG 15-epoch sweep ${SWEEP_NAME:-hug15b} (8 fits at once on the one GPU)" 230; then
  mkdir -p /tmp/data && tar xzf .carry/cifar10-jpg.tar.gz -C /tmp/data
  run python3 bench/accuracy_runs.py --root /tmp/data/cifar10-jpg \
      --sweep "${SWEEP_NAME:-hug15b}" \
      --epochs 15 --seeds 0 --parallel 8 --robust-batches 0 --out /tmp/acc \
      --json "$RES/sweep.json" 2>&1 | grep -E "^done|^\||^###" | tee "$RES/sweep.md"
  done_stage "${PIPESTATUS[0]}"
fi

if stage "train_bench, torch.compile (a), (b), (b0), hug (loss compiled in (b), hug), counters" 150
then
  TORCH_LOGS=recompiles,graph_breaks run python3 bench/train_bench.py --device cuda \
      --compile --compile-loss --measure a b b0 hug --repeats 1 --json "$RES/compile.json" \
      2> "$RES/compile.log" | table
  done_stage "${PIPESTATUS[0]}"; grep -c -i "recompil\|graph break" "$RES/compile.log"
fi
echo "=== end ($(date +%T))"
grep -v "pytree\|LeafSpec\|Tip:\|available:\|LOCAL_RANK\|stopped\|bfloat16\|float32_matmul" \
    "$RES/bench.err" 2> /dev/null | tail -15
save
