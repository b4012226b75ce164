#!/usr/bin/env python3
"""What one hostile client costs everyone else: the others' latency in a chat room.

    python bench/hostile.py                      # our chat server, every case
    python bench/hostile.py --chat "python OLD/chat_server.py --port {port}" --chat ...

For each server command and each case, a fresh server on a free loopback port gets four
readers and one sender that sends a timestamped 100-byte line every 10 ms; the readers
report how long each line took to reach them (p50, p99, max), how many arrived, how many
readers lost their connection, and how many clients the server dropped as too slow.

  quiet    nobody else.
  busy     and a client that sends 100 KB/s of chatter (1,000-byte lines).
  drip     busy, and a reader with a 4 KiB receive buffer that reads 64 KiB just before
           every 1.9 s: it falls behind and holds the room back, making a little progress
           before each 2 s. The figures count from its 10th second on.
  flood    and a client that sends chatter as fast as the server takes it.
  burst    flood, and a reader with a 1 MiB receive buffer that empties it once a second.
           The figures count from its 10th second on.
  empty    and a client that sends nothing but "\\n", as fast as the server takes it.

test_chat.py tests readers that drip and read in bursts with a short --stall-budget.
Every loop here is bounded in time; all traffic stays on 127.0.0.1.
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
        chatter = connect(port) if case in ("busy", "drip", "flood", "burst") else None
        attacker = {"empty": lambda: connect(port), "drip": lambda: connect(port, rcvbuf=4096),
                    "burst": lambda: connect(port, rcvbuf=1 << 20)}.get(case, lambda: None)()
        time.sleep(0.2)
        bufs = {r: bytearray() for r in readers}
        delays, closed = [], set()
        start_at = time.monotonic()
        measure_from = start_at + (10 if case in ("drip", "burst") else 1)
        end = measure_from + seconds
        next_line = next_read = start_at
        pending, chat_out = bytearray(), bytearray()
        empty = b"\n" * 65536
        chat_line = b"chatter " + b"c" * 991 + b"\n"
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_line and not pending:
                pending += b"T %.6f " % time.monotonic() + b"y" * 80 + b"\n"
                if case in ("busy", "drip"):  # and 1,000 bytes of chatter: 100 KB/s
                    chat_out += chat_line
                next_line += 0.01
            if case in ("flood", "burst") and len(chat_out) < 1 << 20:
                chat_out += chat_line * 64  # as fast as the server takes it
            want_write = [sender] if pending else []
            if chat_out:
                want_write.append(chatter)
            if case == "empty" and attacker not in closed:
                want_write.append(attacker)
            talkers = [x for x in (sender, chatter) if x and x not in closed]
            r, w, _ = select.select([x for x in readers if x not in closed] + talkers,
                                    want_write, [], 0.005)
            for sock, out in ((sender, pending), (chatter, chat_out)):
                if sock in w:
                    try:
                        del out[:sock.send(out)]
                    except BlockingIOError:
                        pass
                    except ConnectionError:
                        closed.add(sock)
                        out.clear()
            if attacker in w:
                try:
                    attacker.send(empty)
                except (BlockingIOError, ConnectionError):
                    pass
            if case in ("drip", "burst") and now >= next_read and attacker not in closed:
                next_read += 1.9 if case == "drip" else 1.0  # a few KiB before each 2 s; or 1 MiB a second
                try:
                    want = 64 * 1024 if case == "drip" else 1 << 20
                    while want > 0:
                        data = attacker.recv(want)
                        if not data:
                            closed.add(attacker)
                            break
                        want -= len(data)
                except BlockingIOError:
                    pass
                except ConnectionError:
                    closed.add(attacker)
            for sock in r:
                if sock in talkers:  # the senders read too, and throw it away
                    try:
                        sock.recv(1 << 20)
                    except (BlockingIOError, ConnectionError):
                        pass
                    continue
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
        run_case.last_dropped = err.count("too slow")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chat", action="append", help="server command with {port} (repeatable)")
    parser.add_argument("--cases", default="quiet,busy,drip,flood,burst,empty")
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
