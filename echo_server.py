#!/usr/bin/env python3
"""Step 1: a TCP echo server (RFC 862) that serves many clients with one select() loop.

Run it:      python echo_server.py             then, in another terminal: nc localhost 7007
Options:     python echo_server.py --help

Every byte a client sends comes back to that client, unchanged and in order. One thread
serves everyone: the loop asks select.select() which sockets are ready and touches only
those, so no call in the loop waits on one client while the others wait on it.

It shows non-blocking sockets, an output buffer per client (send() may take only part of
what we give it), backpressure, half-close, and select()'s FD_SETSIZE ceiling. It leaves
out idle timeouts (an idle client keeps its slot), the UDP half of RFC 862, and TLS.
"""
import argparse
import errno
import os
import select
import signal
import socket
import sys
import time

try:
    import resource  # POSIX only: tells how many file descriptors we may open
except ImportError:
    resource = None

DEFAULT_PORT = 7007         # the challenge's port; RFC 862's port 7 would need root
OUTBUF_LIMIT = 256 * 1024   # stop reading a client whose unsent echo reaches this (backpressure)
BACKLOG = 1024              # connections the kernel may queue for us while we are busy
ACCEPT_BATCH = 64           # connections accepted per turn at most, so clients are served meanwhile
ACCEPT_PAUSE = 0.5          # seconds without accept() after it fails (out of descriptors)
FD_SETSIZE = 512 if os.name == "nt" else 1024  # select()'s ceiling: see select_can_watch()
SPARE_FDS = 24              # descriptors kept for stdin/out/err, the listener and Python
# On Windows, Ctrl-C cannot interrupt a select() that waits forever, so we wake up now and then.
IDLE_TIMEOUT = 1.0 if os.name == "nt" else None
# Every recv() lands in this one buffer, which we reuse (speed: with a new bytes object per
# recv() instead, bulk echo was three times slower). Reads are big, so bulk data moves in
# few turns of the loop, and never bigger than the room left under OUTBUF_LIMIT.
RECV_BUFFER = memoryview(bytearray(OUTBUF_LIMIT))


class Client:
    """Everything the server keeps for one connection."""

    def __init__(self, sock, name):
        self.sock = sock
        self.name = name            # "127.0.0.1:50312", for the log
        self.outbuf = bytearray()   # bytes received but not yet sent back
        self.closing = False        # the client has shut down its side: close once outbuf is sent


def log(message):
    # Simple, but it blocks if stderr is a pipe nobody reads; a bigger server logs to a file.
    print(message, file=sys.stderr, flush=True)


def format_addr(addr):
    """("::1", 7007, 0, 0) -> "[::1]:7007"; ("127.0.0.1", 7007) -> "127.0.0.1:7007"."""
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_max_clients():
    """As many clients as select() can watch, and never more descriptors than we may open."""
    limit = FD_SETSIZE
    if resource:
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


def select_can_watch(sock, clients):
    """select() cannot watch a descriptor numbered FD_SETSIZE or more; on Windows it
    cannot watch more than FD_SETSIZE sockets. Past that, select() would fail."""
    if os.name == "nt":
        return len(clients) + 1 < FD_SETSIZE  # + 1: the listener
    return sock.fileno() < FD_SETSIZE


def accept_clients(listener, clients, max_clients):
    """A readable listener means connections are waiting. We take up to ACCEPT_BATCH of
    them, so a burst of arrivals costs one turn of the loop, not one turn each."""
    for _ in range(ACCEPT_BATCH):
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return  # none left, or one gave up while it waited
        sock.setblocking(False)
        name = format_addr(addr)
        if len(clients) >= max_clients or not select_can_watch(sock, clients):
            log(f"{name} refused: server full ({len(clients)} online)")
            sock.close()
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # echo small writes at once
        clients[sock] = Client(sock, name)
        log(f"{name} connected ({len(clients)} online)")


def drop_client(client, clients, why):
    del clients[client.sock]
    client.sock.close()
    log(f"{client.name} {why} ({len(clients)} online)")


def read_from(client, clients):
    try:
        n = client.sock.recv_into(RECV_BUFFER, OUTBUF_LIMIT - len(client.outbuf))
    except BlockingIOError:
        return  # select() said readable, but the data was gone; try again next turn
    except OSError as err:  # ECONNRESET and friends: the client vanished
        drop_client(client, clients, f"dropped: {err.strerror or err}")
        return
    if n == 0:  # no bytes: the client shut down its side. Send what is left, then close
        client.closing = True
        if not client.outbuf:
            drop_client(client, clients, "disconnected")
        return
    client.outbuf += RECV_BUFFER[:n]  # nothing is sent here: that is send_queued()'s job


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


def send_queued(clients, writable, watched):
    """One send() per client with output queued. A client in watched (select() watched it
    for writing) is sent to if it is writable now. A client not in watched had nothing
    queued when we called select(), so its send buffer almost surely has room: we send at
    once rather than wait a whole turn for select() to say so (speed)."""
    for client in list(clients.values()):
        if client.outbuf and (client.sock in writable or client.sock not in watched):
            write_to(client, clients)


def serve(listener, max_clients):
    clients = {}              # socket -> Client, for every open connection
    accept_paused_until = 0.0
    try:
        while True:
            # Ask only for what we can act on. Watching a socket for writability while
            # we have nothing to send would wake us at once, every turn: 100% CPU.
            accepting = time.monotonic() >= accept_paused_until
            want_read = [listener] if accepting else []
            # Backpressure: a client whose echo is piling up is not read until it drains.
            # TCP then fills up and slows the sender down. Our memory stays flat.
            want_read += [c.sock for c in clients.values()
                          if not c.closing and len(c.outbuf) < OUTBUF_LIMIT]
            want_write = {c.sock for c in clients.values() if c.outbuf}
            timeout = IDLE_TIMEOUT if accepting else ACCEPT_PAUSE

            # The one place we wait. We don't use the third list (TCP urgent data).
            readable, writable, _ = select.select(want_read, want_write, [], timeout)

            for sock in readable:
                if sock is listener:
                    try:
                        accept_clients(listener, clients, max_clients)
                    except OSError as err:
                        # EMFILE and the like: out of descriptors. The connection stays queued
                        # in the kernel, so the listener stays readable: pause, or we would spin.
                        log(f"cannot accept: {err.strerror}; trying again in {ACCEPT_PAUSE} s")
                        accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                elif sock in clients:  # skip a client dropped earlier in this pass
                    read_from(clients[sock], clients)
            # Writable means there is room in the kernel's send buffer, not that data arrived.
            send_queued(clients, set(writable), want_write)  # sets (speed): asked about each client
    finally:
        for client in clients.values():
            client.sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 1: an RFC 862 TCP echo server that serves many clients with one "
                    "select() loop.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; "
                             "0.0.0.0 or :: opens the server to the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="TCP port (default: %(default)s; 0 picks a free port)")
    parser.add_argument("--max-clients", type=int, default=default_max_clients(),
                        help="connections served at once; more are closed at once "
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
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print(f"echo server listening on {format_addr(listener.getsockname())}", flush=True)
        log(f"serving up to {args.max_clients} clients at once")
        serve(listener, args.max_clients)
    except KeyboardInterrupt:
        log("shutting down")
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
