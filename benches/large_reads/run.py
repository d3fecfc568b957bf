#!/usr/bin/env python3
"""Memory of concurrent reads of one large room (issue 10's finding), run by hand.

Starts ROOMD (default target/release/roomd) on 127.0.0.1:0 with a fresh data dir, fills
a `state` room with 2,000 values of 32,000 bytes (64 MB, just under the 64 MiB room
limit), then sends 16 concurrent `GET /api/rooms/{room}` (and then 16 `?at=` reads),
reading every reply to the end on its own connection. Prints the server's RSS before,
its peak during the reads (VmHWM, reset just before them), and after.

    cargo build --release && python3 benches/large_reads/run.py [ROOMD] [extra serve flags]
"""
import collections
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOMD = sys.argv[1] if len(sys.argv) > 1 else "target/release/roomd"
EXTRA = sys.argv[2:]
KEYS, VALUE_BYTES, READERS = 2000, 32000, 16
ROOM = "state:big"


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main():
    data = tempfile.mkdtemp(prefix="roomd-large-reads-")
    server = subprocess.Popen(
        [ROOMD, "serve", "--bind", "127.0.0.1:0", "--data-dir", data,
         "--durability", "none", "--op-rate", "100000", "--op-burst", "100000", *EXTRA],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
        port = int(port)
        conn = http.client.HTTPConnection(host, port)

        def call(method, path, body=None):
            headers = {"Content-Type": "application/json", "X-Roomd-User": "alice"}
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers=headers)
            reply = conn.getresponse()
            text = reply.read()
            assert reply.status < 300, (reply.status, text[:200])
            return text

        call("POST", "/api/rooms", {"room": ROOM, "kind": "state", "init": {}})
        value = "v" * VALUE_BYTES
        for i in range(KEYS):
            call("POST", f"/api/rooms/{ROOM}/ops",
                 {"id": f"s{i}", "op": {"type": "set", "key": f"k{i:05}", "value": value}})
        conn.close()
        head = KEYS + 1
        time.sleep(6)  # let the store's quiet reopen and the idle trims pass
        pid = server.pid
        print(f"server {ROOMD} {' '.join(EXTRA)}")
        print(f"room of {KEYS} x {VALUE_BYTES} B filled; RSS {mib(status(pid, 'VmRSS'))}")

        for label, path in [("GET room", f"/api/rooms/{ROOM}"),
                            ("GET ?at=", f"/api/rooms/{ROOM}?at={head}")]:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = status(pid, "VmRSS")
            results = []

            def read():
                c = http.client.HTTPConnection(host, port, timeout=300)
                c.request("GET", path)
                r = c.getresponse()
                body = r.read()
                results.append((r.status, len(body)))
                c.close()

            started = time.time()
            threads = [threading.Thread(target=read) for _ in range(READERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.time() - started
            peak = status(pid, "VmHWM")
            time.sleep(1)
            after = status(pid, "VmRSS")
            statuses = dict(sorted(collections.Counter(s for s, _ in results).items()))
            sizes = sorted({n for _, n in results})
            print(f"{label}: {READERS} concurrent in {took:.1f} s, statuses {statuses}, "
                  f"reply bytes {sizes}; RSS before {mib(before)}, peak {mib(peak)} "
                  f"(+{mib(peak - before)}, {mib((peak - before) / READERS)} per read), "
                  f"1 s after {mib(after)}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
