#!/usr/bin/env python3
"""Step 4: a chat server. Each line a client sends goes to every other client.

Run it:      python chat_server.py             then: python chat_client.py, in two terminals
Options:     python chat_server.py --help      (telnet or nc localhost 7007 work too)

This is echo_server.py grown by two ideas. Framing: TCP delivers a byte stream, so we
cut it into lines ourselves. Fan-out: a line is queued for every other client instead of
sent back. Lines that start with "* " are the server's notices; what clients send goes
out as it came, never decoded. Left out: names (each client writes its own), rooms, TLS.
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
OUTBUF_LIMIT = 256 * 1024   # a client with this much unsent output is not reading: drop it
LINE_LIMIT = 4096           # longest line accepted, without its "\n"; longer ones get an error
TICK = 0.5                  # select() returns at least this often, for the fine print's timers
WELCOME = b"Welcome to the chatroom!\n"
LINE_TOO_LONG = f"error: line too long (limit {LINE_LIMIT} bytes)\n".encode()


class Client:
    """Everything the server keeps for one connection."""

    def __init__(self, sock, name):
        self.sock = sock
        self.name = name            # "127.0.0.1:50312", for the log
        self.inbuf = bytearray()    # the start of a line whose "\n" has not arrived yet
        self.outbuf = bytearray()   # bytes for this client that the kernel has not taken yet
        self.closing = False        # it has left: close once outbuf is sent
        self.last_sent = time.monotonic()  # when send() last took some of outbuf
        self.behind_since = None    # since when it holds the room back: see stuck()


def serve(listener, max_clients):
    """The one loop. It runs until Ctrl-C (KeyboardInterrupt)."""
    clients = {}                    # socket -> Client, for every open connection
    while True:
        # Ask only for what we can act on. Watching a socket for writability while we
        # have nothing to send would wake us at once, every turn: 100% CPU.
        want_read = [listener] if accepting() else []
        if not room_is_waiting(clients):  # flood control: see the fine print
            want_read += [c.sock for c in clients.values() if not c.closing]
        want_write = [c.sock for c in clients.values() if c.outbuf]

        # The one place we wait. Writable means the kernel's send buffer has room, not that
        # data arrived. We don't use the third list (TCP urgent data).
        readable, _, _ = select.select(want_read, want_write, [], TICK)

        for sock in readable:
            if sock is listener:
                accept_clients(listener, clients, max_clients)
            elif sock in clients:  # skip a client dropped earlier in this pass
                read_from(clients[sock], clients)
        # One send() to every client with output, not only to those select() found writable,
        # so what was queued this turn leaves this turn (speed). A full socket just refuses.
        for client in list(clients.values()):
            if client.outbuf:
                write_to(client, clients)
        drop_slow_consumers(clients)
        close_stalled_leavers(clients)


def accept_clients(listener, clients, max_clients):
    """A readable listener means connections are waiting: accept() will not block."""
    for sock, addr in accept_waiting(listener):  # see the fine print: a few per turn
        sock.setblocking(False)
        name = format_addr(addr)
        if len(clients) >= max_clients or not select_can_watch(sock, clients):
            refuse(sock, name, clients)
            continue
        set_socket_options(sock)  # see the fine print: no Nagle delay, a bounded buffer
        client = clients[sock] = Client(sock, name)
        client.outbuf += WELCOME
        broadcast(f"* a user joined ({online(clients)} online)\n".encode(), clients, sender=client)
        log(f"{name} connected ({online(clients)} online)")


def read_from(client, clients):
    try:
        data = client.sock.recv(RECV_SIZE)
    except BlockingIOError:
        return  # select() said readable, but the data was gone; try again next turn
    except OSError as err:  # ECONNRESET and friends: the client vanished
        drop_client(client, clients, f"dropped: {err.strerror or err}")
        return
    if not data:  # b"": the client shut down its side. It leaves; we send what is left
        relay_lines(client, b"\n", clients)  # a last line without its "\n" still counts
        leave_room(client, clients, "disconnected")
        if not client.outbuf:
            drop_client(client, clients, "disconnected")
        return
    relay_lines(client, data, clients)


def relay_lines(client, data, clients):
    """TCP is a byte stream: one recv() may hold half a line, or a hundred lines. We add
    data to inbuf, relay each complete line, and keep the unfinished rest in inbuf."""
    client.inbuf += data
    *lines, client.inbuf = client.inbuf.split(b"\n")
    batch = bytearray()  # every line of this recv(), queued for the others in one go (speed)
    too_long = len(client.inbuf) > LINE_LIMIT + 1  # + 1: a "\r" may still await its "\n"
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]  # telnet and nc -C end lines with "\r\n"
        if len(line) > LINE_LIMIT:
            too_long = True
            break  # the lines before it still go; it and the rest do not
        if line:  # empty lines are ignored
            batch += line + b"\n"
    broadcast(batch, clients, sender=client)
    if too_long:
        client.outbuf += LINE_TOO_LONG  # we say why, and close once that is sent
        leave_room(client, clients, f"dropped: line longer than {LINE_LIMIT} bytes")


def broadcast(data, clients, sender=None):
    """Queue data for everyone in the room but the sender; write_to() will send it."""
    for client in clients.values():
        # A client already past OUTBUF_LIMIT gets nothing more: it is dropped this turn.
        if client is not sender and not client.closing and len(client.outbuf) <= OUTBUF_LIMIT:
            client.outbuf += data


def write_to(client, clients):
    try:
        sent = client.sock.send(client.outbuf)
    except BlockingIOError:
        return
    except OSError as err:  # EPIPE, ECONNRESET: the client is gone
        drop_client(client, clients, f"dropped: {err.strerror or err}")
        return
    del client.outbuf[:sent]  # send() may take only part: keep the rest for the next turn
    client.last_sent = time.monotonic()
    if client.closing and not client.outbuf:
        drop_client(client, clients, "disconnected")


def drop_slow_consumers(clients):
    """A client that does not read while others talk piles up output. Dropping it keeps
    one stuck reader from stalling the room for long, or eating our memory."""
    for client in list(clients.values()):
        if len(client.outbuf) > OUTBUF_LIMIT or stuck(client):
            drop_client(client, clients, f"dropped: too slow, {len(client.outbuf)} bytes unsent")


def drop_client(client, clients, why):
    """Close the connection now and forget the client."""
    del clients[client.sock]
    client.sock.close()
    leave_room(client, clients, why)


def leave_room(client, clients, why):
    """Tell everyone else, once, that client has left. Its socket closes later."""
    if not client.closing:
        client.closing = True
        broadcast(f"* a user left ({online(clients)} online)\n".encode(), clients)
        log(f"{client.name} {why} ({online(clients)} online)")


def online(clients):
    return sum(not c.closing for c in clients.values())


# The fine print ------------------------------------------------------------------------
# What a real server needs besides the lesson: a log that never stops it, the limits of
# select() and of the process's descriptors, surviving a failed accept(), bounds on what
# a client that stops reading can cost (and on what a flood can do to the room),
# and the command line. The lesson reaches each piece through one of the functions below.

BACKLOG = 1024              # connections the kernel may queue for us while we are busy
ACCEPT_BATCH = 16           # connections accepted per turn at most: see accept_waiting()
ACCEPT_PAUSE = 0.5          # seconds without accept() after it fails (out of descriptors)
FD_SETSIZE = 512 if os.name == "nt" else 1024  # select()'s ceiling: see select_can_watch()
SPARE_FDS = 24              # descriptors kept for stdin/out/err, the listener and Python
accept_paused_until = 0.0   # set by accept_waiting(), read by accepting()
log_lost = 0                # log lines that stderr could not take: see log()
# The kernel's send buffer for each client. Left to itself, Linux grows it to 4 MB for a
# client that does not read: that much of the host's memory for each such client. We
# set a size that costs no speed in bench/loadtest.py (bench/README.md has the figures).
SNDBUF = 64 * 1024
drain_timeout = 10.0        # seconds a client that has left may take nothing (--drain-timeout)
BEHIND = 64 * 1024          # unsent bytes past which a client holds the room back
STALL_LIMIT = 2.0           # seconds a client may hold the room back before it is dropped
SERVER_FULL = b"error: server full, try again later\n"


def log(message):
    """One line on stderr, but never at the cost of the server: we write only if stderr
    has room now. If it is a pipe nobody reads, a full disk or closed, the line is dropped
    and counted, and the count goes out with the next line that can be written."""
    global log_lost
    line = f"{message}\n"
    if log_lost:
        line = f"({log_lost} log line{'s' if log_lost != 1 else ''} lost)\n" + line
    data = line.encode("utf-8", errors="replace")
    try:
        # On Windows, select() watches sockets only: there we just write (and may wait).
        if os.name == "nt" or select.select([], [2], [], 0)[1]:
            if os.write(2, data) == len(data):  # a short line fits whole in a pipe with room
                log_lost = 0
                return
    except (OSError, ValueError):  # EPIPE, EBADF, ENOSPC; EFBIG at the file size limit
        pass
    log_lost += 1


def format_addr(addr):
    """("::1", 7007, 0, 0) -> "[::1]:7007"; ("127.0.0.1", 7007) -> "127.0.0.1:7007"."""
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def refuse(sock, name, clients):
    """No seat for this connection: log it and close it."""
    log(f"{name} refused: server full ({len(clients)} online)")
    try:
        sock.send(SERVER_FULL)  # a new socket's send buffer is empty: this short line fits
    except OSError:
        pass
    sock.close()


def set_socket_options(sock):
    # Send each small write at once. Nagle's algorithm would hold it back until the one
    # before is acknowledged, which can add 40 ms to a chat line (bench/nagle.py).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)


def accepting():
    """False for a short while after accept() failed for want of descriptors."""
    return time.monotonic() >= accept_paused_until


def accept_waiting(listener):
    """Yield up to ACCEPT_BATCH waiting connections. A crowd arriving at once then costs
    a few turns of the loop, not one turn each (in bench/loadtest.py's hold test, 1,000
    chat clients got in 8 times faster than with one accept() a turn).
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


