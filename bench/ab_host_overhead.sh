#!/bin/bash
# Interleaved comparison of bench/host_overhead.py between two checkouts (A, B, A, B, ...), on a
# noisy machine: prints each round's p50 total per series and the median B/A ratio.
#   [PYTHON=venv/bin/python] bench/ab_host_overhead.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS=5] [STEPS=300]
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); rounds=${3:-5}; steps=${4:-300}
py=${PYTHON:-python}
tmp=$(mktemp -d)
for i in $(seq 1 "$rounds"); do
  # --rounds is passed only to checkouts whose bench knows it
  for side in old new; do
    dir=${!side}
    extra=$(grep -q -- "--rounds" "$dir/bench/host_overhead.py" && echo "--rounds 1" || true)
    (cd "$dir" && PYTHONPATH="$dir" "$py" bench/host_overhead.py --steps "$steps" $extra --out "$tmp/$side-$i.json" > /dev/null)
  done
done
"$py" - "$tmp" "$rounds" <<'PY'
import json, statistics as st, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for i in range(1, rounds + 1):
    o, n = (json.load(open(f"{tmp}/{s}-{i}.json"))["runs"] for s in ("old", "new"))
    for ro, rn in zip(o, n):
        key = (ro["running_requests"], ro["plus_prefill_chunk"])
        rows.setdefault(key, []).append((ro["total"]["p50_us"], rn["total"]["p50_us"]))
for (n, pre), pairs in rows.items():
    print(f"{n} running{' + prefill chunk' if pre else ''}: old p50 {[round(a) for a, _ in pairs]} us, "
          f"new p50 {[round(b) for _, b in pairs]} us, new/old median {st.median(b / a for a, b in pairs):.3f}")
PY
