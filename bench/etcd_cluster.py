#!/usr/bin/env python3
"""Several ferrogate nodes on one etcd: how fast a change spreads, and what a
large configuration costs.

    python3 bench/etcd_cluster.py                   # 3 nodes, 10,000 routes, ~1 min
    python3 bench/etcd_cluster.py --nodes 3 --routes 10000 --updates 300

Needs etcd and etcdctl (`apt-get install etcd-server etcd-client`) and a
release build (`cargo build --release`). Everything runs in a temporary
directory on free 127.0.0.1 ports and is stopped when the script ends.

Printed: the time to write N routes through node 1's Admin API (8 clients),
when the last of them is served by every other node, the time a fresh node
takes from start to serving all N, the latency from an Admin API write on
node 1 to the change being served on node 2 (p50/p99/max over --updates
writes, one at a time), the same during a compaction-forced reload, and each
node's PSS.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

KEY = "bench-admin-key-0123456789abcdef"
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit("process exited early (rc=%s)" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit("port %d did not open" % port)


def request(method, url, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Node:
    def __init__(self, root, name, etcd):
        self.dir = os.path.join(root, name)
        os.makedirs(os.path.join(self.dir, "conf"))
        self.data, self.admin = free_port(), free_port()
        with open(os.path.join(self.dir, "conf", "config.yaml"), "w") as f:
            f.write(
                "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: %d\n  ssl:\n    enable: false\n"
                "deployment:\n  role_traditional:\n    config_provider: etcd\n  admin:\n    admin_key:\n"
                "      - name: admin\n        key: %s\n        role: admin\n    admin_listen:\n"
                "      ip: 127.0.0.1\n      port: %d\n  etcd:\n    host: [%s]\n" % (self.data, KEY, self.admin, etcd)
            )

    def start(self, binary):
        log = open(os.path.join(self.dir, "log"), "a")
        self.proc = subprocess.Popen(
            [binary, "--config", os.path.join(self.dir, "conf", "config.yaml")],
            stdout=subprocess.DEVNULL, stderr=log, cwd=self.dir,
        )
        PROCS.append(self.proc)
        wait_port(self.data, self.proc, timeout=120)

    def put(self, path, body):
        return request("PUT", "http://127.0.0.1:%d/apisix/admin/%s" % (self.admin, path), body, {"X-API-KEY": KEY})

    def status(self, path):
        return request("GET", "http://127.0.0.1:%d%s" % (self.data, path))[0]


def route(i, upstream):
    return {"uri": "/r/%d" % i, "upstream": {"type": "roundrobin", "nodes": {upstream: 1}}}


def wait_served(node, path, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if node.status(path) != 404:
            return time.time()
        time.sleep(0.0005)
    raise SystemExit("%s never served on node %d" % (path, node.data))


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--routes", type=int, default=10000)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "ferrogate"))
    args = ap.parse_args()
    if not shutil.which("etcd") or not shutil.which("etcdctl"):
        raise SystemExit("needs etcd and etcdctl: apt-get install etcd-server etcd-client")
    root = tempfile.mkdtemp(prefix="ferrogate-etcd-bench-")
    try:
        run(args, root)
    finally:
        for p in PROCS:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


def run(args, root):
    cport, pport = free_port(), free_port()
    etcd_url = "http://127.0.0.1:%d" % cport
    etcd = subprocess.Popen(
        ["etcd", "--name", "b", "--data-dir", os.path.join(root, "etcd"),
         "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
         "--listen-peer-urls", "http://127.0.0.1:%d" % pport,
         "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % pport,
         "--initial-cluster", "b=http://127.0.0.1:%d" % pport, "--log-level", "error", "--logger", "zap"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    PROCS.append(etcd)
    wait_port(cport, etcd)
    time.sleep(0.5)
    upstream = "127.0.0.1:%d" % free_port()  # nothing listens: only matching matters
    nodes = [Node(root, "n%d" % i, etcd_url) for i in range(args.nodes)]
    for n in nodes:
        n.start(args.binary)
    first, others = nodes[0], nodes[1:]

    # N routes through node 1, 8 writers at once.
    start = time.time()
    counter = iter(range(args.routes))
    lock = threading.Lock()

    def writer():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, body = first.put("routes/%d" % i, route(i, upstream))
            if status not in (200, 201):
                raise SystemExit("PUT failed: %s %s" % (status, body[:200]))

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = time.time() - start
    last = "/r/%d" % (args.routes - 1)
    spread = max(wait_served(n, last) for n in others) - start
    print("write %d routes through node 1: %.1f s (%.0f/s); all served on every node after %.1f s"
          % (args.routes, written, args.routes / written, spread))

    # A fresh node: list, compile, serve.
    fresh = Node(root, "fresh", etcd_url)
    t0 = time.time()
    fresh.start(args.binary)
    wait_served(fresh, last)
    print("fresh node with %d routes: serving all of them %.2f s after its start" % (args.routes, time.time() - t0))
    nodes.append(fresh)

    # One change at a time: write on node 1, served on node 2.
    target = others[0] if others else first
    lat = []
    for u in range(args.updates):
        body = {"uri": "/u/%d" % u, "upstream": {"type": "roundrobin", "nodes": {upstream: 1}}}
        t0 = time.time()
        status, _ = first.put("routes/update", body)
        assert status in (200, 201), status
        lat.append((wait_served(target, "/u/%d" % u) - t0) * 1000)
    print("write on node 1 -> served on node 2 (%d updates, %d routes): p50 %.1f ms, p99 %.1f ms, max %.1f ms"
          % (args.updates, args.routes, pct(lat, 0.5), pct(lat, 0.99), max(lat)))

    # A node that was down while etcd compacted reloads everything at once.
    lagging = nodes[-1]
    lagging.proc.kill()
    lagging.proc.wait()
    first.put("routes/after-compaction", {"uri": "/after", "upstream": {"type": "roundrobin", "nodes": {upstream: 1}}})
    out = subprocess.run(["etcdctl", "--endpoints", etcd_url, "endpoint", "status", "-w", "json"],
                         capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3")).stdout
    rev = json.loads(out)[0]["Status"]["header"]["revision"]
    subprocess.run(["etcdctl", "--endpoints", etcd_url, "compact", str(rev), "--physical"],
                   capture_output=True, env=dict(os.environ, ETCDCTL_API="3"))
    t0 = time.time()
    lagging.start(args.binary)
    wait_served(lagging, "/after")
    print("node restarted after a compaction (from its local copy, then a full reload): /after served %.2f s after start"
          % (time.time() - t0))

    for i, n in enumerate(nodes):
        print("node %d PSS: %.1f MiB" % (i + 1, pss_kib(n.proc.pid) / 1024))


if __name__ == "__main__":
    sys.exit(main())
