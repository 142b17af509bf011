#!/usr/bin/env bash
# Device: ncu A/B of Hopper kernel variants on one shape (scripts/ncu_ab.py). Usage:
#   scripts/ncu_ab.sh OUTDIR B,H,S,D CAUSAL [ALT_KERNEL.py ...]
set -u
out=$1; shift
S=smsp__average_warps_issue_stalled
M=gpu__time_duration.sum,sm__cycles_elapsed.max,smsp__inst_executed.sum,smsp__cycles_active.avg
M=$M,smsp__issue_active.avg.pct_of_peak_sustained_active
M=$M,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for r in no_instruction barrier long_scoreboard wait math_pipe_throttle membar short_scoreboard \
         branch_resolving sleeping dispatch_stall mio_throttle misc selected not_selected \
         imc_miss drain lg_throttle; do
  M=$M,${S}_${r}_per_issue_active.ratio
done
PYTHONPATH=. timeout 300 ncu -k regex:hopper --metrics "$M" --csv \
  python scripts/ncu_ab.py "$@" > "$out/ncu_ab.csv" 2> "$out/ncu_ab.err"
tail -5 "$out/ncu_ab.err"
grep -v '^==' "$out/ncu_ab.csv" | python3 -c '
import csv, sys
from collections import defaultdict
lines = sys.stdin.read().splitlines()
# The profiled program prints first: the table starts at the ncu header row.
lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith(chr(34) + "ID")):]
rows = list(csv.reader(lines))
hdr = rows[0]
i, mn, mv = hdr.index("ID"), hdr.index("Metric Name"), hdr.index("Metric Value")
d = defaultdict(dict)
for r in rows[1:]:
    if len(r) > mv:
        d[r[i]][r[mn]] = r[mv]
for n in sorted({k for v in d.values() for k in v}):
    print(f"{n[:78]:78s}", " ".join(f"{d[k].get(n, chr(32)):>13s}" for k in sorted(d, key=int)))
'
grep -v '^==\|^"' "$out/ncu_ab.csv" | head
