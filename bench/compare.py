#!/usr/bin/env python3
"""ferrogate beside nginx on loopback: the same work, figures side by side.

    python3 bench/compare.py                    # ~2 min: keep-alive load + 10,000 idle connections
    python3 bench/compare.py --rounds 3 --duration 10 --idle 10000
    python3 bench/compare.py --churn 10000 --idle 0   # also: load while routes change
    python3 bench/compare.py --close --idle 0         # also: a new connection per request

Needs wrk for the load and nginx for the comparison and the upstreams
(`apt-get install wrk nginx`); without nginx only ferrogate is measured, with
small Python upstreams. Everything runs in a temporary directory on free
127.0.0.1 ports and is stopped when the script ends.

Work (the same for both proxies): GET /hello over keep-alive connections,
an allow list of 127.0.0.0/8 in front (ferrogate: ip-restriction; nginx:
allow/deny), weighted round robin over two upstreams with upstream
keep-alive, one worker each.

Printed per proxy: requests/s, p50/p99 latency (wrk), CPU per request split
into user space (the proxy's own code) and kernel (sockets, loopback TCP),
PSS after the run, and for the idle test the PSS each idle keep-alive client
connection holds (N connections, each after one request) and the p99 of the
load with those connections open against without; for ferrogate also the PSS
each idle HTTP/2 (h2c, prior knowledge) connection holds.

With --close, the same load is also run with `Connection: close` on every
request, so that each request comes on a connection of its own: what a
connection costs to accept, serve and close, beside nginx.

With --floor, hyper alone is measured beside them: the example
gateway/examples/hyper_floor.rs (`cargo build --release --example
hyper_floor`), hyper's HTTP/1 server and client on the gateway's runtime
and allocator, proxying to the first upstream over a plain pool of upstream
connections (reused with --close too), with no routing, plugins, access log
or timeouts.
What ferrogate spends above it is the gateway's own; what it spends is
hyper's and tokio's.

With --auth, ferrogate is also run with key-auth and consumer-restriction
after ip-restriction on the route (one consumer, its key sent in an `apikey`
header on every request), and the user-space CPU those two plugins add per
request is printed round by round, paired with the plain route's run.

With --churn N, ferrogate is also measured with N more routes (/r/0..) and
the same load run twice: quiet, and while one Admin API client PUTs those
routes --churn-rate times a second (each PUT swaps a route's two upstream
nodes, a durable write and a new snapshot). Printed: both runs' requests/s,
CPU per request and p99, the CPU one update costs (the CPU added during the
second run over the first's per request, divided by the updates), and the
Admin API's answer times.
"""

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HZ = os.sysconf("SC_CLK_TCK")
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit("process exited early (rc=%s)" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("port %d did not open" % port)


def spawn(argv, cwd):
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(cwd, "stderr.log"), "w"))
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def tree(pid):
    """pid and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu(pid):
    """(user, system) seconds of a process tree."""
    u = s = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            u += int(fields[11])
            s += int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return u / HZ, s / HZ


def pss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- upstreams


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.send_header("X-Upstream", str(self.server.server_port))
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


def start_upstreams(work, nginx):
    ports = [free_port(), free_port()]
    if nginx:
        servers = "".join(
            "server { listen 127.0.0.1:%d; keepalive_requests 1000000; access_log off;"
            " location / { add_header X-Upstream %d; return 200 'ok\\n'; } }\n" % (p, i + 1)
            for i, p in enumerate(ports)
        )
        d = os.path.join(work, "upstream")
        start_nginx(nginx, d, "worker_processes 1;", "http {\n%s}\n" % servers)
    else:
        for p in ports:
            srv = ThreadingHTTPServer(("127.0.0.1", p), Hello)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
    for p in ports:
        wait_port(p, None)
    return ports


# ------------------------------------------------------------------ proxies


def start_nginx(nginx, d, main, http):
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            "daemon off; master_process on; pid %s/nginx.pid; error_log %s/logs/error.log warn;\n"
            "%s\nworker_rlimit_nofile 65536;\nevents { worker_connections 32768; }\n" % (d, d, main)
        )
        f.write(http.replace("http {", "http {\n client_body_temp_path %s; proxy_temp_path %s;"
                             " fastcgi_temp_path %s; uwsgi_temp_path %s; scgi_temp_path %s;\n" % ((d,) * 5), 1))
    return spawn([nginx, "-p", d, "-c", conf], d)


class Nginx:
    name = "nginx-w1"

    def __init__(self, nginx, work, upstreams):
        self.nginx, self.work, self.upstreams = nginx, work, upstreams

    def start(self):
        self.port = free_port()
        d = tempfile.mkdtemp(dir=self.work, prefix="nginx-")
        servers = "".join("server 127.0.0.1:%d weight=1;" % p for p in self.upstreams)
        http = (
            "http {\n access_log off; keepalive_requests 1000000;\n"
            " upstream up { %s keepalive 64; }\n"
            " server { listen 127.0.0.1:%d;\n"
            "  location = /hello { allow 127.0.0.0/8; deny all; proxy_http_version 1.1;"
            " proxy_set_header Connection ''; proxy_pass http://up; }\n"
            "  location / { return 404; } }\n}\n" % (servers, self.port)
        )
        self.proc = start_nginx(self.nginx, d, "worker_processes 1;", http)
        wait_port(self.port, self.proc)

    def stop(self):
        stop(self.proc)


class HyperFloor:
    """hyper's server and client and nothing else (gateway/examples/hyper_floor.rs)."""
    name = "hyper-floor"

    def __init__(self, binary, work, upstreams):
        self.binary, self.work, self.upstreams = binary, work, upstreams

    def start(self):
        self.port = free_port()
        d = tempfile.mkdtemp(dir=self.work, prefix="floor-")
        self.proc = spawn([self.binary, "127.0.0.1:%d" % self.port, "127.0.0.1:%d" % self.upstreams[0]], d)
        wait_port(self.port, self.proc)

    def stop(self):
        stop(self.proc)


