#!/usr/bin/env bash
# Compares two roomd builds with `roomd bench ingest`, alternated so that a machine that
# changes speed during the comparison weighs on both alike: N rounds, A then B in odd
# rounds and B then A in even ones. Prints each build's medians and the median of the
# per-round ratios B/A of server CPU per op, of acked ops/s and of the ack p99.
#
#   benches/ingest/pairs.sh A_BIN B_BIN N [roomd bench ingest flags...]   (8 writers unless said)
#   benches/ingest/pairs.sh /tmp/roomd-main target/release/roomd 6 --rooms 100 --window 256 --duration 4s
#
# An A/A run (one build against a copy of itself) shows the noise to beat: on the
# project's 2-core machines, 6 rounds put single ratios between 0.76 and 1.15.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
a=$1 b=$2 n=$3
shift 3
out=$(mktemp)
trap 'rm -f "$out" "$out.json"' EXIT
for i in $(seq 1 "$n"); do
  if [ $((i % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for tag in $order; do
    bin=$a
    [ "$tag" = B ] && bin=$b
    "$bin" bench ingest --json "$@" >"$out.json" 2>/dev/null
    python3 - "$out.json" "$i" "$tag" >>"$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[2], sys.argv[3], r["acked_ops_per_s"], r["server_cpu_s_per_million_ops"],
      r["ack_latency_ms"]["p50"], r["ack_latency_ms"]["p99"], r["nacked"] + r["unanswered"])
PY
  done
done
python3 - "$out" <<'PY'
import statistics as st, sys
rounds = {}
for line in open(sys.argv[1]):
    i, tag, ops, cpu, p50, p99, lost = line.split()
    rounds.setdefault(i, {})[tag] = (float(ops), float(cpu), float(p50), float(p99), int(lost))
for tag in "AB":
    runs = [r[tag] for r in rounds.values()]
    print(f"{tag}: acked ops/s {st.median(x[0] for x in runs):,.0f}, server CPU µs per op "
          f"{st.median(x[1] for x in runs):.2f}, ack p50 / p99 {st.median(x[2] for x in runs):.2f} / "
          f"{st.median(x[3] for x in runs):.2f} ms (medians), lost {sum(x[4] for x in runs)}")
cpu = [r["B"][1] / r["A"][1] for r in rounds.values()]
ops = [r["B"][0] / r["A"][0] for r in rounds.values()]
print("B/A server CPU per op:", " ".join(f"{x:.3f}" for x in cpu), f"median {st.median(cpu):.3f}")
print("B/A acked ops/s:      ", " ".join(f"{x:.3f}" for x in ops), f"median {st.median(ops):.3f}")
p99 = [r["B"][3] / r["A"][3] for r in rounds.values()]
print("B/A ack p99:          ", " ".join(f"{x:.3f}" for x in p99), f"median {st.median(p99):.3f}")
PY
