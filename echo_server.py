#!/usr/bin/env python3
"""Step 1: a TCP echo server (RFC 862) that serves many clients with one select() loop.

Run it:      python echo_server.py             then, in another terminal: nc localhost 7007
Options:     python echo_server.py --help

Every byte a client sends comes back to that client, unchanged and in order. One loop
serves everyone: select.select() says which sockets are ready and we touch only those,
so no client ever waits on another. It shows non-blocking sockets, an output buffer per
client, backpressure and half-close. Left out: idle timeouts, UDP (RFC 862 has it), TLS.
What a real server needs besides the lesson comes after the line "The fine print".
"""
import argparse
import errno
import os
import select
import signal
import socket
import sys
import time

DEFAULT_PORT = 7007         # the challenge's port
RECV_SIZE = 64 * 1024       # the most one recv() takes (bigger was slower: bench/README.md)
OUTBUF_LIMIT = 256 * 1024   # stop reading a client whose unsent echo reaches this (backpressure)
TICK = 0.5                  # select() returns at least this often, for the fine print's timers


class Client:
    """Everything the server keeps for one connection."""

    def __init__(self, sock, name):
        self.sock = sock
        self.name = name            # "127.0.0.1:50312", for the log
        self.outbuf = bytearray()   # bytes for this client that the kernel has not taken yet
        self.closing = False        # it has left: close once outbuf is sent


def serve(listener, max_clients):
    """The one loop. It runs until Ctrl-C (KeyboardInterrupt)."""
    clients = {}                    # socket -> Client, for every open connection
    while True:
        # Ask only for what we can act on. Watching a socket for writability while we
        # have nothing to send would wake us at once, every turn: 100% CPU.
        want_read = [listener] if accepting() else []
        # Backpressure: a client whose echo piles up is not read until it drains. TCP
        # then fills up and slows the sender down, and our memory stays flat.
        want_read += [c.sock for c in clients.values()
                      if not c.closing and len(c.outbuf) < OUTBUF_LIMIT]
        want_write = [c.sock for c in clients.values() if c.outbuf]

        # The one place we wait. Writable means the kernel's send buffer has room, not that
        # data arrived. We don't use the third list (TCP urgent data).
        readable, _, _ = select.select(want_read, want_write, [], TICK)

        for sock in readable:
            if sock is listener:
                accept_clients(listener, clients, max_clients)
            elif sock in clients:  # skip a client dropped earlier in this pass
                read_from(clients[sock], clients)
        # One send() to every client with output, not only to those select() found writable:
        # what was queued this turn leaves this turn, not next turn (speed: bench/README.md).
        # A socket that is still full refuses with BlockingIOError, which costs nothing.
        for client in list(clients.values()):
            if client.outbuf:
                write_to(client, clients)


def accept_clients(listener, clients, max_clients):
    """A readable listener means connections are waiting: accept() will not block."""
    for sock, addr in accept_waiting(listener):  # see the fine print: a few per turn
        sock.setblocking(False)
        name = format_addr(addr)
        if len(clients) >= max_clients or not select_can_watch(sock, clients):
            refuse(sock, name, clients)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # send small writes at once
        clients[sock] = Client(sock, name)
        log(f"{name} connected ({len(clients)} online)")


def read_from(client, clients):
    try:
        data = client.sock.recv(RECV_SIZE)
    except BlockingIOError:
        return  # select() said readable, but the data was gone; try again next turn
    except OSError as err:  # ECONNRESET and friends: the client vanished
        drop_client(client, clients, f"dropped: {err.strerror or err}")
        return
    if not data:  # b"": the client shut down its side. We send what is left, then close
        client.closing = True
        if not client.outbuf:
            drop_client(client, clients, "disconnected")
        return
    client.outbuf += data  # the echo: write_to() sends it


def write_to(client, clients):
    try:
        sent = client.sock.send(client.outbuf)
    except BlockingIOError:
        return
    except OSError as err:  # EPIPE, ECONNRESET: the client is gone
        drop_client(client, clients, f"dropped: {err.strerror or err}")
        return
    del client.outbuf[:sent]  # send() may take only part: keep the rest for the next turn
    if client.closing and not client.outbuf:
        drop_client(client, clients, "disconnected")


def drop_client(client, clients, why):
    """Close the connection now and forget the client."""
    del clients[client.sock]
    client.sock.close()
    log(f"{client.name} {why} ({len(clients)} online)")


# The fine print ------------------------------------------------------------------------
# What a real server needs besides the lesson: a log, the limits of select() and of the
# process's descriptors, surviving a failed accept(), and the command line. Each piece
# is reached from the lesson through one of the functions below.

