#!/usr/bin/env bash
# benches/peers/run.sh: the same `roomd bench fanout` scenarios against roomd and two
# popular Node.js broadcast servers (the `ws` library and Socket.IO 4), normalised by
# each server's CPU time, printed as a markdown table.
#
#   cargo build --release && benches/peers/run.sh
#
# Installs ws and socket.io from npm into a temporary folder (removed at the end),
# starts each peer from the small JS file next to this script on 127.0.0.1 (one room,
# every message broadcast to all other clients), and reads the peer's CPU time and RSS
# from /proc through `--server-pid`. roomd is started by `roomd bench` itself, with its
# defaults (durability immediate) and raised op limits. Loopback only; every run is
# bounded by DURATION plus connection setup and a 10 s drain.
#
# Environment: DURATION (default 20s), ROOMD_BIN (default target/release/roomd),
# RESULTS_DIR (keep the JSON of every run there), SCENARIOS (default "F1 F2 F3 F4"; F3 is
# F2 at twice the rate, F4 at 2.5 times and roomd only),
# TARGETS (default "roomd ws socketio").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${ROOMD_BIN:-$repo/target/release/roomd}
duration=${DURATION:-20s}
scenarios=${SCENARIOS:-F1 F2 F3 F4}
targets=${TARGETS:-roomd ws socketio}

declare -A scenario_args=(
  [F1]="--subscribers 5000 --rate 100 --size 100"
  [F2]="--subscribers 1000 --rate 1000 --size 100"
  # Twice F2's rate: 2,000,000 deliveries/s offered, far past where the peers saturate,
  # to measure roomd's rate and cost next to the peers' best.
  [F3]="--subscribers 1000 --rate 2000 --size 100"
  # 2,500,000/s: 10x the peers' best when they run fast (ws reached 228k-265k/s here).
  [F4]="--subscribers 1000 --rate 2500 --size 100"
)
# Scenarios run against some targets only: the peers are saturated from F2 on, so F4
# would only repeat their F3.
declare -A scenario_targets=(
  [F4]="roomd"
)

if [[ ! -x $bin ]]; then
  echo "error: $bin is missing; run \`cargo build --release\` first" >&2
  exit 2
fi

work=$(mktemp -d -t roomd-peers.XXXXXX)
results=${RESULTS_DIR:-$work/results}
mkdir -p "$results"
peer_pid=""
cleanup() {
  if [[ -n $peer_pid ]]; then
    kill "$peer_pid" 2>/dev/null || true
    wait "$peer_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "installing ws and socket.io into $work ..." >&2
(
  cd "$work"
  npm init -y >/dev/null
  npm install --no-audit --no-fund --loglevel=error ws@8 socket.io@4 >&2
)

# Every subscriber is a socket in the generator and one in the peer (roomd bench raises
# its own limit and its server's; the node peers inherit this shell's).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_peer() {
  local script=$1 log="$work/$1.log"
  NODE_PATH="$work/node_modules" node "$here/$script" >"$log" 2>&1 &
  peer_pid=$!
  for _ in $(seq 1 100); do
    peer_port=$(sed -n 's/^listening on //p' "$log" | head -n 1)
    if [[ -n $peer_port ]]; then
      return 0
    fi
    sleep 0.1
  done
  echo "error: $script did not start:" >&2
  cat "$log" >&2
  exit 1
}

stop_peer() {
  kill "$peer_pid" 2>/dev/null || true
  wait "$peer_pid" 2>/dev/null || true
  peer_pid=""
}

for scenario in $scenarios; do
  for target in $targets; do
    if [[ -n ${scenario_targets[$scenario]:-} && " ${scenario_targets[$scenario]} " != *" $target "* ]]; then
      continue
    fi
    # shellcheck disable=SC2206 # the scenario's flags are meant to split
    args=(bench fanout ${scenario_args[$scenario]} --duration "$duration" --json)
    echo "== $scenario against $target" >&2
    case $target in
      roomd) ;;
      ws)
        start_peer ws_server.js
        args+=(--target ws --url "ws://127.0.0.1:$peer_port" --server-pid "$peer_pid")
        ;;
      socketio)
        start_peer socketio_server.js
        args+=(--target socketio --url "ws://127.0.0.1:$peer_port" --server-pid "$peer_pid")
        ;;
      *)
        echo "error: unknown target $target" >&2
        exit 2
        ;;
    esac
    echo "\$ roomd ${args[*]}" >&2
    if ! "$bin" "${args[@]}" >"$results/$scenario-$target.json"; then
      echo "{\"error\":\"roomd bench failed\"}" >"$results/$scenario-$target.json"
    fi
    if [[ $target != roomd ]]; then
      stop_peer
    fi
  done
