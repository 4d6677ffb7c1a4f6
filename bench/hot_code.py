#!/usr/bin/env python3
"""Lists the functions that serve requests, for the linker to place together.

    cargo build --release && python3 bench/hot_code.py && cargo build --release

The release binary runs under valgrind's callgrind, counting nothing while it
starts and takes its route; then wrk sends it keep-alive requests (50
connections), requests that each open a connection, and the gateway idles a
few seconds so its timers fire. Every function of the binary that ran in that
window is written to gateway/hot-code.txt, most instructions first, by its
linker (mangled) name. gateway/build.rs hands the file to the linker (lld's
--symbol-ordering-file), which puts those functions at the start of the text
segment, one after the other.

Why: the kernel maps a binary's code 64 KiB at a time around each page first
touched, so code that serves requests, spread over the 14 MiB text segment,
kept 4.5 to 5.5 MiB of it resident in every gateway process; packed together
it is about 0.6 MiB. Names the binary no longer has (code changed since the
file was made) are skipped by the linker, so a stale list costs memory, never
correctness; the script prints how much of the list the binary still has.
The names carry a hash of each crate's build settings (the toolchain, the
features cargo settles on), so the list is made from, and fits, the build of
the gateway alone: `cargo build --release` (the workspace's default member),
as CI and `cargo run --release` build, and `-p ferrogate` alike; a build with
`--workspace` differs in half of the names. `--check` prints how much
of the list a built binary has (and exits 1 below 80%) without running
anything.

Needs valgrind and wrk (`apt-get install valgrind wrk`; nginx too, or the
upstreams are Python's). Takes about a minute.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the gateway and upstream set-up of the comparison)

HEADER = """\
# The functions that serve requests, for the linker to place together at the
# start of the text segment (see gateway/build.rs). Generated from a release
# build by bench/hot_code.py; regenerate after changes to the request path.
# Hottest first. Names the binary lacks are ignored.
"""


def functions_by_cost(callgrind_out, binary):
    """(mangled name, self instructions) of `binary`'s functions in a
    callgrind output file written with --compress-strings=no."""
    cost = Counter()
    obj = fn = None
    calling = False
    for line in open(callgrind_out, encoding="utf-8", errors="replace"):
        if line.startswith("ob="):
            obj = line[3:].strip()
        elif line.startswith("fn="):
            fn = line[3:].strip()
        elif line.startswith("calls="):
            calling = True  # the next cost line is the callee's, inclusive
        elif line[:1].isdigit() or line[:1] in "+-*":
            if calling:
                calling = False
                continue
            parts = line.split()
            if len(parts) >= 2 and fn and obj == binary:
                cost[fn] += int(parts[1])
    return [(name, c) for name, c in cost.most_common() if c > 0]


def symbol_sizes(binary):
    """The size of each function the binary's symbol table names."""
    sizes = {}
    nm = subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True)
    for line in nm.stdout.splitlines():
        f = line.split()
        if len(f) == 4:
            sizes.setdefault(f[3], int(f[1], 16))
    return sizes


def check(binary, listed):
    names = [n.strip() for n in open(listed) if n.strip() and not n.startswith("#")]
    sizes = symbol_sizes(binary)
    found = sum(1 for n in names if n in sizes)
    share = found / max(len(names), 1)
    print("%s: %d of the %d functions in %s (%.0f%%)%s" % (
        binary, found, len(names), listed, share * 100,
        "" if share >= 0.8 else ": stale, regenerate it (see bench/hot_code.py)"))
    return 0 if share >= 0.8 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/ferrogate")
    ap.add_argument("--out", default="gateway/hot-code.txt")
    ap.add_argument("--seconds", type=int, default=15, help="keep-alive load under callgrind")
    ap.add_argument("--check", action="store_true",
                    help="only tell how much of --out the binary still has")
    args = ap.parse_args()
    if args.check:
        return check(os.path.realpath(args.bin), args.out)
    for tool in ("valgrind", "callgrind_control", "wrk", "nm"):
        if not shutil.which(tool):
            raise SystemExit("%s is needed: apt-get install valgrind wrk binutils" % tool)
    binary = os.path.realpath(args.bin)
    if not os.access(binary, os.X_OK):
        raise SystemExit("%s not found: cargo build --release" % binary)
    nginx = shutil.which("nginx")

    work = tempfile.mkdtemp(prefix="ferrogate-hot-")
    out = os.path.join(work, "callgrind.out")
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--demangle=no",
               "--compress-strings=no", "--compress-pos=no", "--callgrind-out-file=" + out]
    try:
        ups = compare.start_upstreams(work, nginx)
        gw = compare.Ferrogate(binary, work, ups, wrapper=wrapper)
        gw.start()
        pid = str(gw.proc.pid)
        subprocess.run(["callgrind_control", "--instr=on", pid], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        url = "http://127.0.0.1:%d/hello" % gw.port
        status, _ = compare.get(gw.port)
        if status != 200:
            raise SystemExit("the gateway answered %d" % status)
        subprocess.run(["wrk", "-t1", "-c50", "-d%ds" % args.seconds, url], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["wrk", "-t1", "-c10", "-d%ds" % max(args.seconds // 2, 1),
                        "-H", "Connection: close", url], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        time.sleep(5)  # pool sweeps, idle timeouts, the code release task
        subprocess.run(["callgrind_control", "--instr=off", pid], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["callgrind_control", "--dump", pid], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        gw.stop()
        dumps = [os.path.join(work, f) for f in os.listdir(work) if f.startswith("callgrind.out")]
        funcs = Counter()
        for d in dumps:
            for name, c in functions_by_cost(d, binary):
                funcs[name] += c
    finally:
        for p in compare.PROCS:
            compare.stop(p)
        shutil.rmtree(work, ignore_errors=True)
    if not funcs:
        raise SystemExit("callgrind saw no function of %s" % binary)

    sizes = symbol_sizes(binary)
    names = [name for name, _ in funcs.most_common()]
    found = [n for n in names if n in sizes]
    with open(args.out, "w") as f:
        f.write(HEADER)
        for n in names:
            if not re.search(r"\s", n):
                f.write(n + "\n")
    print("%d functions, %d KiB of code (%d of them named in the binary's symbol table) -> %s" % (
        len(names), sum(sizes[n] for n in found) // 1024, len(found), args.out))


if __name__ == "__main__":
    sys.exit(main())
