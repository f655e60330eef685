#!/usr/bin/env bash
# The GPU checks on a machine with CUDA but no Rust toolchain (docs/CUDA.md). `make device-pack`
# puts the binaries into .device/ here; copy the working tree there (with .device/) and run
# `bash tests/gpu/run.sh` from its root. Uses the machine's own CUDA 13 libraries.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SOTU_ROOT=$PWD SOTU_BIN=$PWD/.device/sotu-delta
echo "== GPU tests (GPU vs CPU byte for byte, known answers)"
.device/cuda-tests --nocapture --test-threads=1
echo "== merge kernel vs device-to-device copy"
.device/sotu-gpubench "$@"
