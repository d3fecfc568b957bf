#!/usr/bin/env python3
"""Issue 10's bad-input findings, rerun by hand against a built binary.

Starts ROOMD (default target/release/roomd) on 127.0.0.1:0 with fresh data dirs and sends
each finding's bad input exactly as the issue describes it, from a raw client (sockets,
hand-made WebSocket frames), printing what came back: one line per probe, `ok` when the
answer is the clear one the issue asks for, `FAIL` otherwise. The exit status is the
number of failures. Two findings have their own scripts because they need many
descriptors or much memory: `benches/stalled_posts/run.py` and `benches/large_reads/run.py`.

    cargo build --release && python3 benches/battery/run.py [ROOMD] [--only NAME ...]

NAME is one of: ws, opids, depth, origins, store, small.
"""
import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ARGS = [a for a in sys.argv[1:]]
ONLY = []
if "--only" in ARGS:
    at = ARGS.index("--only")
    ONLY = ARGS[at + 1:]
    ARGS = ARGS[:at]
ROOMD = os.path.abspath(ARGS[0]) if ARGS else os.path.abspath("target/release/roomd")
FAILURES = []


def check(name, ok, detail):
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILURES.append(name)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """One roomd child on 127.0.0.1:0; stderr is kept in a file for the log checks."""

    def __init__(self, flags=(), data=None):
        self.data = data or tempfile.mkdtemp(prefix="roomd-battery-")
        self.flags = list(flags)
        self.log_path = os.path.join(self.data, "stderr.log")
        self.start()

    def start(self, must=True):
        """Starts the child; False (when not `must`) if it exits instead of listening."""
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [ROOMD, "serve", "--bind", "127.0.0.1:0", "--data-dir", self.data, *self.flags],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.wait(timeout=30)
            self.log.close()
            if must:
                raise SystemExit(f"roomd did not start: {line!r}\n{self.stderr()}")
            return False
        host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
        self.host, self.port = host, int(port)
        return True

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()

    def stderr(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def remove(self):
        shutil.rmtree(self.data, ignore_errors=True)

    # --- HTTP, one connection per request, read to the end --------------------------
    def raw(self, request, timeout=10):
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            s.sendall(request)
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except (ConnectionResetError, socket.timeout) as e:
                    out += f"<{type(e).__name__}>".encode()
                    break
                if not chunk:
                    break
                out += chunk
            return out
        finally:
            s.close()

    def http(self, method, path, body=None, headers=None, ctype="application/json"):
        headers = dict(headers or {})
        headers.setdefault("Host", f"127.0.0.1:{self.port}")
        headers["Connection"] = "close"
        data = b""
        if body is not None:
            data = body if isinstance(body, bytes) else (
                body.encode() if isinstance(body, str) else json.dumps(body).encode())
            if ctype:
                headers.setdefault("Content-Type", ctype)
            headers["Content-Length"] = str(len(data))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        reply = self.raw(head.encode() + data)
        return parse_http(reply)


def parse_http(reply):
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        return 0, {}, reply
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, headers, body


def jbody(body):
    try:
        return json.loads(body)
    except ValueError:
        return None


# --- WebSocket, by hand --------------------------------------------------------------
def frame(opcode, payload, fin=True):
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(obj):
    return frame(0x1, (obj if isinstance(obj, str) else json.dumps(obj)).encode())


class Ws:
    def __init__(self, server, query="user=prober", pipelined=b"", headers=None, expect=101):
        self.sock = socket.create_connection((server.host, server.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hdrs = {"Host": f"127.0.0.1:{server.port}"}
        hdrs.update(headers or {})
        req = (f"GET /ws?{query} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
               + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode() + pipelined)
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ")[1]) if head else 0
        self.head = head

    def next(self, timeout=10):
        """('frame', opcode, payload) | ('eof',) | ('reset', text) | ('timeout',)."""
        deadline = time.time() + timeout
        while True:
            if len(self.buf) >= 2:
                b0, b1 = self.buf[0], self.buf[1]
                n, at = b1 & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, at = struct.unpack(">H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, at = struct.unpack(">Q", self.buf[2:10])[0], 10
                if n < 126 or at > 2:
                    if len(self.buf) >= at + n:
                        payload = self.buf[at:at + n]
                        self.buf = self.buf[at + n:]
                        return ("frame", b0 & 0x0F, payload)
            left = deadline - time.time()
            if left <= 0:
                return ("timeout",)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return ("timeout",)
            except OSError as e:
                return ("reset", str(e))
            if not chunk:
                return ("eof",)
            self.buf += chunk

    def json(self, timeout=10):
        while True:
            got = self.next(timeout)
            if got[0] != "frame":
                return got
            if got[1] == 0x1:
                return json.loads(got[2])

    def reply(self, id_, timeout=10):
        while True:
            msg = self.json(timeout)
            if not isinstance(msg, dict):
                return msg
            if msg.get("id") == id_ and msg.get("t") in ("ack", "nack"):
                return msg

    def close_code(self, timeout=10):
        """The close frame's code, skipping other frames; or how the connection ended."""
        texts = 0
        while True:
            got = self.next(timeout)
            if got[0] != "frame":
                return got, texts
            if got[1] == 0x8:
                return struct.unpack(">H", got[2][:2])[0], texts
            texts += 1

    def send(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def close(self):
        self.sock.close()


def bad_frames(n):
    return b"".join(text(f"not json {i} " + "x" * 2000) for i in range(n))


def ws_json(server, user="alice"):
    ws = Ws(server, f"user={user}")
    welcome = ws.json()
    assert welcome.get("t") == "welcome", welcome
    return ws


# --- the findings ---------------------------------------------------------------------
def probe_ws():
    print("clean closes: 40 pipelined bad frames -> 4400, x20; pipelined oversize -> 1009")
    server = Server()
    try:
        codes, ends = [], []
        for round_ in range(20):
            ws = ws_json(server, f"prober{round_}")
            ws.send(bad_frames(40))
            code, _ = ws.close_code()
            codes.append(code)
            ws.send(frame(0x8, struct.pack(">H", 4400)))
            while True:
                got = ws.next()
                if got[0] != "frame":
                    break
            ends.append(got[0])
            ws.close()
        check("40 bad frames x20", codes == [4400] * 20 and ends == ["eof"] * 20,
              f"close codes {sorted(set(map(str, codes)))} ({codes.count(4400)}/20 were 4400), "
              f"ends after the client's close: {ends.count('eof')} FIN, "
              f"{sum(1 for e in ends if e != 'eof')} other")
        # The client that never answers the close and keeps sending: still a close frame.
        ws = ws_json(server, "keeps-sending")
        ws.send(bad_frames(40))
        started = time.time()
        code, _ = ws.close_code()
        stop = threading.Event()

        def spam():
            while not stop.is_set() and ws.send(bad_frames(2)):
                time.sleep(0.01)
        t = threading.Thread(target=spam)
        t.start()
        while True:
            got = ws.next(10)
            if got[0] != "frame":
                break
        stop.set()
        t.join()
        check("40 bad frames, client keeps sending and never answers the close",
              code == 4400 and got[0] in ("eof", "reset"),
              f"close {code}, connection ended ({got[0]}) {time.time() - started:.1f} s after "
              "the bad frames")
        ws.close()
        ws = ws_json(server, "oversize")
        ws.send(frame(0x1, b" " * 70_000) + bad_frames(20))
        code, _ = ws.close_code()
        check("pipelined 70,000-byte frame + 20 frames", code == 1009, f"close {code}")
        ws.close()
        ws = ws_json(server, "utf8")
        ws.send(frame(0x1, b'{"t":"sub","room":"\xff\xfe"}') + bad_frames(20))
        code, _ = ws.close_code()
        check("pipelined invalid UTF-8 + 20 frames", code == 1007, f"close {code}")
        ws.close()
        status, _, _ = server.http("GET", "/healthz")
        check("healthz after", status == 200, f"{status}")
    finally:
        server.stop()
        server.remove()


def probe_opids():
    print("op ids of 60 KB (the cap is 256 bytes)")
    server = Server(["--op-rate", "100000", "--op-burst", "100000"])
    try:
        ws = ws_json(server)
        ws.send(text({"t": "create", "id": "c", "room": "state:ids", "kind": "state", "init": {}}))
        assert ws.reply("c")["t"] == "ack"
        long = "i" * 60_000
        ws.send(text({"t": "op", "id": long, "room": "state:ids",
                      "op": {"type": "incr", "key": "n"}}))
        nack = ws.reply(long)
        check("WS JSON op, 60,000-byte id", nack.get("t") == "nack" and nack.get("code") == "invalid",
              f"{nack.get('t')} {nack.get('code')} {nack.get('msg')!r}")
        ws.send(text({"t": "op", "id": "k" * 256, "room": "state:ids",
                      "op": {"type": "incr", "key": "n"}}))
        ack = ws.reply("k" * 256)
        check("WS JSON op, 256-byte id", ack.get("t") == "ack", f"{ack.get('t')}")
        ws.send(text({"t": "create", "id": "g", "room": "state:game", "kind": "state",
                      "init": {}}))
        assert ws.reply("g")["t"] == "ack"
        rk = Ws(server, "user=rkyv", headers={"Sec-WebSocket-Protocol": "roomd.v1.rkyv"})
        rk.next()  # the welcome
        rk.send(frame(0x2, rkyv_op_with_id(long)))
        got = rk.next()
        check("rkyv op, 60,000-byte id",
              got[0] == "frame" and long.encode() in got[2] and b"exceeds limit of 256" in got[2],
              f"{len(got[2]) if got[0] == 'frame' else got} bytes back, "
              f"{'names the limit' if got[0] == 'frame' and b'exceeds limit of 256' in got[2] else ''}")
        rk.close()
        status, _, body = server.http("GET", "/api/rooms/state:game")
        check("rkyv op was not applied", (jbody(body) or {}).get("seq") == 1, f"{body[:80]!r}")
        status, _, body = server.http("POST", "/api/rooms/state:ids/ops",
                                      {"id": long, "op": {"type": "incr", "key": "n"}},
                                      {"X-Roomd-User": "bob"})
        check("HTTP op, 60,000-byte id", status == 400 and jbody(body).get("code") == "invalid",
              f"{status} {body[:120]!r}")
        # The battery's memory finding: many such ops held the dedup windows.
        pid = server.proc.pid
        before = rss_mib(pid)
        n, nacks = 5000, 0
        for i in range(n // 100):
            batch = b"".join(text({"t": "op", "id": f"{i:04}-{j:03}-" + "i" * 60_000,
                                   "room": "state:ids", "op": {"type": "incr", "key": "n"}})
                             for j in range(100))
            ws.send(batch)
            for _ in range(100):
                msg = ws.json()
                if isinstance(msg, dict) and msg.get("t") == "nack" and msg.get("code") == "invalid":
                    nacks += 1
        after = rss_mib(pid)
        status, _, body = server.http("GET", "/api/rooms/state:ids")
        seq = jbody(body).get("seq")
        check(f"{n} WS ops with 60 KB ids", nacks == n and seq == 2,
              f"{nacks} nacked invalid, room seq {seq}; RSS {before:.1f} -> {after:.1f} MiB")
        ws.close()
    finally:
        server.stop()
        server.remove()


def rkyv_op_with_id(op_id):
    """The committed fixture `op_incr.bin` (an `incr` on `state:game`, id `c6`) with its
    id replaced by `op_id` (over 8 bytes: out of line). Prepending the string's bytes
    keeps every relative pointer of the archive valid; only the id's own repr changes:
    an out-of-line `ArchivedString` is a length (the first byte 0b10 and its low 6
    bits, the next three bytes the rest, little-endian) and an i32 offset from the repr
    to the bytes (tests/fixtures/rkyv/README.md)."""
    here = os.path.dirname(os.path.abspath(__file__))
    base = open(os.path.join(here, "../../tests/fixtures/rkyv/client/op_incr.bin"), "rb").read()
    inline = b"c6" + b"\xff" * 6
    assert base.count(inline) == 1
    raw = op_id.encode()
    at = len(raw) + base.index(inline)
    n = len(raw)
    repr_ = bytes([0x80 | (n & 0x3F)]) + struct.pack("<I", n >> 6)[:3] + struct.pack("<i", -at)
    out = bytearray(raw + base)
    out[at:at + 8] = repr_
    return bytes(out)


def nested(depth):
    v = 1
    for _ in range(depth):
        v = [v]
    return v


def probe_depth():
    print("state init (and set) nested 30..33 levels: accepted or invalid, never unavailable")
    server = Server()
    try:
        ws = ws_json(server)
        for depth in (29, 30, 31, 32, 33):
            init = {"entries": {"deep": nested(depth - 2)}}
            ws.send(text({"t": "create", "id": f"c{depth}", "room": f"deep:ws{depth}",
                          "kind": "state", "init": init}))
            r = ws.reply(f"c{depth}")
            want = "ack" if depth <= 32 else "invalid"
            got = r.get("t") if r.get("t") == "ack" else r.get("code")
            check(f"WS create init depth {depth}", got == want, f"{got} {r.get('msg', '')!r}")
            status, _, body = server.http("POST", "/api/rooms",
                                          {"room": f"deep:http{depth}", "kind": "state",
                                           "init": init})
            ok = status in (200, 201) if depth <= 32 else status == 400
            check(f"HTTP create init depth {depth}", ok, f"{status} {body[:100]!r}")
            if depth >= 30:
                ws.send(text({"t": "op", "id": f"s{depth}", "room": "deep:ws29",
                              "op": {"type": "set", "key": "deep", "value": nested(depth - 1)}}))
                r = ws.reply(f"s{depth}")
                got = r.get("t") if r.get("t") == "ack" else r.get("code")
                check(f"WS set depth {depth}", got == want, f"{got}")
        ws.close()
        server.stop()
        server.start()  # durable: the deep rooms load again
        status, _, body = server.http("GET", "/api/rooms/deep:http32")
        check("depth-32 room after restart", status == 200, f"{status}")
        log = server.stderr()
        check("no ERROR / commit failed in the log", "ERROR" not in log and "commit failed" not in log,
              f"{log.count('ERROR')} ERROR lines")
    finally:
        server.stop()
        server.remove()


def probe_origins():
    print("auth off: cross-site writes, DNS rebinding, JSON content type (loopback bind)")
    server = Server()
    try:
        ws = ws_json(server)
        ws.send(text({"t": "create", "id": "c", "room": "chat:lobby", "kind": "chat", "init": {}}))
        assert ws.reply("c")["t"] == "ack"
        ws.close()
        post = {"id": "x1", "op": {"type": "post", "text": "pwned"}}
        status, _, body = server.http("POST", "/api/rooms/chat:lobby/ops", json.dumps(post),
                                      {"Origin": "http://evil.example"}, ctype="text/plain")
        check("cross-site text/plain POST", status in (403, 415), f"{status} {body[:100]!r}")
        status, _, body = server.http("POST", "/api/rooms/chat:lobby/ops", post,
                                      {"Origin": "http://evil.example"})
        check("cross-site application/json POST", status == 403, f"{status} {body[:100]!r}")
        status, _, body = server.http("POST", "/api/rooms/chat:lobby/ops", json.dumps(post),
                                      ctype="text/plain")
        check("text/plain POST without Origin", status == 415, f"{status} {body[:100]!r}")
        status, _, body = server.http("POST", "/api/rooms/chat:lobby/ops", json.dumps(post),
                                      ctype=None)
        check("POST without Content-Type", status == 415, f"{status} {body[:100]!r}")
        status, _, body = server.http("POST", "/api/rooms/chat:lobby/ops", json.dumps(post),
                                      ctype="application/x-www-form-urlencoded")
        check("form POST", status == 415, f"{status} {body[:100]!r}")
        rebind = {"Origin": "http://evil.example", "Host": "evil.example"}
        ws = Ws(server, "user=x", headers=rebind)
        check("upgrade with Origin+Host evil.example", ws.status == 403,
              f"{ws.status} {ws.head[:40]!r}")
        ws.close()
        ws = Ws(server, "user=x", headers={"Host": "evil.example"})
        check("upgrade with Host evil.example, no Origin", ws.status == 403, f"{ws.status}")
        ws.close()
        status, _, body = server.http("DELETE", "/api/rooms/chat:lobby", headers=rebind)
        check("DELETE with Origin+Host evil.example", status == 403, f"{status} {body[:100]!r}")
        status, _, body = server.http("GET", "/api/rooms/chat:lobby", headers=rebind)
        check("GET with Origin+Host evil.example", status == 403, f"{status} {body[:100]!r}")
        status, _, body = server.http("GET", "/api/rooms/chat:lobby/events")
        check("nothing was written", status == 200 and b"pwned" not in body,
              f"head {(jbody(body) or {}).get('head')}, 'pwned' not in the events")
        status, _, _ = server.http("GET", "/api/rooms/chat:lobby", headers={"Host": "localhost:1"})
        check("Host localhost still served", status == 200, f"{status}")
    finally:
        server.stop()
        server.remove()


def probe_store():
    print("one flipped byte in roomd.redb")
    server = Server()
    data = server.data
    try:
        ws = ws_json(server)
        for room in ("good:a", "bad", "good:b"):
            ws.send(text({"t": "create", "id": f"c-{room}", "room": room, "kind": "state",
                          "init": {}}))
            assert ws.reply(f"c-{room}")["t"] == "ack"
        pad = "x" * 1000
        for i in range(1, 31):
            ws.send(text({"t": "op", "id": f"b{i}", "room": "bad",
                          "op": {"type": "set", "key": f"k{i}", "value": f"DAMAGE-ME-{i}-{pad}"}}))
            assert ws.reply(f"b{i}")["t"] == "ack"
        for room in ("good:a", "good:b"):
            ws.send(text({"t": "op", "id": "g1", "room": room,
                          "op": {"type": "set", "key": "k", "value": 1}}))
            assert ws.reply("g1")["t"] == "ack"
        ws.close()
        server.stop()
        path = os.path.join(data, "roomd.redb")
        pristine = open(path, "rb").read()
        at = pristine.find(b"DAMAGE-ME-15-")
        page = at // 4096 * 4096
        # The battery's flip: one byte, the page's first (its type).
        damaged = bytearray(pristine)
        damaged[page] ^= 0xFF
        open(path, "wb").write(damaged)
        print(f"  flipped byte {page} (page type of the page holding DAMAGE-ME-15)")
        server.start()
        status, _, body = server.http("GET", "/readyz")
        print(f"  readyz before any room is touched: {status} {body[:160]!r}")
        status, _, body = server.http("GET", "/api/rooms/bad")
        check("read of the damaged room", status == 503, f"{status} {body[:140]!r}")
        status, _, body = server.http("POST", "/api/rooms/bad/ops",
                                      {"id": "w1", "op": {"type": "set", "key": "k15", "value": 2}})
        check("first write to the damaged room", status == 503, f"{status} {body[:140]!r}")
        ws = ws_json(server, "bob")
        ws.send(text({"t": "op", "id": "w2", "room": "bad",
                      "op": {"type": "set", "key": "k15", "value": 3}}))
        r = ws.reply("w2")
        check("WS write to the damaged room", r.get("code") == "unavailable", f"{r}")
        for room in ("good:a", "good:b"):
            ws.send(text({"t": "op", "id": "g2", "room": room,
                          "op": {"type": "incr", "key": "n"}}))
            r = ws.reply("g2")
            status, _, _ = server.http("GET", f"/api/rooms/{room}")
            check(f"{room} keeps serving", r.get("t") == "ack" and status == 200,
                  f"write {r.get('t')}, read {status}")
        ws.close()
        status, _, body = server.http("GET", "/readyz")
        damaged = [d.get("room") for d in (jbody(body) or {}).get("damaged", [])]
        check("readyz once the room was touched", status == 200 and damaged == ["bad"],
              f"{status} {body[:200]!r}")
        log = server.stderr()
        check("no panic in the server log", "panicked" not in log,
              f"{log.count('panicked')} panics, {log.count('ERROR')} ERROR lines")
        server.stop()
        for args in (["verify"], ["rooms"]):
            out = subprocess.run([ROOMD, "log", *args, "--data-dir", data],
                                 capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if "bad" in line or "DAMAGED" in line]
            check(f"roomd log {' '.join(args)}",
                  out.returncode == 1 and "panicked" not in out.stderr and lines,
                  f"exit {out.returncode}; {lines[:2]}")
        # Beyond the battery: single-byte flips anywhere in the file, one at a time.
        # `log verify` must answer 0 or 1 and never panic; a server must start, answer
        # /readyz and keep the undamaged rooms serving or refuse to open with an error.
        rng = random.Random(10)
        outcomes = {}
        panics = []
        sample = [rng.randrange(len(pristine)) for _ in range(60)]
        for n, offset in enumerate(sample):
            damaged = bytearray(pristine)
            damaged[offset] ^= 1 << rng.randrange(8)
            open(path, "wb").write(damaged)
            out = subprocess.run([ROOMD, "log", "verify", "--data-dir", data],
                                 capture_output=True, text=True, timeout=60)
            key = f"verify exit {out.returncode}"
            outcomes[key] = outcomes.get(key, 0) + 1
            if "panicked" in out.stderr or out.returncode not in (0, 1):
                panics.append((offset, out.returncode, out.stderr[-300:]))
            if n % 6 == 0:
                if server.start(must=False):
                    statuses = []
                    for room in ("good:a", "bad", "good:b"):
                        s, _, _ = server.http("POST", f"/api/rooms/{room}/ops",
                                              {"id": f"r{n}", "op": {"type": "incr", "key": "z"}})
                        statuses.append(s)
                    s, _, _ = server.http("GET", "/readyz")
                    key = f"serve: readyz {s}, writes {statuses}"
                    server.stop()
                else:
                    key = f"serve refused to start (exit {server.proc.returncode})"
                outcomes[key] = outcomes.get(key, 0) + 1
        log = server.stderr()
        if "panicked" in log:
            panics.append(("server", log[log.index("panicked") - 200:][:400]))
        open(path, "wb").write(pristine)
        check("60 random single-bit flips", not panics,
              f"{dict(sorted(outcomes.items()))}; panics {panics[:2]}")
    finally:
        if server.proc.poll() is None:
            server.stop()
        server.remove()


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(secret, claims):
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def probe_small():
    print("smaller findings")
    secret = "battery-secret"
    server = Server(["--jwt-secret", secret])
    try:
        now = int(time.time())
        early = hs256(secret, {"sub": "alice", "admin": True, "nbf": now + 300})
        ws = Ws(server, f"token={early}")
        code, _ = ws.close_code()
        check("WS token with nbf now+300 s", code == 4401, f"upgrade {ws.status}, close {code}")
        ws.close()
        status, _, body = server.http("GET", "/api/rooms/state:x",
                                      headers={"Authorization": f"Bearer {early}"})
        check("HTTP token with nbf now+300 s", status == 401, f"{status} {body[:100]!r}")
        good = hs256(secret, {"sub": "alice", "admin": True, "exp": now + 600})
        status, _, body = server.http("GET", "/api/rooms/state:x",
                                      headers={"Authorization": f"Bearer {good}"})
        check("HTTP token without nbf (control)", status == 404, f"{status} {body[:100]!r}")
    finally:
        server.stop()
        server.remove()
    server = Server()
    try:
        status, _, _ = server.http("POST", "/api/rooms", {"room": "chat:c", "kind": "chat", "init": {}})
        assert status in (200, 201), status
        for i in range(3):
            server.http("POST", "/api/rooms/chat:c/ops", {"id": f"p{i}", "op": {"type": "post", "text": "hi"}})
        status, _, body = server.http("GET", "/api/rooms/chat:c/events?limit=0")
        check("events?limit=0", status == 200 and jbody(body).get("events") == [],
              f"{status} {body[:100]!r}")
        status, _, body = server.http("GET", "/api/rooms/chat:c/events?after=18446744073709551615")
        check("events?after=u64::MAX", status == 200 and jbody(body).get("events") == [],
              f"{status} {body[:100]!r}")
        status, _, body = server.http("GET", "/api/rooms/chat:c/events?after=18446744073709551616")
        check("events?after=u64::MAX+1", status == 400, f"{status} {body[:100]!r}")
        # Reads over the per-address rate (200/s, burst 400), on one kept-alive connection.
        sock = socket.create_connection((server.host, server.port), timeout=10)
        request = (f"GET /api/rooms/chat:c HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n"
                   .encode())
        sock.sendall(request * 1000)
        replies, buf = [], b""
        while len(replies) < 1000:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                status, headers, _ = parse_http(buf[:head_end + 4])
                if headers.get("transfer-encoding") == "chunked":
                    end = buf.find(b"\r\n0\r\n\r\n", head_end)
                    if end < 0:
                        break
                    buf = buf[end + 7:]
                else:
                    n = int(headers.get("content-length", "0"))
                    if len(buf) < head_end + 4 + n:
                        break
                    buf = buf[head_end + 4 + n:]
                replies.append(status)
        sock.close()
        counts = {s: replies.count(s) for s in sorted(set(replies))}
        check("1,000 pipelined reads from one address", counts.get(429, 0) > 0
              and counts.get(200, 0) >= 400, f"statuses {counts}")
        big = json.dumps({"id": "big", "op": {"type": "post", "text": "x" * 70_000}})
        status, _, body = server.http("POST", "/api/rooms/chat:c/ops", big)
        b = jbody(body) or {}
        check("413 body", status == 413 and set(b) == {"code", "msg"}, f"{status} {body[:100]!r}")
        for path in ("/nope", "/api/nope/x/y", "/api/rooms/chat:c/nope"):
            status, _, body = server.http("GET", path)
            b = jbody(body) or {}
            check(f"404 body of {path}", status == 404 and set(b) == {"code", "msg"},
                  f"{status} {body[:100]!r}")
        for query in ("user=%FF", "user=al%C3", "user=a%01b", "user=a%0Ab", "user=%7F"):
            ws = Ws(server, query)
            status, _, body = server.http("GET", f"/api/rooms/chat:c?{query}")
            check(f"?{query}", ws.status == 400 and status == 400,
                  f"upgrade {ws.status}, HTTP {status} {body[:80]!r}")
            ws.close()
        status, _, body = server.http("GET", "/api/rooms/chat:c", headers={"X-Roomd-User": "a\tb"})
        check("X-Roomd-User with a tab", status == 400, f"{status} {body[:80]!r}")
        ws = ws_json(server)
        ws.send(frame(0x1, b'{"t":"op","id":"d1","room":"chat:c","room":"chat:d",'
                           b'"op":{"type":"post","text":"a"}}'))
        r = ws.json()
        check("WS duplicate key in the message", r.get("code") == "bad_frame", f"{r}")
        ws.send(frame(0x1, b'{"t":"op","id":"d2","room":"chat:c",'
                           b'"op":{"type":"post","text":"a","text":"b"}}'))
        r = ws.reply("d2")
        check("WS duplicate key in the op", r.get("code") == "invalid", f"{r}")
        ws.close()
        status, _, body = server.http("POST", "/api/rooms/chat:c/ops",
                                      '{"id":"h1","op":{"type":"post","text":"a"},"op":{"type":"post","text":"b"}}')
        check("HTTP duplicate key", status == 400, f"{status} {body[:100]!r}")
        before = server.stderr().count("ERROR")
        answers = []
        for _ in range(20):
            reply = server.raw(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                               + b"x" * (200 * 1024) + b"\r\n\r\n")
            answers.append(reply.split(b"\r\n")[0].decode("latin-1")[:40] or "closed")
        time.sleep(0.5)
        log = server.stderr()
        check("20 oversized headers", log.count("ERROR") == before,
              f"answers {sorted(set(answers))}, ERROR lines {log.count('ERROR') - before}, "
              f"summary lines {log.count('malformed or oversized')}")
    finally:
        server.stop()
        server.remove()


PROBES = {"ws": probe_ws, "opids": probe_opids, "depth": probe_depth,
          "origins": probe_origins, "store": probe_store, "small": probe_small}

if __name__ == "__main__":
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for name, probe in PROBES.items():
        if not ONLY or name in ONLY:
            probe()
    print(f"{len(FAILURES)} failures: {FAILURES}")
    sys.exit(len(FAILURES))
