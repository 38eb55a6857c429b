#!/usr/bin/env bash
# Build the GPU test binaries (and the CLI with its bench runner, the decoder example and the
# criterion GPU benches) here and copy them
# into .devbin/ (git-ignored), for a GPU machine that has no Rust toolchain: carry .devbin and
# run scripts/gpu-check.sh there (on a short lease, e.g. `SANITIZE=memcheck BENCH_ARGS=--quick
# BUDGET_S=500 scripts/gpu-check.sh`). The binaries load libcuda at run time; nothing else is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-nvcc.sh
rm -rf .devbin && mkdir -p .devbin/tests
cargo test --release --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and m["target"]["name"].startswith("gpu_"):
        name = m["target"]["name"]
        shutil.copy(m["executable"], os.path.join(".devbin/tests", name))
        print("staged test", name)
'
cargo build --release --bin rope-attn --example decoder
cp target/release/rope-attn target/release/examples/decoder .devbin/
cp -r examples/configs .devbin/configs
cp -r examples/shapes .devbin/shapes
# The criterion GPU benches (benches/gpu.rs), for gpu-check.sh's CRITERION phase.
cargo bench --no-run --bench gpu --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        shutil.copy(m["executable"], ".devbin/gpu-benches")
        print("staged the criterion gpu benches")
'
strip .devbin/gpu-benches 2>/dev/null || true
# Each binary embeds the fatbins (~3 MB, compressed); stripping symbols keeps the lot well under
# the 64 MiB a device call may carry.
strip .devbin/tests/* .devbin/rope-attn .devbin/decoder 2>/dev/null || true
du -sh .devbin
