#!/usr/bin/env python3
"""Send 100 MB through echo_server.py and check that all of it comes back, intact.

Run it:      python bench/echo_bulk.py             (from the project's root; about a second)

The client sends as fast as the connection takes data and reads what comes back as it
goes. The server stops reading whenever its unsent echo for us passes its cap, so TCP
slows us down instead of the server's memory growing. We report the time, the rate, and
the server's peak memory (VmHWM, Linux only).
"""
import argparse
import os
import select
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "echo_server.py")


def peak_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return None


def echo_all(sock, payload, timeout):
    """Send payload while reading the echo; return the bytes that came back."""
    sock.setblocking(False)
    view, sent, received = memoryview(payload), 0, bytearray()
    end = time.monotonic() + timeout
    while len(received) < len(payload) and time.monotonic() < end:
        want_write = [sock] if sent < len(payload) else []
        readable, writable, _ = select.select([sock], want_write, [], 1)
        if writable:
            sent += sock.send(view[sent:sent + 256 * 1024])
        if readable:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += data
    return bytes(received)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Echo a large payload through echo_server.py.")
    parser.add_argument("--mb", type=int, default=100, help="megabytes to send (default: %(default)s)")
    args = parser.parse_args(argv)
    payload = os.urandom(args.mb * 1024 * 1024)
    server = subprocess.Popen([sys.executable, SERVER, "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        port = int(server.stdout.readline().rsplit(b":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            start = time.perf_counter()
            echoed = echo_all(sock, payload, timeout=120)
            seconds = time.perf_counter() - start
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(5)
    print(f"{args.mb} MB echoed {'intact' if echoed == payload else 'WRONG'} in {seconds:.2f} s "
          f"({args.mb / seconds:.0f} MB/s); server peak RSS "
          + (f"{rss:.1f} MB" if rss else "not measured (no /proc)"))
    return 0 if echoed == payload else 1


if __name__ == "__main__":
    sys.exit(main())
