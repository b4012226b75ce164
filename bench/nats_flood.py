#!/usr/bin/env python3
"""What a hostile NATS publisher costs a linked chat server with 200 readers.

    python bench/nats_flood.py                                   # our chat server
    python bench/nats_flood.py --chat "python OLD/chat_server.py --port {port} --nats {nats}"

Needs nats-server (Debian: apt install nats-server). For each server command it starts a
nats-server and the chat server linked to it on free loopback ports, connects 200 readers
that read everything, and then plays a hostile peer that publishes on the room's subject:

  big      one 1 MiB payload of ordinary 100-byte lines;
  flood    32 KiB payloads, as fast as NATS takes them, for 5 s.

It reports how many readers the server dropped, its peak memory, and how long a line
that one reader then sends takes to reach the 199 others. Every loop is bounded in time.
"""
import argparse
import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = f"{sys.executable} {os.path.join(HERE, '..', 'chat_server.py')} --port {{port}} --nats {{nats}}"
NATS = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_port(port, seconds=10):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def drain(readers, seconds):
    """Read every reader for seconds; returns the set of readers whose connection closed."""
    closed, end = set(), time.monotonic() + seconds
    while time.monotonic() < end:
        live = [r for r in readers if r not in closed]
        for sock in select.select(live, [], [], 0.05)[0]:
            try:
                if not sock.recv(1 << 20):
                    closed.add(sock)
            except (BlockingIOError, ConnectionError):
                pass
    return closed


def run(command, case):
    nats_port, port = free_port(), free_port()
    nats = subprocess.Popen([NATS, "-a", "127.0.0.1", "-p", str(nats_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        wait_port(nats_port)
        server = subprocess.Popen(shlex.split(command.format(port=port, nats=f"127.0.0.1:{nats_port}")),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(port)
        readers = []
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            readers.append(sock)
        drain(readers, 0.5)
        pub = socket.create_connection(("127.0.0.1", nats_port))
        pub.recv(4096)  # INFO
        pub.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
        line = b"Mallory: " + b"m" * 90 + b"\n"
        if case == "big":
            payload = line * (1024 * 1024 // len(line))
            pub.sendall(b"PUB chatroom %d\r\n%s\r\n" % (len(payload), payload))
            closed = drain(readers, 2)
        else:
            payload = line * (32 * 1024 // len(line))
            message = b"PUB chatroom %d\r\n%s\r\n" % (len(payload), payload)
            pub.setblocking(False)
            closed, end, out = set(), time.monotonic() + 5, bytearray()
            while time.monotonic() < end:
                if len(out) < 1 << 20:
                    out += message * 8
                try:
                    del out[:pub.send(out)]
                except BlockingIOError:
                    pass
                live = [r for r in readers if r not in closed]
                for sock in select.select(live, [], [], 0)[0]:
                    try:
                        if not sock.recv(1 << 20):
                            closed.add(sock)
                    except (BlockingIOError, ConnectionError):
                        pass
            closed |= drain(readers, 1)
        # A local line now: how long until every other reader that is still there has it?
        live = [r for r in readers if r not in closed]
        rss = peak_rss_mb(server.pid)
        if len(live) < 2:
            return len(closed), rss, float("nan")
        speaker, others = live[0], live[1:]
        stamp = b"probe %.6f\n" % time.monotonic()
        speaker.send(stamp)
        start, waiting, bufs = time.monotonic(), set(others), {s: b"" for s in others}
        while waiting and time.monotonic() - start < 10:
            for sock in select.select(list(waiting), [], [], 0.05)[0]:
                try:
                    bufs[sock] += sock.recv(1 << 20)
                except (BlockingIOError, ConnectionError):
                    continue
                if stamp in bufs[sock]:
                    waiting.discard(sock)
                bufs[sock] = bufs[sock][-len(stamp):]
        reach = time.monotonic() - start if not waiting else float("inf")
        return len(closed), rss, reach
    finally:
        if server:
            server.terminate()
            server.wait(5)
        nats.kill()
        nats.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chat", action="append", help="command with {port} and {nats} (repeatable)")
    parser.add_argument("--cases", default="big,flood")
    args = parser.parse_args()
    if not NATS:
        raise SystemExit("needs nats-server (Debian: apt install nats-server)")
    print(f"{'case':<6} {'readers dropped':>16} {'peak RSS MB':>12} {'a local line reaches all in s':>30}  server")
    for case in args.cases.split(","):
        for command in args.chat or [DEFAULT]:
            dropped, rss, reach = run(command, case)
            print(f"{case:<6} {dropped:>16} {rss:>12.1f} {reach:>30.3f}  {command}")


if __name__ == "__main__":
    main()
