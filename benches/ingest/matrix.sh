#!/usr/bin/env bash
# benches/ingest/matrix.sh: durable ingest across room counts and durability modes, next
# to the raw redb ceiling, in one run, printed as markdown tables.
#
#   cargo build --release && benches/ingest/matrix.sh
#
# For each of 1, 100 and 10,000 `state` rooms, under `--durability immediate` and
# `none`: `roomd bench ingest` closed loop (8 writers x WINDOW ops in flight: the most
# the server takes) and open loop at RATE ops/s (the ack latency at a given load). Each
# case starts its own server on a temporary data dir (`roomd bench` does that) and
# reports acked ops/s, ack latency p50/p99, the store's commits over 100 ms of any kind
# (a fold the disk held up, which the commit histogram does not time, counts there), and
# the store's commits/s with the events
# and room batches per commit (read from the server's /metrics). Then
# `cargo bench --bench redb_ceiling` appends the same rows in batches of 1, 16 and 256
# with nothing else, and, shaped like each closed-loop run (its events and room batches
# per commit, over the same number of rooms: `ROOMD_CEILING_SHAPES`), the same rows
# spread the same way; the last table sets each run's acked ops/s against that ceiling. The generator shares the 2 cores with the server; loopback only,
# every case bounded by DURATION plus a drain.
#
# The last table checks issue 14's targets (immediate durability, closed loop unless
# said): 100 rooms at most 8 µs of server CPU per acked op and at least half the 1-room
# ceiling at 256 rows per commit; 1 room at least 200,000 acked ops/s; 10,000 rooms at
# least 100,000; open loop at RATE over 100 rooms, ack p99 at most 5 ms. Each row shows
# the raw redb ceiling of the same run beside it.
#
# Environment: DURATION (default 10s), WINDOW (default 256), RATE (default 20000),
# ROOMS (default "1 100 10000"), ENCODING (json or rkyv, default json),
# ROOMD_BIN (default target/release/roomd), RESULTS_DIR (keep every JSON there).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${ROOMD_BIN:-$repo/target/release/roomd}
duration=${DURATION:-10s}
window=${WINDOW:-256}
rate=${RATE:-20000}
rooms_list=${ROOMS:-1 100 10000}
encoding=${ENCODING:-json}

if [[ ! -x $bin ]]; then
  echo "error: $bin is missing; run \`cargo build --release\` first" >&2
  exit 2
fi
work=$(mktemp -d -t roomd-ingest-matrix.XXXXXX)
trap 'rm -rf "$work"' EXIT
results=${RESULTS_DIR:-$work}
mkdir -p "$results"

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for rooms in $rooms_list; do
  for durability in immediate none; do
    for mode in closed open; do
      name="rooms$rooms-$durability-$mode"
      load=(--window "$window")
      [[ $mode == open ]] && load=(--rate "$rate" --window 4096)
      echo "running $name" >&2
      "$bin" bench ingest --json --encoding "$encoding" --writers 8 --rooms "$rooms" "${load[@]}" \
        --duration "$duration" --server-arg="--durability=$durability" \
        >"$results/$name.json"
    done
  done
done

