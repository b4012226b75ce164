#!/usr/bin/env python3
"""What clients that never read cost the host, and how long they stall the room.

Run it:      python bench/slow_readers.py                 (Linux: reads /proc)
Options:     python bench/slow_readers.py --help

It starts chat_server.py on a free port and connects N clients that never read, one
client that reads everything, and one that sends 100-byte lines as fast as TCP takes
them, for a few seconds. It reports:
- the kernel's TCP memory for the whole machine (/proc/net/sockstat, "mem", in pages),
  before and at its peak, and what that comes to per client that never reads;
- the server's peak RSS;
- how many of the never-readers the server dropped, and whether the reader was;
- the longest gap between two lines at the reader: how long the stuck clients held the
  room back.
Everything stays on 127.0.0.1, and every loop is bounded in time.
"""
import argparse
import os
import select
import shlex
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "chat_server.py")


def tcp_memory_pages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stuck", type=int, default=50, help="clients that never read (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6, help="how long the sender sends (default: %(default)s)")
    parser.add_argument("--server", default=f"{shlex.quote(sys.executable)} {shlex.quote(SERVER)} --port {{port}}",
                        help="command that starts the server on {port} (default: chat_server.py)")
    args = parser.parse_args(argv)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(shlex.split(args.server.format(port=port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    socks = []
    try:
        server.stdout.readline()
        page = os.sysconf("SC_PAGE_SIZE")
        before = tcp_memory_pages()
        stuck = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.stuck)]
        reader = socket.create_connection(("127.0.0.1", port))
        sender = socket.create_connection(("127.0.0.1", port))
        socks = stuck + [reader, sender]
        for sock in (reader, sender):
            sock.setblocking(False)
        line = b"x" * 99 + b"\n"
        chunk = line * 640  # 64 KB
        peak, last_line_at, longest_gap, received = before, None, 0.0, 0
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            readable, writable, _ = select.select([reader, sender], [sender], [], 0.05)
            if sender in writable:
                try:
                    sender.send(chunk)
                except (BlockingIOError, ConnectionError):
                    pass
            for sock in readable:
                try:
                    data = sock.recv(1 << 20)
                except (BlockingIOError, ConnectionError):
                    continue
                if sock is reader and data:
                    now = time.monotonic()
                    if last_line_at is not None and data.count(b"x" * 99):
                        longest_gap = max(longest_gap, now - last_line_at)
                    if data.count(b"x" * 99):
                        last_line_at = now
                    received += len(data)
            peak = max(peak, tcp_memory_pages())
        rss = peak_rss_mb(server.pid)
    finally:
        for sock in socks:
            sock.close()
        server.terminate()
        _, log = server.communicate(timeout=10)
    log = log.decode(errors="replace")
    dropped = log.count("dropped: too slow")
    extra_kb = (peak - before) * page / 1024
    print(f"{args.stuck} clients that never read, one sender flat out for {args.seconds:g} s")
    print(f"  kernel TCP memory: {before * page / 1024:.0f} KB before, {peak * page / 1024:.0f} KB at the peak "
          f"({extra_kb / max(args.stuck, 1):.0f} KB per never-reader, both ends of loopback)")
    print(f"  server peak RSS: {rss:.1f} MB")
    print(f"  dropped as too slow: {dropped} (the reader among them: "
          f"{'yes' if dropped > args.stuck else 'no'})")
    print(f"  the reader got {received / 1e6:.1f} MB; longest gap between lines: {longest_gap:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
