#!/usr/bin/env python3
"""ferrogate's HTTPS beside nginx's on loopback: handshakes and requests.

    python3 bench/tls_compare.py                 # ~1.5 min
    python3 bench/tls_compare.py --rounds 3 --duration 10

Needs nginx (the comparison and the upstreams), wrk and the openssl command
(`apt-get install nginx wrk openssl`). Both servers get the same ECDSA P-256
certificate, one worker each, APISIX's TLS defaults (TLSv1.2 and TLSv1.3, a
server-side session cache, no session tickets), and proxy GET /hello to the
same two upstreams with upstream keep-alive.

Measured per server:
- full handshakes per second: `openssl s_time -new` (a new TCP connection
  and a full TLS 1.3 handshake each, one client process);
- resumed handshakes per second: `openssl s_time -reuse -tls1_2` (session
  resumption from the server's cache);
- HTTPS keep-alive requests per second (wrk, 50 connections).
Each with the server's CPU time per handshake or request, split into user
space (its own code and the crypto) and kernel. The client runs on the same
2 cores, so rates are bounded by it too; CPU per operation is the server's
own cost.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402  (free_port, spawn, stop, cpu, upstreams, nginx)


def make_cert(work):
    key, cert = os.path.join(work, "key.pem"), os.path.join(work, "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )
    return cert, key


class NginxTls:
    name = "nginx-w1"

    def __init__(self, nginx, work, upstreams, cert, key):
        self.nginx, self.work, self.upstreams, self.cert, self.key = nginx, work, upstreams, cert, key

    def start(self):
        self.port = c.free_port()
        d = tempfile.mkdtemp(dir=self.work, prefix="nginx-tls-")
        servers = "".join("server 127.0.0.1:%d weight=1;" % p for p in self.upstreams)
        http = (
            "http {\n access_log off; keepalive_requests 1000000;\n"
            " upstream up { %s keepalive 64; }\n"
            " server { listen 127.0.0.1:%d ssl http2; server_name bench.test;\n"
            "  ssl_certificate %s; ssl_certificate_key %s;\n"
            "  ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:20m;"
            " ssl_session_timeout 10m; ssl_session_tickets off;\n"
            "  location = /hello { proxy_http_version 1.1; proxy_set_header Connection '';"
            " proxy_pass http://up; }\n"
            "  location / { return 404; } }\n}\n" % (servers, self.port, self.cert, self.key)
        )
        self.proc = c.start_nginx(self.nginx, d, "worker_processes 1;", http)
        c.wait_port(self.port, self.proc)

    def stop(self):
        c.stop(self.proc)


class FerrogateTls:
    name = "ferrogate-w1"

    def __init__(self, binary, work, upstreams, cert, key):
        self.binary, self.work, self.upstreams, self.cert, self.key = binary, work, upstreams, cert, key

    def start(self):
        http_port, admin, self.port = c.free_port(), c.free_port(), c.free_port()
        d = tempfile.mkdtemp(dir=self.work, prefix="ferrogate-tls-")
        os.makedirs(os.path.join(d, "conf"))
        key = os.urandom(16).hex()
        with open(os.path.join(d, "conf", "config.yaml"), "w") as f:
            # s_time sends no SNI: fallback_sni names the certificate.
            f.write(
                "apisix:\n  node_listen: [{ip: 127.0.0.1, port: %d}]\n"
                "  ssl:\n    listen: [{ip: 127.0.0.1, port: %d}]\n    fallback_sni: bench.test\n"
                "nginx_config:\n  worker_processes: 1\n"
                "  event:\n    worker_connections: 32768\n"
                "deployment:\n  role: traditional\n"
                "  admin:\n    admin_key: [{name: admin, key: %s, role: admin}]\n"
                "    admin_listen: {ip: 127.0.0.1, port: %d}\n" % (http_port, self.port, key, admin)
            )
        self.proc = c.spawn([self.binary, "--config", os.path.join(d, "conf", "config.yaml")], d)
        c.wait_port(admin, self.proc)
        with open(self.cert) as f:
            cert = f.read()
        with open(self.key) as f:
            pkey = f.read()
        for path, body in [
            ("ssls/1", {"cert": cert, "key": pkey, "snis": ["bench.test"]}),
            ("routes/1", {"uri": "/hello", "upstream": {
                "type": "roundrobin", "nodes": {"127.0.0.1:%d" % p: 1 for p in self.upstreams}}}),
        ]:
            req = urllib.request.Request(
                "http://127.0.0.1:%d/apisix/admin/%s" % (admin, path),
                data=json.dumps(body).encode(), method="PUT",
                headers={"X-API-KEY": key, "Content-Type": "application/json"},
            )
            urllib.request.urlopen(req, timeout=10).read()
        c.wait_port(self.port, self.proc)

    def stop(self):
        c.stop(self.proc)


def s_time(port, mode, seconds):
    """Handshakes per second by `openssl s_time` (`-new` or `-reuse`).
    Resumption is measured with TLS 1.2: s_time keeps its session before a
    TLS 1.3 server's ticket arrives, so it would not resume with 1.3."""
    extra = ["-tls1_2"] if mode == "-reuse" else []
    out = subprocess.run(
        ["openssl", "s_time", "-connect", "127.0.0.1:%d" % port, mode, "-time", str(seconds)] + extra,
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    m = re.search(r"(\d+) connections in ([\d.]+)s", out)
    if not m:
        m = re.search(r"(\d+) connections in (\d+) real seconds", out)
    return (int(m.group(1)), float(m.group(2))) if m else (0, 1.0)


def measured(peer, run):
    """Runs `run()` -> (count, seconds) and adds the server's CPU per operation."""
    pid = peer.proc.pid
    u0, s0 = c.cpu(pid)
    count, seconds = run()
    u1, s1 = c.cpu(pid)
    n = max(count, 1)
    return {
        "per_s": count / seconds,
        "user_us": (u1 - u0) / n * 1e6,
        "kernel_us": (s1 - s0) / n * 1e6,
    }


def https_wrk(port, seconds, conns):
    out = subprocess.run(
        ["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "https://127.0.0.1:%d/hello" % port],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    m = re.search(r"^\s*(\d+) requests in", out, re.M)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        print("  wrk: %s non-2xx answers" % bad.group(1))
    return int(m.group(1)) if m else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/ferrogate")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    nginx = shutil.which("nginx")
    for tool in ("nginx", "wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit("%s is needed (apt-get install nginx wrk openssl)" % tool)
    work = tempfile.mkdtemp(prefix="ferrogate-tls-bench-")
    try:
        cert, key = make_cert(work)
        ups = c.start_upstreams(work, nginx)
        peers = [NginxTls(nginx, work, ups, cert, key), FerrogateTls(args.bin, work, ups, cert, key)]
        results = {p.name: [] for p in peers}
        for r in range(args.rounds):
            for p in peers:
                p.start()
                try:
                    s_time(p.port, "-new", 2)  # warm-up
                    row = {
                        "full": measured(p, lambda: s_time(p.port, "-new", args.duration)),
                        "resumed": measured(p, lambda: s_time(p.port, "-reuse", args.duration)),
                    }
                    https_wrk(p.port, 2, 50)
                    row["keepalive"] = measured(
                        p, lambda: (https_wrk(p.port, args.duration, 50), args.duration))
                    results[p.name].append(row)
                    print("round %d %s: %s" % (r + 1, p.name, json.dumps(row)))
                finally:
                    p.stop()
        print("\nmedians over %d round(s); CPU is the server's, per handshake or request" % args.rounds)
        print("%-14s %-22s %10s %9s %9s" % ("server", "measure", "per s", "user us", "kernel us"))
        for name, rows in results.items():
            for what in ("full", "resumed", "keepalive"):
                label = {"full": "full handshakes", "resumed": "resumed handshakes",
                         "keepalive": "HTTPS keep-alive req"}[what]
                med = {k: c.median([row[what][k] for row in rows]) for k in ("per_s", "user_us", "kernel_us")}
                print("%-14s %-22s %10.0f %9.1f %9.1f" % (name, label, med["per_s"], med["user_us"], med["kernel_us"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for p in list(c.PROCS):
            c.stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