python3 - "$results" "$rooms_list" "$window" "$rate" <<'PY'
import json, sys
results, rooms_list, window, rate = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
print(f"| rooms | durability | load | acked ops/s | ack p50 / p99 ms | server CPU µs per op | generator CPU µs per op | host busy / stolen | commits/s | events / batches per commit | commits over 100 ms | host load |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
pct = lambda v: "-" if v is None else f"{v * 100:.0f}%"
for rooms in rooms_list:
    for durability in ("immediate", "none"):
        for mode in ("closed", "open"):
            with open(f"{results}/rooms{rooms}-{durability}-{mode}.json") as f:
                r = json.load(f)
            lat = r["ack_latency_ms"]
            load = f"{window} in flight x 8" if mode == "closed" else f"{rate}/s offered"
            print(f"| {rooms} | {durability} | {load} | {r['acked_ops_per_s']:,.0f} "
                  f"| {lat['p50']} / {lat['p99']} | {r.get('server_cpu_s_per_million_ops', '-')} "
                  f"| {r.get('generator_cpu_s_per_million_ops', '-')} "
                  f"| {pct(r.get('host_busy'))} / {pct(r.get('host_steal'))} "
                  f"| {r.get('store_commits_per_s', '-')} "
                  f"| {r.get('events_per_commit', '-')} / {r.get('batches_per_commit', '-')} "
                  f"| {r.get('slow_commits_any_kind', '-')} "
                  f"| {r.get('host_load_1m', '-')} |")
PY

# Each closed-loop run's commit shape [events, room batches, rooms], kept in
# shapes.json for the last table, and as EVENTS:ROOM_BATCHES:ROOMS for the ceiling.
shapes=$(python3 - "$results" "$rooms_list" <<'PY'
import json, sys
results, rooms_list = sys.argv[1], sys.argv[2].split()
shapes = {}
for rooms in rooms_list:
    for durability in ("immediate", "none"):
        with open(f"{results}/rooms{rooms}-{durability}-closed.json") as f:
            r = json.load(f)
        events = max(1, round(r["events_per_commit"]))
        batches = min(int(rooms), events, max(1, round(r["batches_per_commit"])))
        shapes[f"{rooms}-{durability}"] = [events, batches, int(rooms)]
with open(f"{results}/shapes.json", "w") as f:
    json.dump(shapes, f)
print(",".join(dict.fromkeys(":".join(map(str, s)) for s in shapes.values())))
PY
)

echo >&2
echo "raw redb ceiling (ROOMD_CEILING_SHAPES=$shapes cargo bench --bench redb_ceiling):" >&2
(cd "$repo" && ROOMD_CEILING_SHAPES=$shapes cargo bench --bench redb_ceiling 2>/dev/null) \
  >"$results/ceiling.txt"
grep -v '^{' "$results/ceiling.txt"

echo
python3 - "$results" "$rooms_list" <<'PY'
import json, sys
results, rooms_list = sys.argv[1], sys.argv[2].split()
with open(f"{results}/ceiling.txt") as f:
    ceiling = json.loads([l for l in f if l.startswith("{")][-1])
with open(f"{results}/shapes.json") as f:
    shapes = json.load(f)
plain = {r["durability"]: r["appends_per_s"] for r in ceiling["results"]
         if r["quick_repair"] and r["batch"] == 256}
print("| rooms | durability | acked ops/s (closed loop) | shaped ceiling appends/s | ratio | 1-room ceiling at 256 per commit | ratio |")
print("|---|---|---|---|---|---|---|")
for rooms in rooms_list:
    for durability in ("immediate", "none"):
        with open(f"{results}/rooms{rooms}-{durability}-closed.json") as f:
            r = json.load(f)
        events, batches, _ = shapes[f"{rooms}-{durability}"]
        shaped = next(s["appends_per_s"] for s in ceiling["shaped"]
                      if s["durability"] == durability and s["events"] == events
                      and s["room_batches"] == batches and s["rooms"] == int(rooms))
        acked = r["acked_ops_per_s"]
        print(f"| {rooms} | {durability} | {acked:,.0f} | {shaped:,.0f} ({events} events over "
              f"{batches} rooms) | {shaped / acked:.2f}x | {plain[durability]:,.0f} "
              f"| {plain[durability] / acked:.2f}x |")
PY

echo
python3 - "$results" "$rooms_list" "$rate" <<'PY'
import json, os, sys
results, rooms_list, rate = sys.argv[1], sys.argv[2].split(), sys.argv[3]
with open(f"{results}/ceiling.txt") as f:
    ceiling = json.loads([l for l in f if l.startswith("{")][-1])
with open(f"{results}/shapes.json") as f:
    shapes = json.load(f)
plain = next(r["appends_per_s"] for r in ceiling["results"]
             if r["quick_repair"] and r["batch"] == 256 and r["durability"] == "immediate")
def run(rooms, mode):
    path = f"{results}/rooms{rooms}-immediate-{mode}.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
def shaped(rooms):
    events, batches, _ = shapes[f"{rooms}-immediate"]
    return next(s["appends_per_s"] for s in ceiling["shaped"]
                if s["durability"] == "immediate" and s["events"] == events
                and s["room_batches"] == batches and s["rooms"] == int(rooms))
print("Targets (issue 14; immediate durability):")
print()
print("| target | measured | raw redb ceiling in this run | met |")
print("|---|---|---|---|")
def row(target, measured, ceiling, met):
    print(f"| {target} | {measured} | {ceiling} | {'yes' if met else '**no**'} |")
r = run(100, "closed")
if r:
    cpu = r.get("server_cpu_s_per_million_ops")
    row("100 rooms: server CPU per acked op <= 8 µs", f"{cpu} µs", "-", cpu is not None and cpu <= 8)
    acked = r["acked_ops_per_s"]
    row("100 rooms: acked ops/s >= half the 1-room ceiling at 256 rows/commit",
        f"{acked:,.0f} ({acked / plain:.2f} of it)",
        f"{plain:,.0f} (shaped like this run: {shaped(100):,.0f})", acked >= plain / 2)
r = run(1, "closed")
if r:
    acked = r["acked_ops_per_s"]
    row("1 room: acked ops/s >= 200,000", f"{acked:,.0f}", f"{shaped(1):,.0f} (shaped)", acked >= 200_000)
r = run(10000, "closed")
if r:
    acked = r["acked_ops_per_s"]
    row("10,000 rooms: acked ops/s >= 100,000", f"{acked:,.0f}", f"{shaped(10000):,.0f} (shaped)", acked >= 100_000)
r = run(100, "open")
if r:
    p99 = r["ack_latency_ms"]["p99"]
    row(f"100 rooms, {int(rate):,} ops/s offered: ack p99 <= 5 ms", f"{p99} ms", "-", p99 <= 5)
PY
