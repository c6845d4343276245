#!/usr/bin/env bash
# What the GPU has to say, in as few device calls as possible. Logs go to $OUT (the device
# tool brings that folder back). Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_check.sh [options] [pytest args...]
#
#   (default)        Gluon smoke run (a hang shows in seconds), the GPU test suite, the benchmark
#   --tests-only     no benchmark          --bench-only   no tests (both: only what is asked below)
#   --fuzz           the property-based fuzz test with its GPU profile (many more examples)
#   --no-smoke       skip the Gluon smoke run (a call right after one that ran it)
#   --sanitize       scripts/sanitize_cases.py under compute-sanitizer memcheck, racecheck and
#                    synccheck: each tool's summary line (logs: $OUT/sanitize_TOOL.log); and
#                    racecheck of tools/ws_race_probe.py (what Triton's warp_specialize alone reports)
#   --ab BASE        tools/ab_versions.py BASE: the working tree against another version,
#                    interleaved (AB_ARGS: its options, e.g. "--formats fp8,nvfp4 --decode")
#   --ncu-source     per-SASS-instruction stall samples of the Gluon kernel on $NCU_SHAPES (CSV;
#                    read them with tools/stall_report.py; NAME@fa4 profiles FA4 on that shape)
#   --fa4 BUNDLE     first unpack FA4 (flash_attn.cute and the CuTe DSL, a site-packages tarball for
#                    the device's Python; docs/design.md "Measuring") so the benchmark times it
# The whole default run is past the device tool's 600 s a call: split it with the options, or
# run part of the suite: PYTEST_PATHS (default: tests), PYTEST_WORKERS (default: 8), SUITE_TIMEOUT
# (seconds, default 420; not PYTEST_TIMEOUT, which pytest-timeout reads as a per-test limit). BENCH_ARGS:
# the benchmark's options (default: every table but --block and --sweep).
set -uo pipefail
OUT=${OUT:-/tmp/attnquant-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TESTS=1 BENCH=1 FUZZ=0 SANITIZE=0 SMOKE=1 NCU_SOURCE=0 AB_BASE="" FA4_BUNDLE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tests-only) BENCH=0; shift ;;
    --bench-only) TESTS=0; shift ;;
    --fuzz) FUZZ=1; shift ;;
    --no-smoke) SMOKE=0; shift ;;
    --sanitize) SANITIZE=1; shift ;;
    --ab) AB_BASE=$2; shift 2 ;;
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
if [ $SMOKE = 1 ]; then
  if ! timeout 240 python3 scripts/gluon_smoke.py > "$OUT/smoke.log" 2>&1; then
    echo "gluon smoke run failed or hung:"; tail -n 5 "$OUT/smoke.log"; exit 1
  fi
  tail -n 3 "$OUT/smoke.log"
fi
if [ $SANITIZE = 1 ]; then
  for tool in memcheck racecheck synccheck; do
    timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool $tool --print-limit 20 \
      python3 scripts/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $?"
    grep -E "SUMMARY|off:|all calls ran" "$OUT/sanitize_$tool.log" | tail -n 3
  done
  # the bare probe, then with what attnquant's calls add: many CTAs, a reduction just before
  for probe in "" "--ctas 1056" "--prior-reduce --launches 3" "--ctas 1056 --prior-reduce --launches 3"; do
    timeout 90 compute-sanitizer --tool racecheck python3 tools/ws_race_probe.py $probe > "$OUT/sanitize_ws_probe.log" 2>&1
    echo "racecheck of a bare warp_specialize kernel (tools/ws_race_probe.py $probe): exit $?"
    grep -E "SUMMARY|ws_race_probe ran" "$OUT/sanitize_ws_probe.log" | tail -n 2
  done
fi
if [ $TESTS = 1 ]; then
  # SIGINT at the limit: pytest still prints its summary (-rf names the failures so far); -v names
  # every test that ran (the log says what a cut-off run left out), --durations the slowest
  timeout -s INT -k 30 ${SUITE_TIMEOUT:-420} python3 -m pytest -v -n ${PYTEST_WORKERS:-8} -p no:cacheprovider --durations=40 \
    ${PYTEST_PATHS:-tests} "$@" > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20; tail -n 2 "$OUT/pytest.log"
fi
if [ $FUZZ = 1 ]; then
  ATTNQUANT_FUZZ_PROFILE=gpu timeout ${FUZZ_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider \
    --hypothesis-show-statistics tests/test_fuzz.py > "$OUT/fuzz.log" 2>&1
  echo "fuzz exit $?"; grep -E "passing examples|^(FAILED|ERROR)" "$OUT/fuzz.log" | head -20; tail -n 1 "$OUT/fuzz.log"
fi
if [ -n "$AB_BASE" ]; then timeout ${AB_TIMEOUT:-400} python3 tools/ab_versions.py "$AB_BASE" ${AB_ARGS:-} 2>&1 | tee "$OUT/ab.log"; fi
if [ $BENCH = 1 ]; then timeout ${BENCH_TIMEOUT:-400} python3 -m attnquant.bench ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"; fi
if [ $NCU_SOURCE = 1 ]; then  # NCU_SHAPES: bench shape names, each optionally :option=N[:...] (profile_gluon.py)
  for spec in ${NCU_SHAPES:-noncausal_mha_8k prefill_mla_4k}; do
    fmt=fp8 kernel=attn_fwd_ws
    case "$spec" in *@fa4) fmt=fa4 kernel=FlashAttentionForward spec=${spec%@fa4} ;; esac
    shape=${spec%%:*}; opts=""; [ "$spec" != "$shape" ] && opts=${spec#*:}
    tag=$(echo "$spec" | tr ':=' '__'); [ $fmt = fa4 ] && tag=${tag}_fa4
    timeout 200 ncu --clock-control none --kernel-name regex:$kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SourceCounters -f -o "/tmp/src_$tag" \
      python3 tools/profile_gluon.py "$shape" $fmt ${opts//:/ } > /tmp/ncu_src_$tag.log 2>&1
    ncu -i "/tmp/src_$tag.ncu-rep" --page source --csv --print-source sass | gzip > "$OUT/src_$tag.csv.gz"
    echo "ncu source $spec:"; ncu -i "/tmp/src_$tag.ncu-rep" --page details 2>&1 | grep -E "Duration|SM Frequency|Warp Cycles Per Issued" | head -5
  done
fi
