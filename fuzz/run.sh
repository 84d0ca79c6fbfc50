#!/bin/bash
# Runs fuzz targets and keeps what they found: fuzz/run.sh [SECONDS] [TARGET...]
#
# Each target (all of them by default, in Cargo.toml's order) runs for SECONDS (default 60)
# from its corpus directory fuzz/corpus/<target>, seeded first by seedgen and by the kept
# corpus fuzz/kept/<target>/. What it found is then minimized into fuzz/kept/<target>/
# (libFuzzer's -set_cover_merge: the fewest inputs that reach every feature reached), which
# is committed, so that each run starts where the last one stopped. One line per target is appended to fuzz/RUNS.md.
#
# A crash (a panic, a sanitizer report, a timeout, a leak) stops the script: the report is
# printed with the path of the input that caused it (under fuzz/artifacts/<target>/), the
# line in RUNS.md says so, and the status is non-zero.
#
# Needs cargo-fuzz (`cargo install --locked cargo-fuzz`); the stable toolchain is enough, as
# RUSTC_BOOTSTRAP=1 lets it take the -Z flags that cargo-fuzz passes.
set -euo pipefail

cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1

SECONDS_EACH=60
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    SECONDS_EACH=$1
    shift
fi
ALL=$(cargo fuzz list)
if [ $# -gt 0 ]; then
    TARGETS=("$@")
    for t in "${TARGETS[@]}"; do
        if ! grep -qx -- "$t" <<<"$ALL"; then
            echo "run.sh: no fuzz target $t (there are: $(echo $ALL))" >&2
            exit 2
        fi
    done
else
    mapfile -t TARGETS <<<"$ALL"
fi

LOGS=target/run-logs
RUNS=RUNS.md
mkdir -p "$LOGS" kept

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# The seeds, written with the codec and the crates as they are now.
log "seeds: seedgen"
cargo run -q -p umdev-fuzz-seedgen -- corpus
log "build: cargo fuzz build -a"
cargo fuzz build -a

if [ ! -f "$RUNS" ]; then
    cat >"$RUNS" <<'EOF'
# Fuzzing runs

One line per target per `fuzz/run.sh` run, appended by the script: how long it ran, how many
inputs it executed and how fast, the coverage libFuzzer reported at the end (`cov:`, edges
reached), how many inputs `fuzz/kept/<target>/` holds after minimizing, and the result.

| date (UTC) | commit | target | seconds | executions | exec/s | cov | kept | result |
| ---------- | ------ | ------ | ------: | ---------: | -----: | --: | ---: | ------ |
EOF
fi
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo '-')

# The last value of libFuzzer's final statistic $2 in log $1.
final_stat() { awk -v k="stat::$2:" '$1 == k {v = $2} END {print v == "" ? "-" : v}' "$1"; }

record() { # target, seconds, log, kept, result
    local execs rate cov
    execs=$(final_stat "$3" number_of_executed_units)
    rate=$(final_stat "$3" average_exec_per_sec)
    cov=$(grep -oE 'cov: [0-9]+' "$3" | tail -n 1 | awk '{print $2}')
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
        "$(date -u +%Y-%m-%dT%H:%MZ)" "$COMMIT" "$1" "$2" "$execs" "$rate" "${cov:--}" "$4" "$5" \
        >>"$RUNS"
    log "$1: $execs executions, $rate exec/s, cov $cov, $4 kept: $5"
}

for t in "${TARGETS[@]}"; do
    logf=$LOGS/$t.log
    mkdir -p "corpus/$t" "kept/$t"
    # The kept corpus seeds the run too (libFuzzer reads every directory it is given, and
    # writes new inputs to the first).
    log "$t: ${SECONDS_EACH}s from corpus/$t and kept/$t (log: fuzz/$logf)"
    # A target's own libFuzzer flags, with the reason, in args/<target>.
    mapfile -t extra < <(grep -v '^#' "args/$t" 2>/dev/null | grep . || true)
    if ! cargo fuzz run -a "$t" "corpus/$t" "kept/$t" -- -max_total_time="$SECONDS_EACH" \
        -timeout=10 -print_final_stats=1 "${extra[@]}" >"$logf" 2>&1; then
        if grep -qE 'panicked at|==ERROR|ERROR: libFuzzer' "$logf"; then
            sed -n '/panicked at\|==ERROR\|ERROR: libFuzzer/,$p' "$logf" | head -n 120
        else
            tail -n 60 "$logf"
        fi
        artifact=$(grep -oE 'Test unit written to [^ ]+' "$logf" | tail -n 1 | cut -d' ' -f5)
        if [ -n "$artifact" ]; then
            artifact=fuzz/${artifact#"$PWD/"}
        else
            artifact="none written, see fuzz/$logf"
        fi
        record "$t" "$SECONDS_EACH" "$logf" "$(find "kept/$t" -type f | wc -l)" \
            "crash: $artifact"
        log "$t crashed; the input: $artifact"
        exit 1
    fi
    # Minimize: merge the kept corpus and this run's into a fresh directory, keeping a
    # smallest set of inputs that reaches every feature, and make that the kept corpus.
    merged=$(mktemp -d "kept/.$t.XXXXXX")
    if ! cargo fuzz run -a "$t" "$merged" "kept/$t" "corpus/$t" -- -set_cover_merge=1 \
        >"$LOGS/$t.merge.log" 2>&1; then
        rm -rf "$merged"
        tail -n 40 "$LOGS/$t.merge.log"
        log "$t: minimizing failed (log: fuzz/$LOGS/$t.merge.log); kept/$t is unchanged"
        exit 1
    fi
    rm -rf "kept/$t"
    mv "$merged" "kept/$t"
    chmod 755 "kept/$t"
    record "$t" "$SECONDS_EACH" "$logf" "$(find "kept/$t" -type f | wc -l)" ok
done
