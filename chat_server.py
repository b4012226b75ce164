#!/usr/bin/env python3
"""Step 4: a chat server. Each line a client sends goes to every other client.

Run it:      python chat_server.py             then: python chat_client.py, in two terminals
Options:     python chat_server.py --help      (telnet or nc localhost 7007 work too)

This is echo_server.py grown by two ideas. Framing: TCP delivers a byte stream, so we
cut it into lines ourselves. Fan-out: a line is queued for every other client instead of
sent back. Lines that start with "* " are the server's notices; what clients send goes
out as it came, never decoded. Left out: names (each client writes its own), rooms, TLS.
Step 5, --nats HOST:PORT, shares the room with other servers through a NATS server.
What a real server needs besides the lesson comes after the line "The fine print".
"""
import argparse
import errno
import json
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
        if link:  # step 5 (--nats): the link to the other servers, one more socket
            link.watch(want_read, want_write, clients)

        # The one place we wait. Writable means the kernel's send buffer has room, not that
        # data arrived. We don't use the third list (TCP urgent data).
        readable, writable, _ = select.select(want_read, want_write, [], TICK)

        for sock in readable:
            if sock is listener:
                accept_clients(listener, clients, max_clients)
            elif sock in clients:  # skip a client dropped earlier in this pass
                read_from(clients[sock], clients)
        if link:
            link.turn(readable, writable, clients)  # lines from the other servers, and to them
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
        broadcast(f"* a user joined ({online(clients)})\n".encode(), clients, sender=client)
        log(f"{name} connected ({online(clients)})")


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
    if link and sender is not link:  # step 5: the other servers' clients are in the room too
        link.publish(data)


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
        broadcast(f"* a user left ({online(clients)})\n".encode(), clients)
        log(f"{client.name} {why} ({online(clients)})")