# The plugins a typical public route adds (`--traffic`): a rate limit that
# never rejects, a rewrite for the upstream and CORS for browsers.
# What an authenticated public route adds (`--auth`): a consumer's key checked,
# then the consumer allowed by name.
AUTH_CONSUMER = {"username": "bench", "plugins": {"key-auth": {"key": "bench-key"}}}
AUTH_PLUGINS = {"key-auth": {}, "consumer-restriction": {"whitelist": ["bench"]}}
AUTH_HEADERS = ["-H", "apikey: bench-key"]

TRAFFIC_PLUGINS = {
    "limit-count": {"count": 1000000000, "time_window": 60, "key": "remote_addr"},
    "proxy-rewrite": {"uri": "/v2$uri", "headers": {"set": {"X-Via": "gw"}}},
    "cors": {"allow_origins": "https://a.test,https://b.test"},
}


class Ferrogate:
    name = "ferrogate-w1"

    def __init__(self, binary, work, upstreams, extra_plugins=None, name=None, access_log=True, wrapper=(),
                 consumer=None, headers=()):
        self.binary, self.work, self.upstreams = binary, work, upstreams
        # Created before the route; `headers` go on every request of the load.
        self.consumer = consumer
        self.headers = list(headers)
        # A command the binary runs under (valgrind, for bench/hot_code.py).
        self.wrapper = list(wrapper)
        self.extra_plugins = extra_plugins or {}
        self.access_log = access_log
        if name:
            self.name = name

    def start(self):
        self.port, admin = free_port(), free_port()
        d = tempfile.mkdtemp(dir=self.work, prefix="ferrogate-")
        os.makedirs(os.path.join(d, "conf"))
        key = os.urandom(16).hex()
        with open(os.path.join(d, "conf", "config.yaml"), "w") as f:
            f.write(
                "apisix:\n  node_listen: %d\n"
                "nginx_config:\n  worker_processes: 1\n  error_log_level: warn\n"
                "  event:\n    worker_connections: 32768\n"
                "  http:\n    enable_access_log: %s\n"
                "deployment:\n  role: traditional\n"
                "  admin:\n    admin_key: [{name: admin, key: %s, role: admin}]\n"
                "    admin_listen: {ip: 127.0.0.1, port: %d}\n"
                "plugin_attr:\n  prometheus:\n    export_addr: {ip: 127.0.0.1, port: %d}\n"
                % (self.port, "true" if self.access_log else "false", key, admin, free_port())
            )
        self.admin, self.key = admin, key
        self.proc = spawn(self.wrapper + [self.binary, "--config", os.path.join(d, "conf", "config.yaml")], d)
        wait_port(admin, self.proc, timeout=120 if self.wrapper else 20)
        if self.consumer:
            self.admin_put("/apisix/admin/consumers", self.consumer)
        route = {
            "uri": "/hello",
            "plugins": dict({"ip-restriction": {"whitelist": ["127.0.0.0/8"]}}, **self.extra_plugins),
            "upstream": {
                "type": "roundrobin",
                "nodes": {"127.0.0.1:%d" % p: 1 for p in self.upstreams},
            },
        }
        self.admin_put("/apisix/admin/routes/1", route)
        wait_port(self.port, self.proc)

    def admin_put(self, path, body):
        req = urllib.request.Request(
            "http://127.0.0.1:%d%s" % (self.admin, path),
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"X-API-KEY": self.key, "Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=60 if self.wrapper else 10).read()

    def stop(self):
        stop(self.proc)


# --------------------------------------------------------------- measuring


def get(port, path="/hello", headers=()):
    names = dict(h.split(": ", 1) for h in headers if h != "-H")
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), headers=names)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read()


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port, seconds, conns, close=False, extra=()):
    # A browser's Origin on every request, so CORS (--traffic) answers it.
    headers = ["-H", "Origin: https://a.test"] + (["-H", "Connection: close"] if close else []) + list(extra)
    out = subprocess.run(
        ["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "--latency"] + headers
        + ["http://127.0.0.1:%d/hello" % port],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    lat = {}
    for q, v, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[q] = float(v) * UNITS[unit]
    m = re.search(r"^\s*(\d+) requests in", out, re.M)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)$", out, re.M)
    return {
        "requests": int(m.group(1)) if m else 0,
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errs.group(1).strip() if errs else "",
    }


def load(peer, args, close=False):
    extra = getattr(peer, "headers", ())
    wrk(peer.port, 2, args.connections, close, extra)  # warm-up: pools, caches, page faults
    pid = peer.proc.pid
    u0, s0 = cpu(pid)
    t0 = time.time()
    r = wrk(peer.port, args.duration, args.connections, close, extra)
    elapsed = time.time() - t0
    u1, s1 = cpu(pid)
    n = max(r["requests"], 1)
    r.update(
        rps=r["requests"] / args.duration,
        user_us=(u1 - u0) / n * 1e6,
        kernel_us=(s1 - s0) / n * 1e6,
        pss_kib=pss_kib(pid),
        started=t0,
        elapsed_s=elapsed,
    )
    return r


def churn_route(peer, i, flipped):
    nodes = ["127.0.0.1:%d" % p for p in peer.upstreams]
    if flipped:
        nodes.reverse()
    return json.dumps({
        "uri": "/r/%d" % i,
        "plugins": {"ip-restriction": {"whitelist": ["127.0.0.0/8"]}},
        "upstream": {"type": "roundrobin", "nodes": {n: 1 for n in nodes}},
    })


def put_route(conn, peer, i, flipped):
    conn.request("PUT", "/apisix/admin/routes/r%d" % i, body=churn_route(peer, i, flipped),
                 headers={"X-API-KEY": peer.key, "Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status not in (200, 201):
        raise SystemExit("%s: PUT of route r%d answered %d" % (peer.name, i, r.status))


def churn(peer, args):
    """The load quiet, then while --churn routes are updated --churn-rate times a second."""
    admin = http.client.HTTPConnection("127.0.0.1", peer.admin, timeout=30)
    for i in range(args.churn):
        put_route(admin, peer, i, False)
    quiet = load(peer, args)
    done = threading.Event()
    latencies, finished = [], []

    def updater():
        # Open loop: update k is due at start + k / rate, whatever the last took.
        start, k = time.monotonic(), 0
        while not done.is_set():
            wait = start + k / args.churn_rate - time.monotonic()
            if wait > 0 and done.wait(wait):
                break
            t = time.monotonic()
            put_route(admin, peer, k % args.churn, (k // args.churn) % 2 == 0)
            latencies.append(time.monotonic() - t)
            finished.append(time.time())
            k += 1

    thread = threading.Thread(target=updater, daemon=True)
    thread.start()
    try:
        changing = load(peer, args)
    finally:
        done.set()
        thread.join()
        admin.close()
    # Only the updates made while the CPU was measured (not in the warm-up).
    window = (changing["started"], changing["started"] + changing["elapsed_s"])
    updates = max(sum(1 for t in finished if window[0] <= t <= window[1]), 1)
    added = (changing["user_us"] + changing["kernel_us"] - quiet["user_us"] - quiet["kernel_us"])
    lat = sorted(latencies)
    return {
        "quiet": quiet,
        "changing": changing,
        "rps_ratio": changing["rps"] / quiet["rps"] if quiet["rps"] else None,
        "added_cpu_us_per_req": added,
        "cpu_us_per_update": added * changing["requests"] / updates,
        "updates_per_s": updates / changing["elapsed_s"],
        "admin_p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
        "admin_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None,
    }


def idle(peer, args):
    """PSS per idle keep-alive client connection, and the load's p99 with them open."""
    for _ in range(20):
        get(peer.port)
    before = wrk(peer.port, 3, args.connections)
    time.sleep(0.5)
    pss0 = pss_kib(peer.proc.pid)
    request = b"GET /hello HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks = []
    try:
        for _ in range(args.idle):
            s = socket.create_connection(("127.0.0.1", peer.port), timeout=10)
            s.sendall(request)
            got = b""
            while b"ok\n" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    raise SystemExit("%s closed an idle connection early" % peer.name)
                got += chunk
            socks.append(s)
        time.sleep(1.0)
        pss1 = pss_kib(peer.proc.pid)
        during = wrk(peer.port, 3, args.connections)
        alive = sum(1 for s in socks if still_open(s))
    finally:
        for s in socks:
            s.close()
    return {
        "connections": args.idle,
        "still_open": alive,
        "pss_per_conn_kib": (pss1 - pss0) / args.idle,
        "p99_ratio": (during["p99_ms"] or 0) / (before["p99_ms"] or 1),
    }


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


# GET /hello on stream 1, END_STREAM | END_HEADERS; HPACK: :method GET, :scheme http (static
# table), :path and :authority as literals with an indexed name, not indexed.
H2_GET = h2_frame(0x1, 0x5, 1, b"\x82\x86\x04\x06/hello\x01\x01x")


def h2_get(port):
    """A prior-knowledge HTTP/2 connection that has made one request and is left open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(H2_PREFACE + h2_frame(0x4, 0, 0) + H2_GET)
    buf = b""
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("HTTP/2 connection closed early")
            buf += chunk
        n = int.from_bytes(buf[:3], "big")
        kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        buf = buf[9 + n:]
        if kind == 0x4 and not flags & 0x1:
            s.sendall(h2_frame(0x4, 0x1, 0))
        elif kind == 0x7:
            raise SystemExit("HTTP/2 connection refused (GOAWAY)")
        elif stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            return s


def idle_h2(peer, args):
    """PSS per idle HTTP/2 (h2c) client connection, each after one request."""
    for _ in range(20):
        h2_get(peer.port).close()
    time.sleep(0.5)
    pss0 = pss_kib(peer.proc.pid)
    socks = []
    try:
        for _ in range(args.idle):
            socks.append(h2_get(peer.port))
        time.sleep(1.0)
        pss1 = pss_kib(peer.proc.pid)
        alive = sum(1 for s in socks if still_open(s))
    finally:
        for s in socks:
            s.close()
    return {"connections": args.idle, "still_open": alive, "pss_per_conn_kib": (pss1 - pss0) / args.idle}


def still_open(s):
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/ferrogate")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--duration", type=int, default=10, help="seconds of measured load per run")
    ap.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections (0: skip)")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--churn", type=int, default=0,
                    help="also measure ferrogate with this many more routes, quiet and while they change (0: skip)")
    ap.add_argument("--churn-rate", type=float, default=400.0, help="route updates per second with --churn")
    ap.add_argument("--close", action="store_true",
                    help="also run the load with a new connection per request (Connection: close)")
    ap.add_argument("--traffic", action="store_true",
                    help="also run ferrogate with limit-count, proxy-rewrite and cors on the route")
    ap.add_argument("--auth", action="store_true",
                    help="also run ferrogate with key-auth and consumer-restriction on the route: "
                         "what the plugin runtime adds per request for an authenticated route")
    ap.add_argument("--observe", action="store_true",
                    help="also run ferrogate without its access log, and with the access log plus "
                         "prometheus on the route: what observability costs per request")
    ap.add_argument("--floor", action="store_true",
                    help="also run hyper alone as a proxy (gateway/examples/hyper_floor.rs; "
                         "cargo build --release --example hyper_floor): the CPU hyper and tokio take")
    args = ap.parse_args()

    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk nginx")
    binary = os.path.abspath(args.bin)
    if not os.access(binary, os.X_OK):
        raise SystemExit("%s not found: cargo build --release" % binary)
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(args.idle * 2 + 1000, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    work = tempfile.mkdtemp(prefix="ferrogate-bench-")
    try:
        ups = start_upstreams(work, nginx)
        peers = [Ferrogate(binary, work, ups)]
        if args.traffic:
            peers.append(Ferrogate(binary, work, ups, TRAFFIC_PLUGINS, "ferrogate-traffic"))
        if args.auth:
            peers.append(Ferrogate(binary, work, ups, AUTH_PLUGINS, "ferrogate-auth",
                                   consumer=AUTH_CONSUMER, headers=AUTH_HEADERS))
        if args.observe:
            peers.append(Ferrogate(binary, work, ups, {}, "ferrogate-dark", access_log=False))
            peers.append(Ferrogate(binary, work, ups, {"prometheus": {}}, "ferrogate-observed"))
        if args.floor:
            floor = os.path.join(os.path.dirname(binary), "examples", "hyper_floor")
            if not os.access(floor, os.X_OK):
                raise SystemExit("%s not found: cargo build --release --example hyper_floor" % floor)
            peers.append(HyperFloor(floor, work, ups))
        if nginx:
            peers.append(Nginx(nginx, work, ups))
        else:
            print("nginx not installed: ferrogate only, with Python upstreams (slow)")
        results = {p.name: {"load": [], "close": [], "idle": [], "idle_h2": [], "churn": []} for p in peers}
        for rnd in range(args.rounds):
            for peer in peers:
                peer.start()
                try:
                    status, body = get(peer.port, headers=getattr(peer, "headers", ()))
                    if status != 200 or body != b"ok\n":
                        raise SystemExit("%s answered %s %r" % (peer.name, status, body))
                    r = load(peer, args)
                    results[peer.name]["load"].append(r)
                    print("round %d %-13s %8.0f req/s  user %.1f us  kernel %.1f us  p99 %.2f ms" % (
                        rnd + 1, peer.name, r["rps"], r["user_us"], r["kernel_us"], r["p99_ms"] or 0), flush=True)
                    if args.close:
                        r = load(peer, args, close=True)
                        results[peer.name]["close"].append(r)
                        print("round %d %-13s %8.0f req/s  user %.1f us  kernel %.1f us  p99 %.2f ms"
                              "  (a new connection per request)" % (
                                  rnd + 1, peer.name, r["rps"], r["user_us"], r["kernel_us"], r["p99_ms"] or 0),
                              flush=True)
                finally:
                    peer.stop()
                if (args.idle and not isinstance(peer, HyperFloor) and not getattr(peer, "extra_plugins", None)
                        and getattr(peer, "access_log", True)):
                    peer.start()
                    try:
                        r = idle(peer, args)
                        results[peer.name]["idle"].append(r)
                        print("round %d %-13s %d idle connections: %.2f KiB each, p99 with them %.2fx" % (
                            rnd + 1, peer.name, r["still_open"], r["pss_per_conn_kib"], r["p99_ratio"]), flush=True)
                    finally:
                        peer.stop()
                if args.churn and peer is peers[0]:
                    peer.start()
                    try:
                        r = churn(peer, args)
                        results[peer.name]["churn"].append(r)
                        print("round %d %-13s %d routes: %.0f -> %.0f req/s while %.0f updates/s (%.2fx), "
                              "%.0f us CPU per update, Admin API p99 %.2f ms" % (
                                  rnd + 1, peer.name, args.churn, r["quiet"]["rps"], r["changing"]["rps"],
                                  r["updates_per_s"], r["rps_ratio"], r["cpu_us_per_update"],
                                  r["admin_p99_ms"]), flush=True)
                    finally:
                        peer.stop()
                if args.idle and isinstance(peer, Ferrogate) and not peer.extra_plugins and peer.access_log:
                    # nginx serves h2c only on a listener that speaks nothing else.
                    peer.start()
                    try:
                        r = idle_h2(peer, args)
                        results[peer.name]["idle_h2"].append(r)
                        print("round %d %-13s %d idle HTTP/2 connections: %.2f KiB each" % (
                            rnd + 1, peer.name, r["still_open"], r["pss_per_conn_kib"]), flush=True)
                    finally:
                        peer.stop()
        report(peers, results, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for p in PROCS:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)


def table(peers, results, run, rows, base):
    """One row per figure, one column per proxy; ratios to nginx beside."""
    print("| | " + " | ".join(p.name for p in peers) + " |")
    print("|---|" + "---:|" * len(peers))
    for label, key, fmt in rows:
        cells = []
        for p in peers:
            v = median([r[key] for r in results[p.name][run]])
            if key == "pss_kib" and v is not None:
                v = v / 1024
            cell = fmt % v if v is not None else "-"
            if base and p.name != "nginx-w1" and v is not None:
                b = median([r[key] for r in base[run]])
                if key == "pss_kib":
                    b = b / 1024
                if b:
                    cell += " (%.2fx)" % (v / b)
            cells.append(cell)
        print("| %s | %s |" % (label, " | ".join(cells)))


def report(peers, results, args):
    base = results.get("nginx-w1")
    if "ferrogate-dark" in results and "ferrogate-observed" in results:
        # Paired by round: both ran back to back under the same load on the
        # machine, so the difference is steadier than that of the medians.
        diffs = [o["user_us"] - d["user_us"] for d, o in
                 zip(results["ferrogate-dark"]["load"], results["ferrogate-observed"]["load"])]
        print("\nobservability (access log + prometheus) over none, user-space CPU per request: "
              "%s us, median %.2f us" % (" ".join("%.2f" % x for x in diffs), median(diffs)))
    if "ferrogate-auth" in results:
        diffs = [a["user_us"] - p["user_us"] for p, a in
                 zip(results["ferrogate-w1"]["load"], results["ferrogate-auth"]["load"])]
        print("\nkey-auth + consumer-restriction over ip-restriction alone, user-space CPU per request: "
              "%s us, median %.2f us" % (" ".join("%.2f" % x for x in diffs), median(diffs)))
    rows = [
        ("req/s", "rps", "%.0f"),
        ("p50 ms", "p50_ms", "%.3f"),
        ("p99 ms", "p99_ms", "%.3f"),
        ("CPU us/req, user space", "user_us", "%.2f"),
        ("CPU us/req, kernel", "kernel_us", "%.2f"),
        ("PSS MiB after the load", "pss_kib", "%.1f"),
    ]
    print("\nkeep-alive GET /hello, %d connections, %d s, medians of %d round(s)\n" % (
        args.connections, args.duration, args.rounds))
    table(peers, results, "load", rows, base)
    if args.idle:
        for label, key, fmt in (
            ("PSS per idle connection, KiB (%d open)" % args.idle, "pss_per_conn_kib", "%.2f"),
            ("load p99 with them open / without", "p99_ratio", "%.2fx"),
        ):
            cells = []
            for p in peers:
                v = median([r[key] for r in results[p.name]["idle"]])
                cells.append(fmt % v if v is not None else "-")
            print("| %s | %s |" % (label, " | ".join(cells)))
        cells = []
        for p in peers:
            v = median([r["pss_per_conn_kib"] for r in results[p.name]["idle_h2"]])
            cells.append("%.2f" % v if v is not None else "-")
        print("| PSS per idle HTTP/2 (h2c) connection, KiB (%d open) | %s |" % (args.idle, " | ".join(cells)))
    if args.close:
        print("\nthe same with a new connection per request (Connection: close)\n")
        table(peers, results, "close", rows[:-1], base)
    runs = results[peers[0].name]["churn"]
    if runs:
        print("\n%s with %d more routes, quiet and while %.0f route updates/s run, medians of %d round(s)\n" % (
            peers[0].name, args.churn, args.churn_rate, len(runs)))
        print("| | quiet | while routes change |")
        print("|---|---:|---:|")
        for label, key, fmt in (("req/s", "rps", "%.0f"), ("p99 ms", "p99_ms", "%.3f"),
                                ("CPU us/req, user space", "user_us", "%.2f"),
                                ("CPU us/req, kernel", "kernel_us", "%.2f")):
            q = median([r["quiet"][key] for r in runs])
            c = median([r["changing"][key] for r in runs])
            ratio = " (%.2fx)" % (c / q) if q and c is not None else ""
            print("| %s | %s | %s%s |" % (label, fmt % q if q is not None else "-",
                                          fmt % c if c is not None else "-", ratio))
        print("| CPU per route update, us | | %.0f |" % median([r["cpu_us_per_update"] for r in runs]))
        print("| Admin API answer p50 / p99, ms | | %.2f / %.2f |" % (
            median([r["admin_p50_ms"] for r in runs]), median([r["admin_p99_ms"] for r in runs])))


if __name__ == "__main__":
    main()
