#!/usr/bin/env python3
"""Step 4: a chat server. Each line a client sends goes to every other client.

Run it:      python chat_server.py             then: python chat_client.py, in two terminals
Options:     python chat_server.py --help      (telnet or nc localhost 7007 work too)

This is echo_server.py grown by two ideas. Framing: TCP delivers a byte stream, so we
cut it into lines ourselves. Fan-out: a line is queued for every other client instead of
sent back. The shape is the same: one select() loop, non-blocking sockets, and an output
buffer per client that is sent when its socket is writable.

The protocol is UTF-8 text, one message per line (a carriage return before the newline
is dropped, for telnet). The server greets each client, relays lines, and announces
arrivals and departures in lines that start with "* ". It never decodes what it relays:
bytes go out as they came.

What it leaves out on purpose: names (a client puts its own name in each line, so anyone
can claim any name; a server that owns identity is the IRC challenge), rooms, history,
idle timeouts and TLS.
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

DEFAULT_PORT = 7007         # the challenge's port
RECV_SIZE = 64 * 1024       # one recv() per ready socket: many lines are handled as one batch
LINE_LIMIT = 4096           # longest line accepted, without its "\n"; longer ones get an error
OUTBUF_LIMIT = 256 * 1024   # a client with this much unsent output is not reading: drop it
BACKLOG = 1024              # connections the kernel may queue for us while we are busy
# Connections accepted per turn at most, so clients are served meanwhile. Each join queues
# a notice for everyone, so this also bounds that burst (memory: clients x 16 notices).
ACCEPT_BATCH = 16
ACCEPT_PAUSE = 0.5          # seconds without accept() after it fails (out of descriptors)
FD_SETSIZE = 512 if os.name == "nt" else 1024  # select()'s ceiling: see select_can_watch()
SPARE_FDS = 24              # descriptors kept for stdin/out/err, the listener and Python
# On Windows, Ctrl-C cannot interrupt a select() that waits forever, so we wake up now and then.
IDLE_TIMEOUT = 1.0 if os.name == "nt" else None

WELCOME = b"Welcome to the chatroom!\n"
SERVER_FULL = b"error: server full, try again later\n"
LINE_TOO_LONG = f"error: line too long (limit {LINE_LIMIT} bytes)\n".encode()


class Client:
    """Everything the server keeps for one connection."""

    def __init__(self, sock, name):
        self.sock = sock
        self.name = name            # "127.0.0.1:50312", for the log
        self.inbuf = bytearray()    # the start of a line whose "\n" has not arrived yet
        self.outbuf = bytearray()   # lines for this client that the kernel has not taken yet
        self.closing = False        # left the room: close once outbuf is sent


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


def online(clients):
    return sum(not c.closing for c in clients.values())


def broadcast(data, clients, sender=None):
    """Queue data for everyone in the room but the sender. Nothing is sent here: that is
    send_queued()'s job, once per turn, so a client gets all that is queued in one send()."""
    for client in clients.values():
        # A client already past OUTBUF_LIMIT gets nothing more: it is dropped this turn.
        if client is not sender and not client.closing and len(client.outbuf) <= OUTBUF_LIMIT:
            client.outbuf += data


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
            try:
                sock.send(SERVER_FULL)  # a new socket's send buffer is empty: this short line fits
            except OSError:
                pass
            sock.close()
            continue
        # Send each line at once. Nagle's algorithm would hold a small write back until the
        # previous one is acknowledged, which can add tens of milliseconds to a chat line.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = clients[sock] = Client(sock, name)
        client.outbuf += WELCOME
        broadcast(f"* a user joined ({online(clients)} online)\n".encode(), clients, sender=client)
        log(f"{name} connected ({online(clients)} online)")


def leave_room(client, clients, why):
    """Tell the others that client left. Its socket stays open until its outbuf is sent."""
    client.closing = True
    broadcast(f"* a user left ({online(clients)} online)\n".encode(), clients)
    log(f"{client.name} {why} ({online(clients)} online)")


def close_client(client, clients):
    del clients[client.sock]
    client.sock.close()


def drop_client(client, clients, why):
    """Close the connection now; anything still queued for it is lost."""
    if not client.closing:
        leave_room(client, clients, why)
    close_client(client, clients)


