#!/usr/bin/env bash
# On a GPU machine: the whole test suite with a missing GPU counted as a failure, the decoder
# example, the benches, then compute-sanitizer (memcheck, racecheck) over the GPU tests. Uses
# prebuilt binaries from .devbin/ (scripts/stage-gpu-binaries.sh) when cargo is absent. Writes
# logs to ${OUT:-gpu-logs}/ as it goes (a run cut short still leaves what it did).
# For a short device budget:
#   SANITIZE="memcheck"   the sanitizer tools to run ("" for none; default "memcheck racecheck")
#   BENCH_ARGS="--quick"  passed to `rope-attn bench`
#   CRITERION="d512"      also the criterion GPU benches (benches/gpu.rs) whose names hold it
#   BUDGET_S=480          seconds for the whole script: each phase runs under `timeout` with
#                         what is left (a phase cut off is logged as TIMEOUT and fails the run),
#                         so the tests, the decoder and the bench come back even when the
#                         sanitizer has no time left. Unset: no limit.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-gpu-logs}
mkdir -p "$LOG"
export ROPE_ATTN_REQUIRE_GPU=1
START=$(date +%s)
status=0
# Seconds left of BUDGET_S (a large number without one); at least 1.
left() {
    if [ -z "${BUDGET_S:-}" ]; then echo 1000000; return; fi
    local l=$((BUDGET_S - ($(date +%s) - START)))
    [ "$l" -gt 1 ] && echo "$l" || echo 1
}
# run NAME CMD...: CMD under the time left, its exit status kept; 124 means cut off.
run() {
    local name=$1; shift
    timeout --kill-after=10 "$(left)" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "TIMEOUT $name (budget ${BUDGET_S:-none} s)"; fi
    return $rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/gpu.txt"
if command -v cargo >/dev/null; then
    run tests cargo test --release --features candle 2>&1 | tee "$LOG/tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("gpu_"): print(m["executable"])
' > "$LOG/gpu_bins.txt"
    DECODER=(cargo run --release --example decoder -- examples/configs/llama-3.1-8b.json)
    GEMMA4=(cargo run --release --example decoder -- examples/shapes/gemma-4-12b-text-shape.json)
    BENCH=(cargo run --release --bin rope-attn -- bench)
    CRIT=(cargo bench --bench gpu --)
else
    # Staged binaries: only the GPU tests (the CPU tests read files at paths baked in at build
    # time, and they already ran where they were built).
    (cd .devbin/tests && for t in gpu_*; do echo "== $t"; run "$t" ./"$t" 2>&1 || echo "FAILED $t"; done) | tee "$LOG/tests.txt"
    grep -q '^FAILED' "$LOG/tests.txt" && status=1
    ls -d "$PWD"/.devbin/tests/gpu_* > "$LOG/gpu_bins.txt"
    DECODER=(.devbin/decoder .devbin/configs/llama-3.1-8b.json)
    GEMMA4=(.devbin/decoder .devbin/shapes/gemma-4-12b-text-shape.json)
    BENCH=(.devbin/rope-attn bench)
    CRIT=(.devbin/gpu-benches --bench)
fi
# Gemma 4's full layer (layer 5: head_dim 512, V = K, the V norm) too, whole and chunked.
(run decoder "${DECODER[@]}" --prompt 512 --steps 64 &&
    run decoder-chunked "${DECODER[@]}" --prompt 512 --steps 8 --chunk 128 &&
    run decoder-gemma4 "${GEMMA4[@]}" --layer 5 --prompt 512 --steps 16 &&
    run decoder-gemma4-chunked "${GEMMA4[@]}" --layer 5 --prompt 512 --steps 4 --chunk 128) 2>&1 | tee "$LOG/decoder.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# shellcheck disable=SC2086
run bench "${BENCH[@]}" ${BENCH_ARGS:-} --csv "$LOG/bench.csv" 2>&1 | tee "$LOG/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# CRITERION=<filter> (e.g. d512): the criterion GPU benches whose names hold it.
if [ -n "${CRITERION:-}" ]; then
    run criterion "${CRIT[@]}" "$CRITERION" 2>&1 | tee "$LOG/criterion.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
if [ -n "$SAN" ]; then
    export ROPE_ATTN_SANITIZER=1
    for tool in ${SANITIZE-memcheck racecheck}; do
        while read -r bin; do
            echo "== $tool $(basename "$bin")"
            # ROPE_ATTN_SANITIZER=1: the sweeps at the emulator's lengths (same cases, every code
            # path), since racecheck slows the kernels by orders of magnitude.
            run "$tool $(basename "$bin")" "$SAN" --tool "$tool" --error-exitcode 3 "$bin" --test-threads=1 </dev/null 2>&1 | tail -5
            [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "FAILED $tool $(basename "$bin")"; }
        done < "$LOG/gpu_bins.txt"
    done 2>&1 | tee "$LOG/sanitizer.txt"
    grep -q '^FAILED' "$LOG/sanitizer.txt" && status=1
else
    echo "compute-sanitizer not found: sanitizer runs skipped" | tee "$LOG/sanitizer.txt"
fi
echo "gpu-check: exit $status after $(($(date +%s) - START)) s"
exit $status
