#!/usr/bin/env bash
# Racecheck on the CPU: the emulated test suites with the feature `racecheck`, where every kernel
# runs under ThreadSanitizer and a shared- or global-memory access that CUDA does not order
# against another thread's (no __syncthreads, __syncwarp or cp.async wait between them; a
# shuffle, vote, ldmatrix or mma orders nothing) fails its launch (kernels/emu/simt.cpp).
# compute-sanitizer's racecheck sees the interleavings one GPU run takes; this sees every one the
# happens-before allows. Needs gcc's libtsan (it comes with gcc). About 12 minutes on 2 cores.
#
#     ./scripts/emu-racecheck.sh            # all the emulated suites
#     ./scripts/emu-racecheck.sh emu_decode # one suite (extra arguments go to cargo test)
#
# emu_corrupt_inputs is left out: it checks faults on guard pages, whose signal handling
# ThreadSanitizer defers. If ThreadSanitizer cannot start on this machine at all (its fixed
# memory layout against the kernel's), the script says so and exits 0: that is the machine's limit,
# not a race.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-nvcc.sh >/dev/null || exit 1
suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(emu_rope_scores emu_qk_norm emu_gated_query emu_attention emu_paged_prefill emu_decode emu_head_dim_512)
args=()
for s in "${suites[@]}"; do
    case "$s" in emu_*) args+=(--test "$s") ;; *) args+=("$s") ;; esac
done
# First the emulator's own canaries (races planted in kernels/emu/selftest.cpp must be found).
log=$(mktemp)
cargo test --release --features emulator,racecheck --lib emulator::tests 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && grep -q "ThreadSanitizer: \(unexpected memory mapping\|failed to\)\|FATAL: ThreadSanitizer" "$log"; then
    echo "racecheck SKIPPED: ThreadSanitizer cannot run on this machine (see above)"
    rm -f "$log"
    exit 0
fi
rm -f "$log"
[ "$rc" -eq 0 ] || { echo "racecheck: the emulator's own race canaries failed"; exit 1; }
cargo test --release --features emulator,racecheck "${args[@]}" -- --test-threads=2
rc=$?
[ "$rc" -eq 0 ] && echo "racecheck: no data race in ${suites[*]}" || echo "racecheck: FAILED (a launch above names its kernel; ThreadSanitizer's report shows both accesses)"
exit $rc