BACKLOG = 1024              # connections the kernel may queue for us while we are busy
ACCEPT_BATCH = 16           # connections accepted per turn at most: see accept_waiting()
ACCEPT_PAUSE = 0.5          # seconds without accept() after it fails (out of descriptors)
FD_SETSIZE = 512 if os.name == "nt" else 1024  # select()'s ceiling: see select_can_watch()
SPARE_FDS = 24              # descriptors kept for stdin/out/err, the listener and Python
accept_paused_until = 0.0   # set by accept_waiting(), read by accepting()


def log(message):
    # Simple, but it blocks if stderr is a pipe nobody reads; a bigger server logs to a file.
    print(message, file=sys.stderr, flush=True)


def format_addr(addr):
    """("::1", 7007, 0, 0) -> "[::1]:7007"; ("127.0.0.1", 7007) -> "127.0.0.1:7007"."""
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def refuse(sock, name, clients):
    """No seat for this connection: log it and close it."""
    log(f"{name} refused: server full ({len(clients)} online)")
    sock.close()


def accepting():
    """False for a short while after accept() failed for want of descriptors."""
    return time.monotonic() >= accept_paused_until


def accept_waiting(listener):
    """Yield up to ACCEPT_BATCH waiting connections. A crowd arriving at once then costs
    a few turns of the loop, not one turn each (bench/loadtest.py's hold test: 1,000
    chat clients got in 5 times faster than with one accept() a turn).
    If accept() fails for want of descriptors (EMFILE), the connection stays queued and
    the listener stays readable: we stop watching it for a moment, or we would spin."""
    global accept_paused_until
    for _ in range(ACCEPT_BATCH):
        try:
            yield listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return  # none left, or one gave up while it waited in the queue
        except OSError as err:
            log(f"cannot accept: {err.strerror}; trying again in {ACCEPT_PAUSE} s")
            accept_paused_until = time.monotonic() + ACCEPT_PAUSE
            return


def select_can_watch(sock, clients):
    """select() cannot watch a descriptor numbered FD_SETSIZE or more; on Windows it
    cannot watch more than FD_SETSIZE sockets. Past that, select() would fail."""
    if os.name == "nt":
        return len(clients) + 1 < FD_SETSIZE  # + 1: the listener
    return sock.fileno() < FD_SETSIZE


def default_max_clients():
    """As many clients as select() can watch, and never more descriptors than we may open."""
    limit = FD_SETSIZE
    try:
        import resource  # POSIX only: tells how many file descriptors we may open
    except ImportError:
        return limit - SPARE_FDS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    return max(1, limit - SPARE_FDS)


def open_listener(host, port):
    """Create, bind and listen: the first three steps of every TCP server."""
    family, _, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    if os.name == "posix":
        # Bind again at once after a restart, while old connections linger in TIME_WAIT.
        # (On Windows this option lets two servers share a port, so we leave it off there.)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(addr)  # on error, the caller reports it and exits
    listener.listen(BACKLOG)
    listener.setblocking(False)
    return listener


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; "
                             "0.0.0.0 or :: opens the server to the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="TCP port (default: %(default)s; 0 picks a free port)")
    parser.add_argument("--max-clients", type=int, default=default_max_clients(),
                        help="connections served at once; more are refused "
                             "(default: %(default)s here, the most select() can watch)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if args.max_clients < 1:
        parser.error("--max-clients must be at least 1")

    try:
        listener = open_listener(args.host, args.port)
    except socket.gaierror as err:
        print(f"error: cannot resolve host {args.host!r}: {err.strerror}", file=sys.stderr)
        return 1
    except OSError as err:
        hint = " (is another server running?)" if err.errno == errno.EADDRINUSE else ""
        print(f"error: cannot listen on {format_addr((args.host, args.port))}: "
              f"{(err.strerror or str(err)).lower()}{hint}", file=sys.stderr)
        return 1

    # Ctrl-C raises KeyboardInterrupt; make SIGTERM (kill, systemd, docker stop) do the same.
    # A signal that lands just before select() starts to wait is seen only when select()
    # returns: that is one more reason for TICK, or the server could ignore it for good.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print(f"echo server listening on {format_addr(listener.getsockname())}", flush=True)
        seats = args.max_clients
        log(f"serving up to {seats} client{'s' if seats != 1 else ''} at once")
        serve(listener, args.max_clients)
    except KeyboardInterrupt:
        log("shutting down")  # the system closes every client's socket as we exit
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
