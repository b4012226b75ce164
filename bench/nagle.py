#!/usr/bin/env python3
"""How much does TCP_NODELAY matter to a chat line? Measure it, with and without.

Run it:      python bench/nagle.py              (from the project's root; about 2 seconds)

It starts chat_server.py twice on a free loopback port: once as it is, and once with its
setsockopt(TCP_NODELAY) calls turned into no-ops. Two clients then talk, and we time how
long the second of two quick lines takes to reach the other client.

Why the second line: Nagle's algorithm lets a small segment out at once when nothing is
unacknowledged, but holds the next one until the first is acknowledged. A receiver that
also talks delays its acknowledgements (about 40 ms on Linux), hoping to ride them on its
own data. Line two then waits for that timer.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "chat_server.py")
# Runs the server with TCP_NODELAY ignored, without editing the file.
WITHOUT_NODELAY = (
    "import runpy, socket, sys\n"
    "real = socket.socket.setsockopt\n"
    "def setsockopt(self, level, option, value, *rest):\n"
    "    if (level, option) != (socket.IPPROTO_TCP, socket.TCP_NODELAY):\n"
    "        real(self, level, option, value, *rest)\n"
    "socket.socket.setsockopt = setsockopt\n"
    "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def read_line(f):
    line = f.readline()
    if not line:
        raise SystemExit("error: the server closed the connection")
    return line


def measure(cmd, rounds):
    server = subprocess.Popen(cmd + ["--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        port = int(server.stdout.readline().rsplit(b":", 1)[1])
        alice = socket.create_connection(("127.0.0.1", port), timeout=5)
        bob = socket.create_connection(("127.0.0.1", port), timeout=5)
        for sock in (alice, bob):  # the clients send at once; only the server is under test
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        alice_in, bob_in = alice.makefile("rb"), bob.makefile("rb")
        read_line(alice_in), read_line(bob_in), read_line(alice_in)  # welcomes, join notice
        delays = []
        for _ in range(rounds):
            alice.sendall(b"one\n")
            read_line(bob_in)
            start = time.perf_counter()
            alice.sendall(b"two\n")
            read_line(bob_in)
            delays.append((time.perf_counter() - start) * 1000)
            bob.sendall(b"reply\n")  # bob talks too, as chat users do
            read_line(alice_in)
        alice.close()
        bob.close()
        return delays
    finally:
        server.terminate()
        server.wait(5)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time a chat line with and without TCP_NODELAY.")
    parser.add_argument("--rounds", type=int, default=20, help="lines to time in each run (default: %(default)s)")
    args = parser.parse_args(argv)
    runs = [("with TCP_NODELAY (as shipped)", [sys.executable, SERVER]),
            ("without TCP_NODELAY", [sys.executable, "-c", WITHOUT_NODELAY, SERVER])]
    for label, cmd in runs:
        delays = measure(cmd, args.rounds)
        print(f"{label:32} median {statistics.median(delays):6.2f} ms   max {max(delays):6.2f} ms"
              f"   ({args.rounds} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
