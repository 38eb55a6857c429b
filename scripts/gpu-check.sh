#!/usr/bin/env bash
# On a GPU machine: the whole test suite with a missing GPU counted as a failure, then
# compute-sanitizer (memcheck, racecheck) over the GPU tests, then the decoder example and the
# benches. Uses prebuilt binaries from .devbin/ (scripts/stage-gpu-binaries.sh) when cargo is
# absent. Writes logs to ${OUT:-gpu-logs}/. For a short device budget: SANITIZE="memcheck" (the
# tools to run; "" for none) and BENCH_ARGS="--quick" (passed to `rope-attn bench`).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-gpu-logs}
mkdir -p "$LOG"
export ROPE_ATTN_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/gpu.txt"
status=0
if command -v cargo >/dev/null; then
    cargo test --release --features candle 2>&1 | tee "$LOG/tests.txt" || status=1
    cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("gpu_"): print(m["executable"])
' > "$LOG/gpu_bins.txt"
else
    # Staged binaries: only the GPU tests (the CPU tests read files at paths baked in at build
    # time, and they already ran where they were built).
    (cd .devbin/tests && for t in gpu_*; do echo "== $t"; ./"$t" 2>&1 || echo "FAILED $t"; done) | tee "$LOG/tests.txt"
    grep -q '^FAILED' "$LOG/tests.txt" && status=1
    ls -d "$PWD"/.devbin/tests/gpu_* > "$LOG/gpu_bins.txt"
fi
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
if [ -n "$SAN" ]; then
    for tool in ${SANITIZE-memcheck racecheck}; do
        while read -r bin; do
            echo "== $tool $(basename "$bin")"
            # ROPE_ATTN_SANITIZER=1: the sweeps at the emulator's lengths (same cases, every code
            # path), since racecheck slows the kernels by orders of magnitude.
            ROPE_ATTN_SANITIZER=1 "$SAN" --tool "$tool" --error-exitcode 3 "$bin" --test-threads=1 2>&1 | tail -5 || status=1
        done < "$LOG/gpu_bins.txt"
    done 2>&1 | tee "$LOG/sanitizer.txt"
else
    echo "compute-sanitizer not found: sanitizer runs skipped" | tee "$LOG/sanitizer.txt"
fi
if [ -x .devbin/decoder ]; then
    (cd .devbin && ./decoder configs/llama-3.1-8b.json --prompt 512 --steps 64 &&
        ./decoder configs/llama-3.1-8b.json --prompt 512 --steps 8 --chunk 128) 2>&1 | tee "$LOG/decoder.txt" || status=1
    .devbin/rope-attn bench ${BENCH_ARGS:-} --csv "$LOG/bench.csv" 2>&1 | tee "$LOG/bench.txt" || status=1
else
    (cargo run --release --example decoder -- examples/configs/llama-3.1-8b.json --prompt 512 --steps 64 &&
        cargo run --release --example decoder -- examples/configs/llama-3.1-8b.json --prompt 512 --steps 8 --chunk 128) 2>&1 | tee "$LOG/decoder.txt" || status=1
    cargo run --release --bin rope-attn -- bench ${BENCH_ARGS:-} --csv "$LOG/bench.csv" 2>&1 | tee "$LOG/bench.txt" || status=1
fi
exit $status