def online(clients):  # "3 online" on this server; with --nats it says which: "on host:7007"
    count = sum(not c.closing for c in clients.values())
    return f"{count} online" + (f" on {link.server_name}" if link else "")


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
    return (any(len(c.outbuf) > BEHIND and not c.closing for c in clients.values())
            or bool(link and link.behind()))  # the link to NATS is held to the same pace


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
    parser.add_argument("--nats", metavar="HOST:PORT",
                        help="share the room with every server linked to this NATS server "
                             "(step 5; default: no link)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if args.max_clients < 1:
        parser.error("--max-clients must be at least 1")
    if args.drain_timeout <= 0:
        parser.error("--drain-timeout must be more than 0")
    if args.nats:
        nats_host, _, nats_port = args.nats.rpartition(":")
        nats_host = nats_host.strip("[]")  # [::1]:4222
        if not nats_host or not nats_port.isdigit() or not 0 < int(nats_port) <= 65535:
            parser.error("--nats must be HOST:PORT, such as localhost:4222")

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
    if args.nats and not link_to_nats(nats_host, int(nats_port), listener):
        listener.close()
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
        if link:
            log(f"linked to NATS at {link.where}, as {link.server_name}")
        serve(listener, args.max_clients)
    except KeyboardInterrupt:
        log("shutting down")  # the system closes every client's socket as we exit
    finally:
        listener.close()
    return 0


# Step 5: the link to NATS --------------------------------------------------------------
# With --nats HOST:PORT, this server's room is shared with every server linked to the same
# NATS server. The lesson reaches it through link.watch(), link.turn() and broadcast().

link = None                 # the NatsLink with --nats, else None
NATS_SUBJECT = "chatroom"   # where the linked servers publish their lines
NATS_TIMEOUT = 5.0          # seconds to connect to NATS and hear its PONG
RETRY_MIN, RETRY_MAX = 0.25, 2.0  # seconds between tries to link again: see NatsLink
PING_EVERY = 5.0            # seconds between our PINGs: two unanswered, the link is dropped


def link_to_nats(host, port, listener):
    """Step 5: make the NATS link, or say on stderr why there is none."""
    global link
    name = f"{socket.gethostname()}:{listener.getsockname()[1]}"
    where = format_addr((host, port))
    try:
        link = NatsLink(host, port, name)
        link.connect_now()
    except socket.gaierror as err:
        print(f"error: cannot resolve NATS host {host!r}: {err.strerror}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: cannot link to NATS at {where}: connection refused "
              "(is nats-server running?)", file=sys.stderr)
    except OSError as err:
        print(f"error: cannot link to NATS at {where}: {(err.strerror or str(err)).lower()}",
              file=sys.stderr)
    else:
        return True
    link = None
    return False


class NatsLink:
    """Step 5 (--nats HOST:PORT): this server's room joined with every other server linked
    to the same NATS server, over one TCP connection that the same select() loop serves.

    NATS speaks lines of text. It greets us with INFO {...}; we answer CONNECT {...} (with
    "echo": false, NATS never hands us back our own lines), SUB chatroom 1 and PING, and
    its PONG says we are in. broadcast() hands publish() every batch of lines and notices
    from our clients: PUB chatroom N, then the N bytes. What the other servers publish
    comes to us as MSG chatroom 1 N and the N bytes, and goes to our clients, and not back
    to NATS: for broadcast(), the link is its sender. NATS sends PING now and then; we answer
    PONG, and we PING it too, to notice a NATS that stopped answering.

    Faults. If the link drops, we log it, keep serving our own clients, and try again
    after RETRY_MIN seconds, then twice as long each time, up to RETRY_MAX. Lines sent
    meanwhile do not cross: core NATS delivers at most once. Our output to NATS counts
    like a client's in room_is_waiting(): past BEHIND bytes the room waits for it, and a
    link that holds the room back for STALL_LIMIT seconds, or does not answer two PINGs,
    is dropped and made again. So our memory stays bounded, and NATS's own cut-off of a
    slow reader (us, while the room waits) only makes us reconnect."""

    def __init__(self, host, port, server_name):
        self.where = format_addr((host, port))
        self.address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.server_name = server_name  # in our notices: "3 online on host:7007"
        self.sock = None
        self.state = "down"             # "connecting", "greeting" (until PONG), "up"
        self.inbuf = bytearray()        # from NATS: the start of a line or a MSG's payload
        self.outbuf = bytearray()       # to NATS, not taken by the kernel yet
        self.since = time.monotonic()   # when the state last changed
        self.retry_in = RETRY_MIN
        self.max_payload = 1024 * 1024  # NATS's limit on a message; its INFO says
        self.pings = 0                  # PINGs of ours not answered yet
        self.behind_since = None
        self.lost_at = None             # when the link went down, while it is down
        self.why = ""                   # why it last went down
        self.introduced = False         # whether we sent CONNECT on this connection

    def connect_now(self):
        """At start: link now, waiting, or raise OSError saying why."""
        sock = socket.create_connection(self.address[4][:2], timeout=NATS_TIMEOUT)
        self.sock, self.state, self.introduced = sock, "greeting", False
        while self.state == "greeting":
            data = sock.recv(RECV_SIZE)
            if not data:
                raise OSError("it closed the connection")
            self.inbuf += data
            if not self.take_in({}):
                raise OSError(self.why)
            sock.sendall(self.outbuf)
            self.outbuf.clear()
        sock.setblocking(False)

    def watch(self, want_read, want_write, clients):
        """Add our socket to what select() watches, or start a connection when it is time."""
        now = time.monotonic()
        if self.state == "down" and now >= self.since + self.retry_in:
            self.start_connecting()
        if self.state == "connecting":
            want_write.append(self.sock)  # writable: the connection is made, or has failed
        elif self.state != "down":
            # Like a client, we are not read while someone in our room is behind.
            if not any(len(c.outbuf) > BEHIND and not c.closing for c in clients.values()):
                want_read.append(self.sock)
            if self.outbuf:
                want_write.append(self.sock)

    def start_connecting(self):
        family, kind, proto, _, addr = self.address
        self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self.state, self.since, self.introduced = "connecting", time.monotonic(), False
        err = self.sock.connect_ex(addr)  # connect without waiting: select() tells us
        if err not in (0, errno.EINPROGRESS, getattr(errno, "WSAEWOULDBLOCK", -1)):
            self.fail(os.strerror(err).lower())

    def turn(self, readable, writable, clients):
        """One turn of the loop for the link: connect, read, write, and check its health."""
        now = time.monotonic()
        if self.state == "connecting":
            # Writable: connected, or failed. (Windows tells a failure in select()'s third
            # list, which we do not use: so we ask each turn.)
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.fail(os.strerror(err).lower())
            if self.sock in writable:
                self.state, self.since = "greeting", now
        if self.state in ("greeting", "up") and self.sock in readable:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                data = None
            except OSError as err:
                return self.fail((err.strerror or str(err)).lower())
            if data == b"":
                return self.fail("NATS closed the connection")
            if data:
                self.inbuf += data
                if not self.take_in(clients):
                    return
        if self.state in ("greeting", "up") and self.outbuf:
            try:
                del self.outbuf[:self.sock.send(self.outbuf)]
            except BlockingIOError:
                pass
            except OSError as err:
                return self.fail((err.strerror or str(err)).lower())
        if self.state in ("connecting", "greeting") and now - self.since > NATS_TIMEOUT:
            return self.fail(f"no answer in {NATS_TIMEOUT:g} s")
        if self.state == "up":
            self.check_health(now)

    def take_in(self, clients):
        """Act on every complete line NATS sent; a MSG's payload goes to our clients.
        False if the link had to be dropped."""
        while True:
            end = self.inbuf.find(b"\r\n")
            if end < 0:
                if len(self.inbuf) > RECV_SIZE:  # no protocol line is that long
                    return self.fail("NATS sent a line too long")
                return True
            words = bytes(self.inbuf[:end]).split()
            op = words[0].upper() if words else b""
            if op == b"MSG":  # MSG room 1 N, then N bytes and \r\n
                try:
                    size = int(words[-1])
                except ValueError:
                    size = -1
                if not 0 <= size <= self.max_payload:  # so inbuf stays bounded
                    return self.fail("NATS sent a bad MSG line")
                if len(self.inbuf) < end + 2 + size + 2:
                    return True  # the rest of the payload is still on its way
                payload = bytes(self.inbuf[end + 2:end + 2 + size])
                del self.inbuf[:end + 2 + size + 2]
                broadcast(payload, clients, sender=self)
                continue
            line = bytes(self.inbuf[:end]).decode("utf-8", errors="replace")
            del self.inbuf[:end + 2]
            if op == b"PING":
                self.outbuf += b"PONG\r\n"
            elif op == b"PONG":
                self.pings = 0
                if self.state == "greeting":
                    self.link_up()
            elif op == b"INFO":
                self.read_info(line[4:])
            elif op == b"-ERR":
                log(f"NATS at {self.where} says: {line[5:]}")
                if self.state == "greeting":
                    return self.fail(line[5:].strip(" '").lower())

    def read_info(self, text):
        """NATS's INFO: its limits. The first one is our cue to say who we are."""
        try:
            self.max_payload = max(1, int(json.loads(text).get("max_payload", self.max_payload)))
        except (ValueError, AttributeError):
            pass
        if self.state == "greeting" and not self.introduced:
            self.introduced = True
            options = {"verbose": False, "pedantic": False, "echo": False, "protocol": 1,
                       "name": f"chat_server.py {self.server_name}"}
            self.outbuf += (f"CONNECT {json.dumps(options)}\r\nSUB {NATS_SUBJECT} 1\r\n"
                            "PING\r\n").encode()

    def link_up(self):
        self.state, self.since, self.retry_in = "up", time.monotonic(), RETRY_MIN
        self.next_ping = self.since + PING_EVERY
        if self.lost_at is not None:
            log(f"NATS link to {self.where} is back after {self.since - self.lost_at:.1f} s")
            self.lost_at = None

    def publish(self, data):
        """Queue data (whole lines) for the other servers, in messages NATS takes: a batch
        over its max_payload is split at line boundaries. While the link is down, nothing."""
        if self.state != "up":
            return
        start = 0
        while start < len(data):
            end = start + self.max_payload
            if end < len(data):
                end = data.rfind(b"\n", start, end) + 1
                if end <= start:  # one line longer than NATS takes: it cannot cross
                    log(f"a line longer than NATS's max_payload ({self.max_payload} bytes) "
                        "did not cross")
                    start = data.find(b"\n", start) + 1 or len(data)
                    continue
            chunk = data[start:end]
            self.outbuf += b"PUB %s %d\r\n%s\r\n" % (NATS_SUBJECT.encode(), len(chunk), chunk)
            start = end

    def behind(self):
        return self.state == "up" and len(self.outbuf) > BEHIND

    def check_health(self, now):
        """Drop a link that holds the room back too long, or that stopped answering."""
        if self.behind():
            self.behind_since = self.behind_since or now
            if now - self.behind_since > STALL_LIMIT:
                return self.fail(f"it held the room back for {STALL_LIMIT:g} s")
        else:
            self.behind_since = None
        if now >= self.next_ping:
            if self.pings >= 2:
                return self.fail(f"no answer to PING in {2 * PING_EVERY:g} s")
            self.outbuf += b"PING\r\n"
            self.pings += 1
            self.next_ping = now + PING_EVERY

    def fail(self, why):
        """Drop the connection; the next try comes after a wait that doubles each time."""
        now = time.monotonic()
        if self.state == "up":
            log(f"NATS link to {self.where} lost: {why}; lines do not cross until it is back")
            self.lost_at, self.retry_in = now, RETRY_MIN
        else:  # a try that failed: wait longer before the next
            self.retry_in = min(self.retry_in * 2, RETRY_MAX)
        self.sock.close()
        self.sock, self.state, self.since, self.why = None, "down", now, why
        self.inbuf.clear()
        self.outbuf.clear()
        self.pings, self.behind_since = 0, None
        return False


if __name__ == "__main__":
    sys.exit(main())
