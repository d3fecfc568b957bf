#!/usr/bin/env python3
"""Random single-bit flips in a data file, against `roomd log verify`.

Usage: python3 benches/battery/flips.py ROOMD [SEED] [FLIPS]

Writes three rooms (two `state`, one `chat`, 600 ops over HTTP) with ROOMD on
127.0.0.1, stops it, then flips one random bit of roomd.redb at a time. For every flip
`log verify` either exits 1 (found) or exits 0; for an exit 0 the script compares what
`roomd log show` prints for every room with the pristine file: a flip that verify passes
must not have changed any stored data. Prints the counts; `ok_but_data_differs` is a miss.
"""
ROOMD = os.path.abspath(sys.argv[1])
d = tempfile.mkdtemp()
data = os.path.join(d, "data")
port = 19731
p = subprocess.Popen([ROOMD, "--bind", f"127.0.0.1:{port}", "--data-dir", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def http(method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", "X-Roomd-User": "alice"})
    try:
        return urllib.request.urlopen(req, timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1); break
    except Exception: time.sleep(0.1)
rooms = ["state:a", "state:b", "chat:c"]
for r in rooms:
    kind = r.split(":")[0]
    assert http("POST", "/api/rooms", {"room": r, "kind": kind, "init": {}}) in (200, 201), r
for i in range(200):
    for r in rooms:
        op = {"type": "set", "key": f"k{i%20}", "value": f"value-{i}-" + "x" * (i % 50)} if r.startswith("state") else {"type": "post", "text": f"message {i} " + "y" * (i % 80)}
        s = http("POST", f"/api/rooms/{r}/ops", {"id": f"{r}-{i}", "op": op})
        assert s == 200, (r, s)
p.terminate(); p.wait()
path = os.path.join(data, "roomd.redb")
pristine = open(path, "rb").read()
def show():
    out = []
    for r in rooms:
        o = subprocess.run([ROOMD, "log", "show", r, "--data-dir", data], capture_output=True, text=True, timeout=60)
        out.append((o.returncode, o.stdout))
    return out
base = show()
rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 7)
counts = {"found": 0, "ok_and_data_same": 0, "ok_but_data_differs": 0}
for n in range(int(sys.argv[3]) if len(sys.argv) > 3 else 60):
    off = rng.randrange(len(pristine))
    b = bytearray(pristine); b[off] ^= 1 << rng.randrange(8)
    open(path, "wb").write(b)
    v = subprocess.run([ROOMD, "log", "verify", "--data-dir", data], capture_output=True, text=True, timeout=60)
    assert "panicked" not in v.stderr
    if v.returncode == 1:
        counts["found"] += 1
    else:
        same = show() == base
        counts["ok_and_data_same" if same else "ok_but_data_differs"] += 1
        if not same: print("MISSED at offset", off)
print(f"file {len(pristine)} bytes; flips: {counts}")
shutil.rmtree(d)
