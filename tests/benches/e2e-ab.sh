#!/usr/bin/env bash
# Two (or more) daemon builds through the e2e bench's IOMMU table, interleaved: each
# round runs the bench once per build (`VCDEV_BIN`, one run each, the builds in turn),
# then the script prints, for every figure of the bench's target table, the median over
# rounds of each build's value and within-run ratio. For changes whose effect is a few
# tenths of a round trip, which this machine's drift between two separate bench runs
# hides.
#
#   tests/benches/e2e-ab.sh ROUNDS OUTDIR LABEL=BINARY...
#
# The environment goes to the bench (`VCDEV_E2E_PIN=0,0` puts the frontend and the
# daemon on one CPU, `VCDEV_E2E_MODES`, `VCDEV_E2E_REQUESTS`, ...); `VCDEV_E2E_DOORS`
# is off unless set. Each run's whole output is kept as OUTDIR/LABEL.ROUND.txt.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
rounds="$1" out="$2"
shift 2
mkdir -p "$out"
cd "$(dirname "$0")/../.."
bench=$(cargo bench -p vcdev-tests --bench e2e --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "e2e" and m.get("executable"):
        print(m["executable"])')
labels=()
for i in $(seq 1 "$rounds"); do
    for lb in "$@"; do
        label=${lb%%=*} bin=${lb#*=}
        [[ $i -eq 1 ]] && labels+=("$label")
        VCDEV_BIN="$bin" VCDEV_E2E_DOORS="${VCDEV_E2E_DOORS:-off}" VCDEV_E2E_RUNS=1 \
            "$bench" --bench >"$out/$label.$i.txt" 2>&1
        echo "round $i/$rounds $label done" >&2
    done
done

python3 - "$out" "${labels[@]}" <<'EOF'
import glob, re, statistics as st, sys
out, labels = sys.argv[1], sys.argv[2:]

def figures(path):
    rows, inside = {}, False
    for line in open(path):
        if line.startswith('| figure | phase |'):
            inside = True
            continue
        if inside and not line.startswith('|'):
            inside = False
        if not inside or line.startswith('|---'):
            continue
        c = [x.strip() for x in line.strip().strip('|').split('|')]
        m = re.match(r'[0-9.]+', c[3])
        if m:
            rows[(c[0], c[1])] = (float(c[2]), float(m.group(0)), c[4])
    return rows

runs = {lb: [figures(p) for p in sorted(glob.glob(f'{out}/{lb}.*.txt'))] for lb in labels}
head = ' | '.join(f'{lb} value | {lb} ratio (range)' for lb in labels)
print(f'| figure | phase | target | {head} |')
print('|---|---|---|' + '---|---|' * len(labels))
for key, (_, _, target) in runs[labels[0]][0].items():
    cells = []
    for lb in labels:
        have = [r[key] for r in runs[lb] if key in r]
        ratios = [h[1] for h in have]
        cells.append(f'{st.median(h[0] for h in have):.1f} | '
                     f'{st.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})')
    print(f'| {key[0]} | {key[1]} | {target} | ' + ' | '.join(cells) + ' |')
EOF
