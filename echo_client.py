#!/usr/bin/env python3
"""Step 2: an echo client. Type a line, it goes to the server, and the echo comes back.

Run it:      python echo_client.py             (with echo_server.py running)
Options:     python echo_client.py --help

    send: hello
    recv: hello
    send: quit

What to notice: TCP delivers a byte stream, not messages, so the echo of one line may
arrive in several pieces. We collect pieces until the newline is back, and only then print.
While we wait, we keep sending what the kernel has not taken yet: a long line sent all at
once, before reading, could fill both directions of the connection and hang us both.

What it leaves out on purpose: it notices that the server went away only when it next
sends a line, because it waits on the keyboard alone between lines. Step 3's chat client
waits on the keyboard and the socket at once.
What a real client needs besides the lesson comes after the line "The fine print".
"""
import argparse
import select
import socket
import sys

DEFAULT_PORT = 7007       # the port of echo_server.py
RECV_SIZE = 64 * 1024     # read what is there, up to this much, per recv()
QUIT_WORDS = ("quit", "exit")


class ServerClosed(Exception):
    """The server closed or reset the connection."""


def echo_line(sock, line, inbuf):
    """Send one line and return the echoed line, once all of it is back.

    inbuf keeps bytes that arrived after the newline for the next call. Any RFC 862 server
    sends back exactly what we sent, so with one line in flight there are none, but a
    byte stream makes no promise about where one recv() ends."""
    outbuf = bytearray(line.encode("utf-8") + b"\n")
    complete = b"\n" in inbuf
    while not complete:
        # Watch for writability only while we still have bytes to send.
        readable, writable, _ = select.select([sock], [sock] if outbuf else [], [])
        if writable:
            try:
                sent = sock.send(outbuf)
            except BlockingIOError:
                sent = 0
            except OSError as err:  # EPIPE, ECONNRESET
                raise ServerClosed from err
            del outbuf[:sent]  # send() may take only part of it
        if readable:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as err:
                raise ServerClosed from err
            if not data:  # b"": the server closed the connection
                raise ServerClosed
            inbuf += data
            complete = b"\n" in data  # look in the new piece only, not all of inbuf again
    echoed, _, rest = inbuf.partition(b"\n")
    inbuf[:] = rest
    return echoed.decode("utf-8", errors="replace")


def talk(sock):
    """The send/recv loop of the challenge. Returns the exit status."""
    inbuf = bytearray()
    while True:
        try:
            line = input("send: ")
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return 0
        if line.strip().lower() in QUIT_WORDS:
            return 0
        try:
            echoed = echo_line(sock, line, inbuf)
        except ServerClosed:
            print("server closed the connection", file=sys.stderr)
            return 1
        print(f"recv: {echoed}", flush=True)


# The fine print ------------------------------------------------------------------------
# What a real client needs besides the lesson: connecting with clear errors, and the
# command line.

CONNECT_TIMEOUT = 10      # seconds to wait for the server to answer the connection


def format_addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(host, port):
    """A connected socket, or None after saying on stderr why there is none."""
    where = format_addr(host, port)
    try:
        # create_connection tries every address the name resolves to (IPv6 and IPv4).
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as err:
        print(f"error: cannot resolve host {host!r}: {err.strerror}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: cannot connect to {where}: connection refused (is the server running?)",
              file=sys.stderr)
    except OSError as err:
        print(f"error: cannot connect to {where}: {(err.strerror or str(err)).lower()}",
              file=sys.stderr)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 2: send lines to an echo server and print what comes back. "
                    "Type quit or exit (or press Ctrl-D) to leave.")
    parser.add_argument("--host", default="localhost",
                        help="server to connect to (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="server's TCP port (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.port <= 65535:
        parser.error("--port must be from 1 to 65535")

    sock = connect(args.host, args.port)
    if not sock:
        return 1
    sock.setblocking(False)
    try:
        return talk(sock)
    except KeyboardInterrupt:  # Ctrl-C
        print()
        return 0
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
