#!/usr/bin/env bash
# The GPU checks on a machine with CUDA but no Rust toolchain (docs/CUDA.md). `make device-pack`
# puts the binaries into .device/ here; copy the working tree there (with .device/) and run
# `bash tests/gpu/run.sh` from its root. Uses the machine's own CUDA 13 libraries.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SOTU_ROOT=$PWD SOTU_BIN=$PWD/.device/sotu-delta
# The toolkit's libraries (libnvrtc.so.13) are often not on the loader's default path.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  if [ -d "$d" ]; then export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
done
echo "== GPU tests (GPU vs CPU byte for byte, known answers)"
.device/cuda-tests --nocapture --test-threads=1
echo "== merge kernel vs device-to-device copy"
.device/sotu-gpubench "$@"
