#!/usr/bin/env bash
# FA4 for same-run comparisons on the GPU machine, which cannot download: the current release's
# wheels for the device's Python (3.12), unzipped into one site-packages folder, as an xz tarball
# in two parts under the device tool's 64 MiB carry (docs/design.md "Measuring"). Run here, from
# the repository root; writes scratch/fa4/p1/part.aa and scratch/fa4/p2/part.ab (scratch/ is
# ignored: never commit the wheels). Then, on the device, two calls within its warm window:
#   carry scratch/fa4/p1:  mkdir -p ~/fa4 && cp scratch/fa4/p1/part.aa ~/fa4/
#   carry scratch/fa4/p2:  cat ~/fa4/part.aa scratch/fa4/p2/part.ab > /tmp/fa4.tar.xz &&
#                          bash scripts/gpu_check.sh --bench-only --no-smoke --fa4 /tmp/fa4.tar.xz
set -euo pipefail
cd "$(dirname "$0")/.."
dir=scratch/fa4
rm -rf "$dir" && mkdir -p "$dir/wheels" "$dir/site" "$dir/p1" "$dir/p2"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dir/wheels" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  'apache-tvm-ffi<0.2' torch-c-dlpack-ext einops
for w in "$dir"/wheels/*.whl; do unzip -q -o "$w" -d "$dir/site"; done
tar cf - -C "$dir/site" . | xz -9 -T2 > "$dir/fa4.tar.xz"
(cd "$dir" && split -b 60M fa4.tar.xz part. && mv part.aa p1/ && mv part.ab p2/)
ls -l "$dir/p1" "$dir/p2"
