#!/usr/bin/env bash
# Everything the GPU has to say, in one device call: the GPU test suite, the benchmark
# tables (PERF.md shapes, baselines in the same run) and the demo; `--sweep` adds the
# tile/split sweeps. Logs go to $OUT (the device tool brings that folder back).
#   usage (on the device machine, repo root): bash scripts/gpu_check.sh [--sweep] [pytest args...]
set -uo pipefail
OUT=${OUT:-/tmp/attnquant-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SWEEP=0
if [ "${1:-}" = "--sweep" ]; then SWEEP=1; shift; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -n 8 -p no:cacheprovider tests "$@" > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20; tail -n 2 "$OUT/pytest.log"
timeout 120 python3 -m attnquant.bench 2>&1 | tee "$OUT/bench.log"
timeout 40 python3 -m attnquant.demo 2>&1 | tee "$OUT/demo.log"
if [ $SWEEP = 1 ]; then timeout 130 python3 -m attnquant.bench --sweep 2>&1 | tee "$OUT/sweep.log"; fi
