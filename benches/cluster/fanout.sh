#!/usr/bin/env bash
# Server CPU per delivery through the cluster against a single node, in the same run:
# one nats-server (with its monitoring port), a single roomd `s` (no cluster) and a
# cluster of three (a, b, c), all on 127.0.0.1, release build. Each round runs
# `roomd bench fanout` three times, in turn:
#   single    publisher and subscribers on s;
#   cluster1  publisher on a (the rooms' owner), subscribers on b;
#   cluster2  publisher on a, subscribers spread over b and c.
# The rooms of the cluster runs are named so that node a owns them (rendezvous hashing,
# the same as src/cluster/hrw.rs). The server CPU is every node's in the run (a's
# included); nats-server's CPU and its bytes out are reported apart, as are the bytes the
# owner published on room subjects (payload only) per message.
#
#   benches/cluster/fanout.sh [ROUNDS] [SUBSCRIBERS] [RATE] [DURATION]
#   (defaults: 3 rounds, 2000 subscribers in one room, 100 posts/s, 10s)
rounds=${1:-3}
subs=${2:-2000}
rate=${3:-100}
duration=${4:-10s}
source "$(dirname "$0")/lib.sh"
ulimit -n 20000 2>/dev/null || true

start_nats monitor
node_limits+=(--handshakes-per-ip 1000000 --handshakes-total 1000000)
start_node s
for id in a b c; do
  start_node "$id" --cluster-nats "nats://127.0.0.1:$nats_port" --node-id "$id" --cluster-nodes a,b,c
done
url() { echo "ws://127.0.0.1:${port[$1]}"; }

# A room prefix P whose room P-0 node a owns.
owned_by_a() {
  PYTHONPATH=benches/cluster python3 - "$1" <<'PY'
import sys
from hrw import owner
base = sys.argv[1]
for i in range(1000):
    prefix = f"{base}{i}"
    if owner(prefix + "-0", "abc") == "a":
        print(prefix)
        break
PY
}
nats_stat() { # cpu seconds and bytes out of nats-server
  local ticks
  ticks=$(awk '{print $14 + $15}' "/proc/$nats_pid/stat")
  echo "$ticks $(curl -s "http://127.0.0.1:$nats_mon/varz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["out_bytes"])')"
}

run() { # mode, bench flags...
  local mode=$1; shift
  local before after
  before=$(nats_stat)
  "$bin" bench fanout --json --subscribers "$subs" --rate "$rate" --rooms 1 --duration "$duration" \
    "$@" >"$work/out.json"
  after=$(nats_stat)
  python3 - "$work/out.json" "$mode" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mode = sys.argv[2]
(t0, b0), (t1, b1) = (map(float, sys.argv[3].split()), map(float, sys.argv[4].split()))
hz = float(sys.argv[5])
lat = r["latency_ms"]
servers = r.get("servers_cpu_s") or [r.get("server_cpu_s")]
msgs = r.get("feed_messages", 0)
fb = r.get("feed_bytes", 0)
nats_cpu = (t1 - t0) / hz if mode != "single" else 0.0
nats_out = b1 - b0 if mode != "single" else 0
print(",".join(str(x) for x in [
    mode, r["delivered"], r["lost"], r["duplicated"], round(r["deliveries_per_s"]),
    lat.get("p50"), lat.get("p99"), r.get("server_cpu_s"), r.get("server_cpu_s_per_million"),
    "/".join(str(s) for s in servers), msgs, round(fb / msgs) if msgs else "-",
    round(nats_cpu, 2), round(nats_out / msgs) if msgs else "-",
]))
PY
}

echo "mode,delivered,lost,duplicated,deliveries_per_s,p50_ms,p99_ms,server_cpu_s,server_cpu_s_per_1M,cpu_per_server_s,feed_msgs,feed_bytes_per_msg,nats_cpu_s,nats_out_bytes_per_msg"
for round in $(seq "$rounds"); do
  run single --url "$(url s)" --server-pid "${pid[s]}" --room-prefix "chat:single-$round"
  prefix=$(owned_by_a "chat:c1-$round-")
  run cluster1 --url "$(url a)" --server-pid "${pid[a]}" --room-prefix "$prefix" \
    --subscriber-url "$(url b)" --subscriber-pid "${pid[b]}"
  prefix=$(owned_by_a "chat:c2-$round-")
  run cluster2 --url "$(url a)" --server-pid "${pid[a]}" --room-prefix "$prefix" \
    --subscriber-url "$(url b)" --subscriber-pid "${pid[b]}" \
    --subscriber-url "$(url c)" --subscriber-pid "${pid[c]}"
done
