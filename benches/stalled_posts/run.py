#!/usr/bin/env python3
"""Stalled POSTs from one address (issue 10's finding), run by hand.

Starts ROOMD (default target/release/roomd) on 127.0.0.1:0 with a fresh data dir and
opens COUNT connections (default 19,900: the open-file hard limit here is 20,000), each
sending a POST head that promises 1,000 bytes and then only one of them. Meanwhile and
afterwards it times `GET /healthz` on fresh connections, and reports the server's open
descriptors and RSS, then what each stalled connection was answered.

    cargo build --release && python3 benches/stalled_posts/run.py [ROOMD] [COUNT] [flags]
"""
import collections
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOMD = sys.argv[1] if len(sys.argv) > 1 else "target/release/roomd"
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 19_900
EXTRA = sys.argv[3:]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def healthz(host, port):
    started = time.time()
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = s.recv(4096)
        s.close()
        status = reply.split(b" ", 2)[1].decode() if reply else "no answer"
    except OSError as e:
        status = f"error: {e}"
    return status, (time.time() - started) * 1000


def main():
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    data = tempfile.mkdtemp(prefix="roomd-stalled-")
    server = subprocess.Popen(
        [ROOMD, "serve", "--bind", "127.0.0.1:0", "--data-dir", data, *EXTRA],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
        port = int(port)
        pid = server.pid
        print(f"server {ROOMD} {' '.join(EXTRA)}: RSS {rss_mib(pid):.1f} MiB, {fds(pid)} fds")
        head = (b"POST /api/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        socks, failed = [], 0
        started = time.time()
        for i in range(COUNT):
            try:
                s = socket.create_connection((host, port), timeout=5)
                s.sendall(head)
                s.setblocking(False)
                socks.append(s)
            except OSError:
                failed += 1
            if i % 5000 == 4999:
                status, ms = healthz(host, port)
                print(f"  {i + 1} opened: server {fds(pid)} fds, RSS {rss_mib(pid):.1f} MiB, "
                      f"/healthz {status} in {ms:.0f} ms")
        print(f"{len(socks)} stalled POSTs opened in {time.time() - started:.1f} s "
              f"({failed} connects failed)")
        answers = collections.Counter()
        pending = {s.fileno(): s for s in socks}
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        deadline = time.time() + 40
        next_report = time.time()
        while pending and time.time() < deadline:
            if time.time() >= next_report:
                status, ms = healthz(host, port)
                print(f"  t+{time.time() - started:.0f} s: server {fds(pid)} fds, "
                      f"RSS {rss_mib(pid):.1f} MiB, /healthz {status} in {ms:.0f} ms, "
                      f"{len(pending)} unanswered")
                next_report = time.time() + 5
            for fd, _ in poller.poll(200):
                s = pending.get(fd)
                if s is None:
                    continue
                poller.unregister(fd)
                try:
                    reply = s.recv(4096)
                except OSError:
                    reply = b""
                answers[reply.split(b" ", 2)[1].decode() if reply else "closed"] += 1
                del pending[fd]
                s.close()
        print(f"answers: {dict(answers)}; unanswered after 40 s: {len(pending)}")
        status, ms = healthz(host, port)
        print(f"end: server {fds(pid)} fds, RSS {rss_mib(pid):.1f} MiB, /healthz {status} in {ms:.0f} ms")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
