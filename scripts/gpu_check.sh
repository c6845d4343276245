#!/usr/bin/env bash
# Everything the GPU has to say, in one device call: a Gluon smoke run (a hang shows in
# seconds), the GPU test suite, the benchmark tables (PERF.md shapes, baselines in the same
# run) and the demo. `--sweep` adds the portable kernel's tile/split sweeps, `--variants`
# the Gluon kernel's variants and ablations, `--ncu` Nsight Compute reports of the Gluon
# kernel ($NCU_SHAPE, default prefill_gqa_8k, as is and without its softmax), `--bench-only`
# skips the tests, `--tests-only` the benchmark.
# Logs go to $OUT (the device tool brings that folder back).
#   usage (on the device machine, repo root):
#     bash scripts/gpu_check.sh [--sweep] [--variants] [--ncu] [--bench-only | --tests-only] [pytest args...]
# (the whole of it runs past the device tool's 600 s per call: split it with --tests-only / --bench-only)
set -uo pipefail
OUT=${OUT:-/tmp/attnquant-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SWEEP=0 VARIANTS=0 TESTS=1 BENCH=1 NCU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --sweep) SWEEP=1; shift ;;
    --variants) VARIANTS=1; shift ;;
    --bench-only) TESTS=0; shift ;;
    --tests-only) BENCH=0; shift ;;
    --ncu) NCU=1; shift ;;
    *) break ;;
  esac
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if ! timeout 240 python3 scripts/gluon_smoke.py > "$OUT/smoke.log" 2>&1; then
  echo "gluon smoke run failed or hung:"; tail -n 5 "$OUT/smoke.log"; exit 1
fi
tail -n 3 "$OUT/smoke.log"
if [ $TESTS = 1 ]; then
  timeout 420 python3 -m pytest -q -n 8 -p no:cacheprovider tests "$@" > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20; tail -n 2 "$OUT/pytest.log"
fi
if [ $BENCH = 1 ]; then timeout 280 python3 -m attnquant.bench 2>&1 | tee "$OUT/bench.log"; fi
if [ $VARIANTS = 1 ]; then timeout 250 python3 -m attnquant.bench --gluon-variants 2>&1 | tee "$OUT/variants.log"; fi
timeout 40 python3 -m attnquant.demo 2>&1 | tee "$OUT/demo.log"
if [ $SWEEP = 1 ]; then timeout 130 python3 -m attnquant.bench --sweep 2>&1 | tee "$OUT/sweep.log"; fi
if [ $NCU = 1 ]; then  # NCU_SHAPE (a bench.PREFILL name), NCU_ABLATE (the ablations to profile, 0 = none)
  for ab in ${NCU_ABLATE:-0 1}; do
    timeout 200 ncu --clock-control none --kernel-name regex:attn_fwd_ws --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis \
      python3 scripts/profile_gluon.py ${NCU_SHAPE:-prefill_gqa_8k} $ab > "$OUT/ncu_ablate$ab.txt" 2>&1
    echo "ncu ${NCU_SHAPE:-prefill_gqa_8k} (ablate=$ab):"
    grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Hit|L2 Hit|Issue Slots Busy|Executed Ipc A|No Eligible|Warp Cycles Per Issued|Stall|Tensor|pipe" "$OUT/ncu_ablate$ab.txt" | head -40
  done
fi
