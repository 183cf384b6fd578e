#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS, one after another
# (one job each), on a scratch copy of its committed seed corpus. Prints
# per target: executions, coverage (libFuzzer's final cov: and ft:) and
# crashes; exits non-zero if any target crashed (or could not run).
#
#   tests/fuzz/run.sh SECONDS [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz. Environment:
#   FUZZ_TARGET_DIR  build directory (default: target/fuzz at the repo root)
#   FUZZ_OUT         where corpora, logs and crash artifacts go
#                    (default: a new temporary directory, kept)
#   FUZZ_ARGS        extra libFuzzer options
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 SECONDS [TARGET...]" >&2
    exit 2
fi
secs=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
all=(vhost_user_stream cdev_frames blk_chains iommufd_model)
targets=("${@:-${all[@]}}")
target_dir=${FUZZ_TARGET_DIR:-$root/target/fuzz}
out=${FUZZ_OUT:-$(mktemp -d /tmp/vcdev-fuzz.XXXXXX)}
mkdir -p "$out"

echo "== building ${targets[*]} (target dir $target_dir)"
for t in "${targets[@]}"; do
    cargo +nightly fuzz build --fuzz-dir tests/fuzz --target-dir "$target_dir" "$t"
done
bin_dir=$target_dir/x86_64-unknown-linux-gnu/release

failed=0
summary=()
for t in "${targets[@]}"; do
    corpus=$out/corpus/$t
    artifacts=$out/artifacts/$t/
    log=$out/$t.log
    mkdir -p "$corpus" "$artifacts"
    cp -r "$here/corpus/$t/." "$corpus/" 2>/dev/null || true
    echo "== $t: ${secs}s (log $log)"
    rc=0
    start=$SECONDS
    # -timeout: one input may take at most 30 s (a hang is a crash);
    # -rss_limit_mb: the daemon's RAM disks reserve address space, not RSS.
    # The targets that start threads (queue workers, cdev file threads,
    # detached as in the daemon, still exiting when an input returns) run
    # without LeakSanitizer's per-input check: it reports their stacks.
    leaks=1
    case $t in vhost_user_stream | cdev_frames) leaks=0 ;; esac
    # With -jobs=1 libFuzzer runs one worker process, logged to
    # fuzz-0.log in the current directory: a directory of its own.
    work=$out/work/$t
    rm -rf "$work"
    mkdir -p "$work"
    # shellcheck disable=SC2086
    (cd "$work" && "$bin_dir/$t" -max_total_time="$secs" -jobs=1 -workers=1 \
        -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 -detect_leaks=$leaks \
        -artifact_prefix="$artifacts" ${FUZZ_ARGS:-} "$corpus") >"$log" 2>&1 || rc=$?
    [[ -f "$work/fuzz-0.log" ]] && cat "$work/fuzz-0.log" >>"$log"
    took=$((SECONDS - start))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    # libFuzzer's status lines: "#N<TAB>DONE   cov: C ft: F ..." at the
    # end, "#N<TAB>pulse/NEW/REDUCE ..." before (the last one if it died).
    final=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    [[ -z "$final" ]] && final=$(grep -E '^#[0-9]+[[:space:]].*cov:' "$log" | tail -1 || true)
    cov=$(grep -o 'cov: [0-9]*' <<<"$final" | grep -o '[0-9]*' || true)
    ft=$(grep -o 'ft: [0-9]*' <<<"$final" | grep -o '[0-9]*' || true)
    crashes=$(find "$artifacts" -type f | wc -l)
    line=$(printf '%-18s %6ss  execs %-10s cov %-6s ft %-6s crashes %s' \
        "$t" "$took" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$crashes")
    summary+=("$line")
    echo "$line"
    if [[ $rc -ne 0 || $crashes -ne 0 ]]; then
        failed=1
        echo "!! $t failed (exit $rc); the end of its log:" >&2
        tail -40 "$log" >&2
        find "$artifacts" -type f >&2
    fi
done

echo "== fuzz summary (${secs}s per target; corpora, logs, artifacts in $out)"
printf '%s\n' "${summary[@]}"
exit $failed