def close_stalled_leavers(clients):
    """A client that has left gets what is queued for it only while it keeps taking it.
    After drain_timeout seconds in which send() took nothing, we close it and free its
    seat; otherwise a client that stops reading, then shuts down its side, would keep
    its seat for ever."""
    now = time.monotonic()
    for client in list(clients.values()):
        if client.closing and now - client.last_sent > drain_timeout:
            log(f"{client.name} closed: took nothing for {drain_timeout:g} s after leaving")
            drop_client(client, clients, "")


def room_is_waiting(clients):
    """Flood control. While someone still in the room has more than BEHIND bytes unsent,
    we read no one: TCP then slows every sender down to the pace of the slowest reader.
    This is step 1's backpressure, applied to the whole room, so one client sending as
    fast as it can never gets readers who read at a normal pace dropped."""
    return any(len(c.outbuf) > BEHIND and not c.closing for c in clients.values())


def stuck(client):
    """True once client has held the room back for STALL_LIMIT seconds on end: it is not
    reading, and drop_slow_consumers() drops it. So one stuck reader stalls the room for
    STALL_LIMIT seconds at most."""
    if client.closing or len(client.outbuf) <= BEHIND:
        client.behind_since = None
        return False
    if client.behind_since is None:
        client.behind_since = time.monotonic()
    return time.monotonic() - client.behind_since > STALL_LIMIT


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
    global drain_timeout
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; "
                             "0.0.0.0 or :: opens the server to the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="TCP port (default: %(default)s; 0 picks a free port)")
    parser.add_argument("--max-clients", type=int, default=default_max_clients(),
                        help="connections served at once; more are refused "
                             "(default: %(default)s here, the most select() can watch)")
    parser.add_argument("--drain-timeout", type=float, default=drain_timeout, metavar="SECONDS",
                        help="close a client that has left once it has taken none of its "
                             "pending output for this long (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if args.max_clients < 1:
        parser.error("--max-clients must be at least 1")
    if args.drain_timeout <= 0:
        parser.error("--drain-timeout must be more than 0")

    drain_timeout = args.drain_timeout
    # A closed stdin, stdout or stderr gets /dev/null in its place. Otherwise the next
    # socket we open would take its number, and log lines would go to a client.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
    try:
        listener = open_listener(args.host, args.port)
    except socket.gaierror as err:
        print(f"error: cannot resolve host {args.host!r}: {err.strerror}", file=sys.stderr)
        return 1
    except OSError as err:
        why = (err.strerror or str(err)).lower()
        if err.errno == errno.EADDRINUSE:  # in the same words on every system
            why = "address already in use (is another server running?)"
        print(f"error: cannot listen on {format_addr((args.host, args.port))}: {why}",
              file=sys.stderr)
        return 1

    # Ctrl-C raises KeyboardInterrupt; make SIGTERM (kill, systemd, docker stop) and SIGHUP
    # (the terminal went away) do the same. A signal that lands just before select() starts
    # to wait is seen only when select() returns: one more reason for TICK.
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):  # Windows has no SIGHUP
            signal.signal(getattr(signal, name), signal.default_int_handler)
    if hasattr(signal, "SIGXFSZ"):  # a log file at its size limit (ulimit -f) must not kill us:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead, see log()
    try:
        try:
            print(f"chat server listening on {format_addr(listener.getsockname())}", flush=True)
        except OSError:  # stdout is closed or nobody reads it: serve all the same
            pass
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
