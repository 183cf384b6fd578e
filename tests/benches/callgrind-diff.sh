#!/usr/bin/env bash
# Per-function instructions per request from two callgrind runs of the storage bench's
# callgrind mode (`VCDEV_BENCH_CALLGRIND=DIR`, see tests/benches/storage.rs): the
# difference of each function's Ir between the run with N2 requests and the run with N1,
# divided by N2 - N1, so that start-up and shutdown cancel out.
#
#   tests/benches/callgrind-diff.sh [--inclusive] [--top N] SMALL LARGE REQUESTS
#
# SMALL and LARGE are the per-thread files of the same thread (e.g.
# DIR/vcdev-sync-buffered.randread-4K-QD1.1000.out-04 and ...5000.out-04), REQUESTS is
# N2 - N1. Prints the top N (40) functions by cost per request, largest first: exclusive
# by default, inclusive with --inclusive. Needs callgrind_annotate (valgrind).
set -euo pipefail

incl=no
top=40
while [[ $# -gt 0 ]]; do
    case "$1" in
        --inclusive) incl=yes; shift ;;
        --top) top="$2"; shift 2 ;;
        *) break ;;
    esac
done
if [[ $# -ne 3 ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
small="$1" large="$2" n="$3"

# "Ir (pct)  file:function [object]" -> "Ir<TAB>function", one line per function. With
# debug information a function is listed once per source file its code came from (inlined
# code): exclusive costs add up, an inclusive cost is the largest of them.
table() {
    callgrind_annotate --threshold=100 --auto=no --inclusive="$incl" "$1" |
        awk -v incl="$incl" '/^ *[0-9,]+ +\([ 0-9.]+%\) / && !/PROGRAM TOTALS/ {
            ir = $1; gsub(",", "", ir)
            sub(/^ *[0-9,]+ +\([ 0-9.]+%\) +/, "")
            sub(/ \[[^]]*\]$/, "")
            sub(/^(\?\?\?|[^ ]*\.(rs|c|S|h)):/, "")
            if (incl == "yes") { if (ir + 0 > sum[$0] + 0) sum[$0] = ir }
            else sum[$0] += ir
        }
        END { for (f in sum) printf "%s\t%s\n", sum[f], f }'
}

awk -F'\t' -v n="$n" '
    FNR == NR { a[$2] = $1; next }
    { b[$2] = $1 }
    END {
        for (f in a) if (!(f in b)) b[f] = 0
        for (f in b) printf "%10.1f  %s\n", (b[f] - a[f]) / n, f
    }' <(table "$small") <(table "$large") |
    sort -g -r | awk '$1 >= 1 || $1 <= -1' | head -n "$top"
