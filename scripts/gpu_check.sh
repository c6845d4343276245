#!/usr/bin/env bash
# Everything the GPU has to say, in one device call: a Gluon smoke run (a hang shows in
# seconds), the GPU test suite, the benchmark tables (PERF.md shapes, baselines in the same
# run) and the demo. `--sweep` adds the portable kernel's tile/split sweeps, `--variants`
# the Gluon kernel's variants and ablations, `--configs` its config A/B (bench --configs on
# $CONFIG_SHAPES, default all), `--ncu` Nsight Compute reports of the Gluon
# kernel ($NCU_SHAPE, default prefill_gqa_8k, as is and without its softmax), `--ncu-source`
# per-SASS-instruction stall samples of the Gluon kernel on $NCU_SHAPES (CSV; read them with
# scripts/stall_report.py; a spec NAME@fa4 profiles FA4's kernel on that shape), `--bench-only`
# skips the tests, `--tests-only` the benchmark. `--fa4 BUNDLE` first unpacks FA4 (flash_attn.cute
# and the CuTe DSL, a site-packages tarball for the device's Python; perf-notes "Measuring on the
# lent H100") so that the benchmark times FA4 in the same run.
# Logs go to $OUT (the device tool brings that folder back).
#   usage (on the device machine, repo root):
#     bash scripts/gpu_check.sh [--sweep] [--variants] [--configs] [--ncu] [--ncu-source] [--fa4 BUNDLE] [--bench-only] [--tests-only] [pytest args...]
# (--bench-only and --tests-only together: neither, only the smoke run, the demo and the extras)
# (the whole of it runs past the device tool's 600 s per call: split it with --tests-only / --bench-only)
set -uo pipefail
OUT=${OUT:-/tmp/attnquant-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SWEEP=0 VARIANTS=0 CONFIGS=0 TESTS=1 BENCH=1 NCU=0 NCU_SOURCE=0 FA4_BUNDLE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sweep) SWEEP=1; shift ;;
    --variants) VARIANTS=1; shift ;;
    --configs) CONFIGS=1; shift ;;
    --bench-only) TESTS=0; shift ;;
    --tests-only) BENCH=0; shift ;;
    --ncu) NCU=1; shift ;;
    --ncu-source) NCU_SOURCE=1; shift ;;
    --fa4) FA4_BUNDLE=$2; shift 2 ;;
    *) break ;;
  esac
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ -n "$FA4_BUNDLE" ]; then
  mkdir -p /tmp/fa4site && tar xJf "$FA4_BUNDLE" -C /tmp/fa4site
  export PYTHONPATH=$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/python_packages
  python3 -c "import flash_attn.cute.interface, cutlass; print('FA4 importable, CuTe DSL', cutlass.__version__)" 2>&1 \
    | tail -n 3 | tee -a "$OUT/gpu.txt"
fi
if ! timeout 240 python3 scripts/gluon_smoke.py > "$OUT/smoke.log" 2>&1; then
  echo "gluon smoke run failed or hung:"; tail -n 5 "$OUT/smoke.log"; exit 1
fi
tail -n 3 "$OUT/smoke.log"
if [ $TESTS = 1 ]; then
  timeout ${PYTEST_TIMEOUT:-420} python3 -m pytest -q -n 8 -p no:cacheprovider tests "$@" > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20; tail -n 2 "$OUT/pytest.log"
fi
if [ $BENCH = 1 ]; then timeout ${BENCH_TIMEOUT:-280} python3 -m attnquant.bench 2>&1 | tee "$OUT/bench.log"; fi
if [ $CONFIGS = 1 ]; then timeout 300 python3 -m attnquant.bench --configs ${CONFIG_SHAPES:-} 2>&1 | tee "$OUT/configs.log"; fi
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
if [ $NCU_SOURCE = 1 ]; then  # NCU_SHAPES: bench.PREFILL names, each optionally :option=N[:...] (profile_gluon.py)
  for spec in ${NCU_SHAPES:-noncausal_mha_8k prefill_mla_4k}; do
    fmt=fp8 kernel=attn_fwd_ws
    case "$spec" in *@fa4) fmt=fa4 kernel=FlashAttentionForward spec=${spec%@fa4} ;; esac
    shape=${spec%%:*}; opts=""; [ "$spec" != "$shape" ] && opts=${spec#*:}
    tag=$(echo "$spec" | tr ':=' '__'); [ $fmt = fa4 ] && tag=${tag}_fa4
    timeout 200 ncu --clock-control none --kernel-name regex:$kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SourceCounters -f -o "/tmp/src_$tag" \
      python3 scripts/profile_gluon.py "$shape" 0 $fmt ${opts//:/ } > /tmp/ncu_src_$tag.log 2>&1
    ncu -i "/tmp/src_$tag.ncu-rep" --page source --csv --print-source sass | gzip > "$OUT/src_$tag.csv.gz"
    echo "ncu source $spec:"; ncu -i "/tmp/src_$tag.ncu-rep" --page details 2>&1 | grep -E "Duration|SM Frequency|Warp Cycles Per Issued" | head -5
  done
fi
