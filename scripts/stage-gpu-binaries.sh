#!/usr/bin/env bash
# Build every test binary (and the CLI, the decoder example and the benches) here and copy them
# into .devbin/ (git-ignored), for a GPU machine that has no Rust toolchain: carry .devbin and
# run scripts/gpu-check.sh there. The binaries load libcuda at run time; nothing else is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-nvcc.sh
rm -rf .devbin && mkdir -p .devbin/tests
cargo test --release --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        shutil.copy(m["executable"], os.path.join(".devbin/tests", name))
        print("staged test", name)
'
cargo build --release --bin rope-attn --example decoder
cp target/release/rope-attn target/release/examples/decoder .devbin/
cargo bench --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        shutil.copy(m["executable"], ".devbin/bench_" + m["target"]["name"])
        print("staged bench", m["target"]["name"])
'
cp -r examples/configs .devbin/configs
du -sh .devbin
