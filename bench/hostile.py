#!/usr/bin/env python3
"""What one hostile client costs everyone else: the others' latency in a chat room.

    python bench/hostile.py                      # our chat server, every case
    python bench/hostile.py --chat "python OLD/chat_server.py --port {port}" --chat ...

For each server command and each case, a fresh server on a free loopback port gets four
readers and one sender that sends a timestamped 100-byte line every 10 ms; the readers
report how long each line took to reach them (p50, p99, max), how many arrived, and who
was dropped. The cases:

  quiet    nobody hostile.
  empty    a client that sends nothing but "\\n", as fast as the server takes it.

A reader that drips (reads a little before each deadline) is tested in test_chat.py,
with a short --stall-budget. Every loop here is bounded in time; all traffic stays on 127.0.0.1.
"""
import argparse
import os
import select
import shlex
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = f"{sys.executable} {os.path.join(HERE, '..', 'chat_server.py')} --port {{port}}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command):
    port = free_port()
    proc = subprocess.Popen(shlex.split(command.format(port=port)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    return proc, port


def connect(port, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def run_case(command, case, seconds):
    proc, port = start(command)
    try:
        readers = [connect(port) for _ in range(4)]
        sender = connect(port)
        attacker = connect(port) if case == "empty" else None
        time.sleep(0.2)
        bufs = {r: bytearray() for r in readers}
        delays, closed = [], set()
        start_at = time.monotonic()
        measure_from = start_at + 1
        end = measure_from + seconds
        next_line = start_at
        pending = bytearray()
        flood = b"\n" * 65536
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_line and not pending:
                pending += b"T %.6f " % time.monotonic() + b"y" * 80 + b"\n"
                next_line += 0.01
            want_write = [sender] if pending else []
            if case == "empty" and attacker not in closed:
                want_write.append(attacker)
            r, w, _ = select.select([x for x in readers if x not in closed], want_write, [], 0.005)
            if sender in w:
                try:
                    del pending[:sender.send(pending)]
                except BlockingIOError:
                    pass
            if attacker in w:
                try:
                    attacker.send(flood)
                except (BlockingIOError, ConnectionError):
                    pass
            for sock in r:
                try:
                    data = sock.recv(1 << 20)
                except ConnectionError:
                    data = b""
                if not data:
                    closed.add(sock)
                    continue
                buf = bufs[sock]
                buf += data
                *lines, rest = buf.split(b"\n")
                bufs[sock] = bytearray(rest)
                t = time.monotonic()
                for line in lines:
                    if line.startswith(b"T ") and t >= measure_from:
                        delays.append(t - float(line.split()[1]))
        expected = seconds / 0.01 * len(readers)
        return delays, expected, len(closed - {attacker})
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        err = proc.stderr.read().decode(errors="replace")
        dropped = err.count("too slow")
        run_case.last_dropped = dropped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chat", action="append", help="server command with {port} (repeatable)")
    parser.add_argument("--cases", default="quiet,empty")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window per case")
    args = parser.parse_args()
    commands = args.chat or [DEFAULT]
    print(f"{'case':<6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'arrived':>9} {'readers lost':>12} {'server dropped':>14}  server")
    for case in args.cases.split(","):
        for command in commands:
            delays, expected, lost = run_case(command, case, args.seconds)
            q = sorted(delays) or [float("nan")]
            p = lambda f: q[min(len(q) - 1, int(f * len(q)))] * 1000
            print(f"{case:<6} {p(0.5):8.2f} {p(0.99):8.2f} {q[-1] * 1000:8.2f} "
                  f"{len(delays):>5}/{int(expected):<4} {lost:>12} {run_case.last_dropped:>14}  {command}")


if __name__ == "__main__":
    main()