def find_long_line(batch):
    """Where the first line longer than LINE_LIMIT starts in batch (which ends with "\n"),
    or -1. We jump from the last "\n" within reach to the next, LINE_LIMIT bytes at a
    time, so a batch of short lines takes a few steps, not one per line (speed)."""
    start = 0
    while len(batch) - start > LINE_LIMIT + 1:
        newline = batch.rfind(b"\n", start, start + LINE_LIMIT + 1)
        if newline < 0:
            return start  # no "\n" among the next LINE_LIMIT + 1 bytes
        start = newline + 1
    return -1


def relay_lines(client, data, clients):
    """TCP is a byte stream: one recv() may hold half a line, or a hundred lines. We add
    data to inbuf and cut it after the last "\n": the complete lines before it are relayed
    as one batch, and the unfinished rest stays in inbuf."""
    client.inbuf += data
    end = client.inbuf.rfind(b"\n") + 1
    batch = bytes(client.inbuf[:end])
    del client.inbuf[:end]
    # Whole-batch operations, each one pass in C, instead of a Python loop per line (speed).
    batch = batch.replace(b"\r\n", b"\n")  # telnet and nc -C end lines with "\r\n"
    while b"\n\n" in batch:  # empty lines are ignored
        batch = batch.replace(b"\n\n", b"\n")
    if batch.startswith(b"\n"):
        batch = batch[1:]
    long_line = find_long_line(batch)
    if long_line >= 0:
        batch = batch[:long_line]  # the lines before it still go
    if batch:
        broadcast(batch, clients, sender=client)
    if long_line >= 0 or len(client.inbuf) > LINE_LIMIT + 1:  # + 1: "\r" may await its "\n"
        # The line cap bounds inbuf. We say why, and close once that message is sent.
        client.inbuf.clear()
        client.outbuf += LINE_TOO_LONG
        leave_room(client, clients, f"dropped: line longer than {LINE_LIMIT} bytes")


def read_from(client, clients):
    try:
        data = client.sock.recv(RECV_SIZE)
    except BlockingIOError:
        return  # select() said readable, but the data was gone; try again next turn
    except OSError as err:  # ECONNRESET and friends: the client vanished
        if client.inbuf:  # whatever it typed last still counts
            relay_lines(client, b"\n", clients)
        drop_client(client, clients, f"dropped: {err.strerror or err}")
        return
    if not data:  # b"" means the client closed (or half-closed) its side: it leaves
        if client.inbuf:  # a last line without its "\n" is still delivered
            relay_lines(client, b"\n", clients)
        if not client.closing:
            leave_room(client, clients, "disconnected")
        if not client.outbuf:  # otherwise we close once its outbuf is sent
            close_client(client, clients)
        return
    relay_lines(client, data, clients)


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
        close_client(client, clients)


def send_queued(clients, writable, watched):
    """One send() per client with output queued. A client in watched (select() watched it
    for writing) is sent to if it is writable now. A client not in watched had nothing
    queued when we called select(), so its send buffer almost surely has room: we send at
    once rather than wait a whole turn for select() to say so (speed)."""
    for client in list(clients.values()):
        if client.outbuf and (client.sock in writable or client.sock not in watched):
            write_to(client, clients)
        if client.sock in clients and len(client.outbuf) > OUTBUF_LIMIT:
            # It does not read while others talk. Dropping it keeps one stuck reader from
            # stalling the room or eating our memory.
            drop_client(client, clients, f"dropped: too slow, {len(client.outbuf)} bytes unsent")


def serve(listener, max_clients):
    clients = {}              # socket -> Client, for every open connection
    accept_paused_until = 0.0
    try:
        while True:
            # Ask only for what we can act on. Watching a socket for writability while
            # we have nothing to send would wake us at once, every turn: 100% CPU.
            accepting = time.monotonic() >= accept_paused_until
            want_read = [listener] if accepting else []
            want_read += [c.sock for c in clients.values() if not c.closing]
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
        description="Step 4: a chat server that relays each line to every other client, "
                    "with one select() loop.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; "
                             "0.0.0.0 or :: opens the server to the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="TCP port (default: %(default)s; 0 picks a free port)")
    parser.add_argument("--max-clients", type=int, default=default_max_clients(),
                        help="connections served at once; more are told the server is full "
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
        print(f"chat server listening on {format_addr(listener.getsockname())}", flush=True)
        log(f"serving up to {args.max_clients} clients at once")
        serve(listener, args.max_clients)
    except KeyboardInterrupt:
        log("shutting down")
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
