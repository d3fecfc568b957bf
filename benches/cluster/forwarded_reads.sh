#!/usr/bin/env bash
# The added latency of an HTTP read answered by another node (forwarded to the room's
# owner over NATS) against the same read answered locally, in the same run: one
# nats-server and two roomd nodes (a, b) on 127.0.0.1, two rooms (one owned by a, one
# by b, found by the room list's `node` field) of 200 small events each, and every
# request sent to node a on one keep-alive connection, the local and forwarded reads
# alternated. Reads: the state, `?at=100`, `/events?limit=100`, and the cluster-wide
# room list (node a gathers node b's rooms over NATS).
#
#   benches/cluster/forwarded_reads.sh [REQUESTS]   (default 400 of each read and room)
#   BIN=path/to/roomd benches/cluster/forwarded_reads.sh   (default target/release/roomd)
requests=${1:-400}
source "$(dirname "$0")/lib.sh"

start_nats
for id in a b; do
  start_node "$id" --read-rate 100000 --cluster-nats "nats://127.0.0.1:$nats_port" --node-id "$id" \
    --cluster-nodes a,b
done
python3 - "${port[a]}" "$requests" <<'PY'
import http.client, json, statistics, sys, time

port, requests = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)

def call(method, path, body=None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, data

# Rooms until one is owned by each node.
rooms = {}
for i in range(64):
    room = f"state:reads-{i}"
    status, _ = call("POST", "/api/rooms", {"room": room, "kind": "state", "init": {}})
    assert status == 201, status
    _, listed = call("GET", f"/api/rooms?prefix={room}")
    node = json.loads(listed)["rooms"][0]["node"]
    rooms.setdefault(node, room)
    if len(rooms) == 2:
        break
local, remote = rooms["a"], rooms["b"]
for room in (local, remote):
    for i in range(199):
        op = {"type": "set", "key": f"k{i % 50}", "value": {"n": i, "text": "x" * 40}}
        status, _ = call("POST", f"/api/rooms/{room}/ops", {"op": op})
        assert status == 200, status

reads = {
    "state": "/api/rooms/{room}",
    "at": "/api/rooms/{room}?at=100",
    "events": "/api/rooms/{room}/events?limit=100",
}
print("read,where,requests,bytes,p50_ms,p90_ms,p99_ms")
for name, path in reads.items():
    times = {"local": [], "forwarded": []}
    sizes = {}
    for _ in range(requests):
        for where, room in (("local", local), ("forwarded", remote)):
            start = time.perf_counter()
            status, data = call("GET", path.format(room=room))
            times[where].append((time.perf_counter() - start) * 1000)
            assert status == 200, (status, data[:200])
            sizes[where] = len(data)
    for where, ms in times.items():
        ms.sort()
        q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
        print(f"{name},{where},{len(ms)},{sizes[where]},{statistics.median(ms):.3f},{q(0.9):.3f},{q(0.99):.3f}")
ms = []
for _ in range(requests):
    start = time.perf_counter()
    status, data = call("GET", "/api/rooms")
    ms.append((time.perf_counter() - start) * 1000)
    assert status == 200 and json.loads(data)["partial"] is False
ms.sort()
q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
print(f"room-list,both-nodes,{len(ms)},{len(data)},{statistics.median(ms):.3f},{q(0.9):.3f},{q(0.99):.3f}")
PY