done

# The table: one row per run, CPU per million deliveries relative to roomd's.
node - "$results" "$scenarios" "$targets" <<'JS'
const fs = require('fs');
const path = require('path');
const [dir, scenarios, targets] = process.argv.slice(2);
const fmt = (v, d = 1) => (v === null || v === undefined || Number.isNaN(v) ? 'n/a' : Number(v).toFixed(d));
const rows = [];
rows.push('| scenario | server | deliveries/s | frames/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | dup | server CPU s per 1M deliveries | CPU vs roomd | server RSS MiB |');
rows.push('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
for (const scenario of scenarios.split(/\s+/).filter(Boolean)) {
  const file = (target) => path.join(dir, `${scenario}-${target}.json`);
  const read = (target) => {
    try { return JSON.parse(fs.readFileSync(file(target), 'utf8')); }
    catch (e) { return { error: String(e) }; }
  };
  const base = read('roomd');
  for (const target of targets.split(/\s+/).filter(Boolean)) {
    if (!fs.existsSync(file(target))) continue; // not run in this scenario
    const r = read(target);
    if (r.error) { rows.push(`| ${scenario} | ${target} | failed: ${r.error} ||||||||||`); continue; }
    const l = r.latency_ms || {};
    // A server that closed the publisher's connection cut the run short (its JSON says why).
    const cut = (r.notes || []).some((n) => n.startsWith("the publisher's connection ended"));
    const server = cut ? `${target} (closed the publisher early)` : target;
    const ratio = base && base.server_cpu_s_per_million && r.server_cpu_s_per_million
      ? `${(r.server_cpu_s_per_million / base.server_cpu_s_per_million).toFixed(2)}×` : 'n/a';
    rows.push(`| ${scenario} | ${server} | ${fmt(r.deliveries_per_s, 0)} | ${fmt(r.frames_per_s, 0)} | ${fmt(l.p50, 2)} | ${fmt(l.p99, 2)} | ${fmt(l.p999, 2)} | ${fmt(l.max, 2)} | ${r.lost} | ${r.duplicated} | ${fmt(r.server_cpu_s_per_million, 2)} | ${ratio} | ${fmt(r.server_rss_mb, 0)} |`);
  }
}
console.log(rows.join('\n'));
console.log('\nlost = expected deliveries not seen within the 10 s drain after the last post; ' +
  'CPU vs roomd = server CPU seconds per million deliveries, relative to roomd in the same scenario.');

// Rates side by side: each peer's best deliveries/s over all scenarios (where it
// saturates), against roomd's best among the scenarios it served with nothing lost and
// p99 <= 25 ms, and the server CPU per delivery in that same roomd scenario.
const all = {};
for (const scenario of scenarios.split(/\s+/).filter(Boolean)) {
  for (const target of targets.split(/\s+/).filter(Boolean)) {
    try {
      const r = JSON.parse(fs.readFileSync(path.join(dir, `${scenario}-${target}.json`), 'utf8'));
      if (!r.error) (all[target] = all[target] || []).push({ ...r, scenario });
    } catch (e) { /* a failed run is already in the table */ }
  }
}
const good = (all.roomd || []).filter((r) => r.lost === 0 && r.duplicated === 0
  && r.latency_ms && r.latency_ms.p99 <= 25);
if (good.length > 0) {
  const best = good.reduce((a, b) => (b.deliveries_per_s > a.deliveries_per_s ? b : a));
  console.log(`\nroomd's best with nothing lost and p99 <= 25 ms: ${best.scenario}, ` +
    `${fmt(best.deliveries_per_s, 0)} deliveries/s at p99 ${fmt(best.latency_ms.p99, 2)} ms, ` +
    `${fmt(best.server_cpu_s_per_million, 3)} CPU-s per 1M deliveries.`);
  for (const target of Object.keys(all).filter((t) => t !== 'roomd')) {
    const peak = all[target].reduce((a, b) => (b.deliveries_per_s > a.deliveries_per_s ? b : a));
    const cheapest = Math.min(...all[target].map((r) => r.server_cpu_s_per_million));
    console.log(`${target}: best ${fmt(peak.deliveries_per_s, 0)} deliveries/s (${peak.scenario}, ` +
      `p99 ${fmt(peak.latency_ms.p99, 0)} ms): roomd ${fmt(best.deliveries_per_s / peak.deliveries_per_s, 2)}× ` +
      `the rate; lowest ${fmt(cheapest, 2)} CPU-s per 1M: roomd ` +
      `${fmt(cheapest / best.server_cpu_s_per_million, 2)}× the deliveries per CPU-second.`);
  }
} else {
  console.log('\nroomd served no scenario with nothing lost and p99 <= 25 ms.');
}
JS
