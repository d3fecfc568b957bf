#!/usr/bin/env bash
# How long `roomd cluster rebalance` takes, and how long a moving room refuses ops, on
# one machine: one nats-server and roomd nodes a, b (list a,b) and c (started with
# a,b,c, waiting outside) on 127.0.0.1. ROOMS state rooms get OPS ops each (HTTP,
# 16 at a time); then `--to a,b,c` moves the third of them that c wins, while a prober
# keeps writing to 32 of the moving rooms through node a (each op re-sent with its id
# every 20 ms while it is nacked 503) and records, per op, the time from its first 503
# to its 200: the window a client of a moving room waits. Then `--to a,b` moves them
# back, probed the same way.
#
#   benches/cluster/rebalance.sh [ROOMS] [OPS]     (default 2000 rooms, 20 ops; release build)
rooms=${1:-2000}
ops=${2:-20}
source "$(dirname "$0")/lib.sh"

start_nats
start() { # id list
  start_node "$1" --cluster-nats "nats://127.0.0.1:$nats_port" --cluster-name bench --node-id "$1" \
    --cluster-nodes "$2"
}
start a a,b
start b a,b
start c a,b,c

python3 - "${port[a]}" "$rooms" "$ops" <<'EOF'
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
port, rooms, ops = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "X-Roomd-User": "setup"})
    with urllib.request.urlopen(req) as r:
        return r.status
def fill(i):
    room = f"state:bench-{i}"
    post("/api/rooms", {"room": room, "kind": "state", "init": {}})
    for n in range(ops):
        post(f"/api/rooms/{room}/ops", {"id": f"s{i}-{n}", "op": {"type": "set", "key": f"k{n}", "value": "v" * 100}})
with ThreadPoolExecutor(16) as pool:
    list(pool.map(fill, range(rooms)))
print(f"filled {rooms} rooms with {ops} ops each")
EOF

# The prober: rendezvous hashing (hrw.py, as src/cluster/hrw.rs) picks rooms
# that move; it writes to them until told to stop and prints the refusal windows.
probe() { # nodes_before nodes_after stop_file
  PYTHONPATH=benches/cluster python3 - "${port[a]}" "$rooms" "$1" "$2" "$3" <<'EOF'
import json, sys, time, os, threading, urllib.request, urllib.error
from hrw import owner
port, rooms, before, after, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(","), sys.argv[5]
moving = [r for r in (f"state:bench-{i}" for i in range(rooms)) if owner(r, before) != owner(r, after)][:32]
windows, acked, lock = [], [0], threading.Lock()
def run(room, k):
    n = 0
    while not os.path.exists(stop):
        body = json.dumps({"id": f"p{k}-{n}-{time.time_ns()}", "op": {"type": "set", "key": "probe", "value": n}}).encode()
        first_refusal = None
        while True:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/rooms/{room}/ops", body,
                                         {"Content-Type": "application/json", "X-Roomd-User": f"prober{k}"})
            try:
                urllib.request.urlopen(req).read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    raise
                first_refusal = first_refusal or time.monotonic()
                time.sleep(0.02)
        with lock:
            acked[0] += 1
            if first_refusal:
                windows.append(time.monotonic() - first_refusal)
        n += 1
threads = [threading.Thread(target=run, args=(r, k)) for k, r in enumerate(moving)]
for t in threads: t.start()
for t in threads: t.join()
windows.sort()
if windows:
    print(f"probe: {acked[0]} ops acked in {len(moving)} moving rooms, {len(windows)} refused 503 first; "
          f"refusal window p50 {windows[len(windows)//2]*1e3:.0f} ms, max {windows[-1]*1e3:.0f} ms")
else:
    print(f"probe: {acked[0]} ops acked in {len(moving)} moving rooms, none refused")
EOF
}

for step in "a,b a,b,c" "a,b,c a,b"; do
  set -- $step
  rm -f "$work/stop"
  probe "$1" "$2" "$work/stop" & prober=$!
  sleep 1
  "$bin" cluster rebalance --cluster-nats "nats://127.0.0.1:$nats_port" --cluster-name bench --to "$2" \
    | grep -v '^round'
  sleep 1
  touch "$work/stop"
  wait "$prober"
done
