#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each one for a set time, one after the
# other; prints, per target, the executions, the coverage libFuzzer reached and any
# crash it saved.
#
# Usage: scripts/fuzz.sh [seconds-per-target] [target...]
#   seconds-per-target  default 60
#   target              decode, blob_map, commands (default: all three)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Targets are built
# as `cargo fuzz` does by default: optimized, with debug assertions and overflow checks,
# under AddressSanitizer. Each run starts from the committed seeds (fuzz/seeds/<target>)
# and past crash inputs (fuzz/regressions/<target>), and grows its own corpus in
# fuzz/corpus/<target> (not committed), so successive runs build on each other.
# Logs: fuzz/artifacts/<target>.log. Exit status 1 if any target crashed.
set -euo pipefail

secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(decode blob_map commands)
fi
case "$secs" in
    '' | *[!0-9]*)
        echo "usage: $0 [seconds-per-target] [target...]" >&2
        exit 2
        ;;
esac

cd "$(dirname "$0")/../fuzz"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz (and rustup toolchain install nightly)" >&2
    exit 2
fi

mkdir -p artifacts
echo "building the fuzz targets (nightly, release, debug assertions, ASan)..."
if ! cargo +nightly fuzz build >artifacts/build.log 2>&1; then
    cat artifacts/build.log >&2
    exit 2
fi

failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t" "regressions/$t"
    log="artifacts/$t.log"
    echo "== $t: ${secs} s (log: fuzz/$log)"
    start=$SECONDS
    set +e
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" "regressions/$t" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    took=$((SECONDS - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # A crash ends the run before the final stats: take the last status line.
        execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -1)
        rate=$(grep -o 'exec/s: [0-9]*' "$log" | tail -1 | sed 's/exec\/s: //')
    fi
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    line="$t: ${execs:-?} executions in ${took} s (${rate:-?}/s), ${cov:-no coverage line}, corpus ${corpus} inputs"
    if [ -n "$crash" ] || [ "$rc" -ne 0 ]; then
        failed=1
        line="$line, CRASH (exit $rc): ${crash:-see fuzz/$log}"
        grep -m1 -E "panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer" "$log" || true
    else
        line="$line, no crash"
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
