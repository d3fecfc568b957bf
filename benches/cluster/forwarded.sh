#!/usr/bin/env bash
# The added latency of a forwarded op and of a remote subscription, against local, in
# the same run: one nats-server and two roomd nodes (a, b) on 127.0.0.1, and
# `roomd bench ingest` / `roomd bench fanout` pointed at node a with one room each run.
# Each run's room is owned by a or by b (rendezvous hashing of a random name), so runs
# are classified afterwards by the new room's owner (the `node` of GET /api/rooms, which
# lists every node's rooms): local, or forwarded / relayed through b. A relayed delivery
# goes through the room's feed: b publishes each batch once on the room's subject and a
# fans it out to its subscribers.
#
#   benches/cluster/forwarded.sh [RUNS]     (default 6 runs of each bench; release build)
runs=${1:-6}
source "$(dirname "$0")/lib.sh"

start_nats
for id in a b; do
  start_node "$id" --cluster-nats "nats://127.0.0.1:$nats_port" --node-id "$id" --cluster-nodes a,b
done
a_pid=${pid[a]}
url="ws://127.0.0.1:${port[a]}"
rooms_on_a() { curl -s "http://127.0.0.1:${port[a]}/api/rooms?prefix=$1&limit=1000" >"$work/rooms-$2.json"; }
# "local" when the room that appeared between the two listings is a's, else $1.
where_new() {
  python3 - "$work/rooms-before.json" "$work/rooms-after.json" "$1" <<'PY'
import json, sys
before = {r["room"] for r in json.load(open(sys.argv[1]))["rooms"]}
new = [r for r in json.load(open(sys.argv[2]))["rooms"] if r["room"] not in before]
print("local" if new and new[0].get("node", "a") == "a" else sys.argv[3])
PY
}

# server_cpu_s is node a's alone (the node the clients are connected to): for a
# forwarded op or a relayed delivery the owner (b) does part of the work and is not
# counted, so compare latencies, not this column, across the two classes.
echo "kind,where,p50_ms,p99_ms,per_s,node_a_cpu_s,lost,duplicated"
for i in $(seq "$runs"); do
  rooms_on_a state:ingest before
  "$bin" bench ingest --url "$url" --server-pid "$a_pid" --json --writers 1 --window 1 --rooms 1 \
    --duration 3s >"$work/ingest-$i.json"
  rooms_on_a state:ingest after
  where=$(where_new forwarded)
  python3 - "$work/ingest-$i.json" "$where" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
lat = r["ack_latency_ms"]
print(f"ingest-op,{sys.argv[2]},{lat.get('p50')},{lat.get('p99')},{r['acked_ops_per_s']},{r.get('server_cpu_s')},{r['unanswered']},-")
PY
done
for i in $(seq "$runs"); do
  rooms_on_a chat:fanout before
  "$bin" bench fanout --url "$url" --server-pid "$a_pid" --json --subscribers 100 --rate 100 --rooms 1 \
    --duration 3s >"$work/fanout-$i.json"
  rooms_on_a chat:fanout after
  where=$(where_new relayed)
  python3 - "$work/fanout-$i.json" "$where" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
lat = r["latency_ms"]
print(f"fanout-delivery,{sys.argv[2]},{lat.get('p50')},{lat.get('p99')},{r['deliveries_per_s']},{r.get('server_cpu_s')},{r['lost']},{r['duplicated']}")
PY
done
