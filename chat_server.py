#!/usr/bin/env python3
"""Step 4: a chat server. Each line a client sends goes to every other client.

Run it:      python chat_server.py        then: python chat_client.py, in two terminals

This is echo_server.py grown by two ideas. Framing: TCP delivers a byte stream, so we cut
it into lines. Fan-out: a line is queued for every other client instead of sent back; "* "
starts the server's notices. Left out: names (each client sends its own) and rooms.
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
BEHIND = 64 * 1024          # a reader with more unsent than this holds the room back
PAYBACK = 0.1 / BEHIND      # seconds of the room's wait that one byte read pays for
REFILL = 0.2                # budget earned back each second the room does not wait for a reader
TICK = 0.5                  # select() waits this long at most: see time_to_wait()


class Client:
    """Everything the server keeps for one connection (smallchat keeps a struct)."""

    def __init__(self, sock, addr):
        self.sock = sock
        self.addr = addr            # "127.0.0.1:50312", for the log
        self.inbuf = bytearray()    # the start of a line whose "\n" has not arrived yet
        self.outbuf = bytearray()   # bytes for this client that the kernel has not taken yet
        self.closing = False        # it has left: close once outbuf is sent
        self.last_sent = time.monotonic()  # when send() last took some of outbuf
        self.stalled = 0.0          # seconds of its stall budget spent: see drop_slow_readers()
        self.taken = 0              # bytes send() took this turn


class Server:
    """Everything the loop keeps, in one place."""

    def __init__(self, listener, settings):
        self.listener, self.settings, self.clients = listener, settings, {}  # socket -> Client
        self.accept_paused_until = 0.0  # accept() failed for want of descriptors: wait
        self.waited_for, self.turn_began = [], time.monotonic()  # whom the room waits for, since
        self.extras = []            # steps 5 and 6 (nats_link.py, tls_layer.py) join our loop
        self.turn_is_full = False   # a reader is one read from OUTBUF_LIMIT: read no more now


def serve(server):
    """The one loop. It runs until Ctrl-C (KeyboardInterrupt)."""
    while True:
        # Ask only for what we can act on: not the listener just after accept() failed (we
        # would spin), no client while the room waits for a reader (flood control), and
        # writability only while we have something to send, or select() wakes us at once.
        want_read = [server.listener] if time.monotonic() >= server.accept_paused_until else []
        if not room_is_waiting(server):
            want_read += [c.sock for c in server.clients.values() if not c.closing]
        want_write = [c.sock for c in server.clients.values() if c.outbuf]
        for extra in server.extras:  # steps 5 and 6: sockets of their own, in the same wait
            extra.add_sockets(want_read, want_write, bool(server.waited_for))

        # The one place we wait: until a socket is ready or a timer is due. Writable means the
        # kernel's send buffer has room (not that data arrived): a full one has taken some.
        readable, writable, _ = select.select(want_read, want_write, [], time_to_wait(server))
        server.turn_is_full = False
        for sock in readable:
            if sock is server.listener:
                accept_clients(server)
            elif sock in server.clients and not server.turn_is_full:  # (see broadcast())
                read_from(server.clients[sock], server)
        for extra in server.extras:
            extra.serve_ready(readable, writable)
        # One send() to every client with output, not only to those select() found writable,
        # so what was queued this turn leaves this turn (speed). A full socket just refuses.
        for client in list(server.clients.values()):
            if client.outbuf:
                write_to(client, server)
        close_leavers(server)
        drop_slow_readers(server)


def room_is_waiting(server):
    """Flood control. While a reader still in the room has more than BEHIND (64 KiB) unsent,
    we read no one: TCP slows every sender to the slowest reader's pace (step 1's backpressure,
    for the room), so a client sending flat out never gets readers who keep up dropped."""
    server.waited_for = [c for c in server.clients.values()
                         if len(c.outbuf) > BEHIND and not c.closing]
    server.waited_for += [extra for extra in server.extras if extra.behind()]
    server.turn_began = time.monotonic()
    return bool(server.waited_for)


def time_to_wait(server):
    """How long select() may wait: until a client that has left runs out of --drain-timeout,
    or accept() may be tried again; TICK at most (on Windows, Ctrl-C cannot cut it short)."""
    now, timers = time.monotonic(), [server.accept_paused_until]
    timers += [now + server.settings.stall_budget - c.stalled for c in server.waited_for]
    timers += [c.last_sent + server.settings.drain_timeout
               for c in server.clients.values() if c.closing]
    return min([TICK] + [t - now for t in timers if t > now])


def accept_clients(server):
    """A readable listener means connections are waiting: accept() will not block."""
    for sock, addr in accept_waiting(server):  # listener.accept(), up to 16; the refused go
        sock.setblocking(False)
        client = Client(sock, format_addr(addr))
        server.clients[sock] = client
        client.outbuf += b"Welcome to the chatroom!\n"
        broadcast(f"* a user joined ({online(server)})\n".encode(), server, sender=client)
        log(f"{client.addr} connected ({online(server)})")


def read_from(client, server):
    try:
        data = client.sock.recv(RECV_SIZE)
    except BlockingIOError:
        return  # select() said readable, but the data was gone (rare); try again next turn
    except OSError as err:  # ECONNRESET and friends: the client vanished
        drop_client(client, server, f"dropped: {describe(err)}")
        return
    relay_lines(client, data or b"\n", server)  # at the end, a last line without "\n" counts
    if not data:  # b"": the client shut down its side. It leaves; we send what is left
        leave_room(client, server)


def relay_lines(client, data, server):
    """TCP is a byte stream: one recv() may hold half a line, or a hundred lines. We add
    data to inbuf, relay each complete line, and keep the unfinished rest in inbuf."""
    client.inbuf = (client.inbuf + data).replace(b"\r\n", b"\n")  # telnet and nc -C send "\r\n"
    while b"\n\n" in client.inbuf:  # empty lines go, many at a time: a flood of them costs
        client.inbuf = client.inbuf.replace(b"\n\n", b"\n")  # a few replace(), not a loop
    *lines, client.inbuf = client.inbuf.lstrip(b"\n").split(b"\n")  # (so no line is empty)
    batch = bytearray()  # every line of this recv(), queued for the others in one go (speed)
    too_long = len(client.inbuf) > LINE_LIMIT + 1  # + 1: a "\r" may still await its "\n"
    for line in lines:
        if len(line) > LINE_LIMIT:
            too_long = True
            break  # the lines before it still go; it and the rest do not
        batch += line + b"\n"
    broadcast(batch, server, sender=client)
    if too_long:
        client.outbuf += b"error: line too long (limit %d bytes)\n" % LINE_LIMIT  # then close
        log(f"{client.addr} sent a line longer than {LINE_LIMIT} bytes")
        leave_room(client, server)


def broadcast(data, server, sender=None):
    """Queue data for everyone in the room but the sender; write_to() will send it."""
    for client in server.clients.values():
        if client is not sender and not client.closing:
            client.outbuf += data
            if len(client.outbuf) > OUTBUF_LIMIT - RECV_SIZE:  # one read from being dropped:
                server.turn_is_full = True  # we read no one else this turn
    for extra in server.extras:  # step 5: the other servers' clients are in the room too
        extra.publish(data, sender)


def write_to(client, server):
    try:
        sent = client.sock.send(client.outbuf)
    except BlockingIOError:
        return
    except OSError as err:  # EPIPE, ECONNRESET: the client is gone
        drop_client(client, server, f"dropped: {describe(err)}")
        return
    del client.outbuf[:sent]  # send() may take only part: keep the rest for the next turn
    client.last_sent = time.monotonic()
    client.taken += sent  # (it pays for the room's wait: see drop_slow_readers())


def drop_slow_readers(server):
    """Slow readers. A reader the room waited for pays for the wait by reading, 0.1 s per
    64 KiB; the rest is charged to its stall budget (--stall-budget, 2 s), which refills by
    0.2 s a second while the room does not wait for it. Spent, or past OUTBUF_LIMIT: dropped.
    So one reader holds the room back 2 s at once, or one second in six, unless it reads."""
    waited = time.monotonic() - server.turn_began  # this turn, select() included
    for client in list(server.clients.values()):
        if client in server.waited_for:  # what it did not pay for by reading is charged
            client.stalled += max(0.0, waited - client.taken * PAYBACK)
        else:
            client.stalled = max(0.0, client.stalled - waited * REFILL)
        client.taken = 0
        if client.stalled > server.settings.stall_budget or len(client.outbuf) > OUTBUF_LIMIT:
            drop_client(client, server, f"dropped: too slow, {len(client.outbuf)} bytes unsent")


def close_leavers(server):
    """A client that has left gets its pending output while it keeps taking it. We close it
    once all is sent, or after --drain-timeout (10 s) in which send() took nothing."""
    limit = server.settings.drain_timeout
    for client in list(server.clients.values()):
        if client.closing and not client.outbuf:
            drop_client(client, server, "disconnected")
        elif client.closing and time.monotonic() - client.last_sent > limit:
            drop_client(client, server, f"closed: took nothing for {limit:g} s after leaving")


# The fine print ------------------------------------------------------------------------
def open_listener(host, port):
    """The listening socket, non-blocking like every socket the loop serves. A blocking call
    (accept, recv, send) waits until it can act, and while it waits for one client, no one
    else is served. A non-blocking call acts now or raises BlockingIOError: select() waits."""
    family, addr = resolve(host, port)  # IPv4 or IPv6: see the fine print
    listener = socket.socket(family, socket.SOCK_STREAM)  # a TCP socket
    if os.name != "nt":  # rebind at once after a restart (on Windows, 2 servers could share it)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(addr)         # claim the address and port: fails if another server has it
    listener.listen(1024)       # from now on the kernel accepts connections: 1024 may wait
    listener.setblocking(False)
    return listener


# What a real server needs besides the lesson: a log that never stops it, the limits of
# select() and of the process's descriptors, surviving a failed accept(), a bound on what
# the kernel holds for a client that stops reading, and the command line.

ACCEPT_BATCH = 16           # connections accepted per turn at most: see accept_waiting()
ACCEPT_PAUSE = 0.5          # seconds without accept() after it fails (out of descriptors)
FD_SETSIZE = 512 if os.name == "nt" else 1024  # select()'s ceiling: see seat_free()
SPARE_FDS = 24              # descriptors kept for stdin/out/err, the listener and Python
# The kernel's send buffer for each client. Left to itself, Linux grows it to 4 MB for a
# client that does not read: that much of the host's memory for each such client. We
# set a size that costs no speed in bench/loadtest.py (bench/README.md has the figures).
SNDBUF = 64 * 1024
log_lost = 0                # log lines that stderr could not take: see log()
STALL_BUDGET = 2.0          # --stall-budget's default: see drop_slow_readers()


def drop_client(client, server, why):
    """Close the connection now and forget the client."""
    del server.clients[client.sock]
    client.sock.close()
    log(f"{client.addr} {why} ({online(server)})")
    leave_room(client, server)  # if it had not left yet


def leave_room(client, server):
    """Tell everyone else, once, that client has left. Its socket may close later."""
    if not client.closing:
        client.closing = True
        broadcast(f"* a user left ({online(server)})\n".encode(), server)


def online(server):
    """ "3 online": the clients that have not left (one that has left may get its last bytes)."""
    return f"{sum(not c.closing for c in server.clients.values())} online"


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


def describe(err):
    """An OSError in a few lower-case words: "connection reset by peer"."""
    return (err.strerror or str(err)).lower()


def format_addr(addr):
    """("::1", 7007, 0, 0) -> "[::1]:7007"; ("127.0.0.1", 7007) -> "127.0.0.1:7007"."""
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host, port):
    """The address family (IPv4 or IPv6) and the address to bind, for a host name or
    address: "localhost", "0.0.0.0", "::1". Raises socket.gaierror if it does not resolve."""
    family, _, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, addr


def accept_waiting(server):
    """Yield up to ACCEPT_BATCH waiting connections that have a seat (seat_free()), their
    socket options set; refuse() the others. A crowd arriving at once then costs a few
    turns of the loop, not one turn each (in bench/loadtest.py's hold test, 1,000 chat
    clients got in 8 times faster than with one accept() a turn).
    If accept() fails for want of descriptors (EMFILE), the connection stays queued and
    the listener stays readable: we stop watching it for a moment, or we would spin."""
    for _ in range(ACCEPT_BATCH):
        try:
            sock, addr = server.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return  # none left, or one gave up while it waited in the queue
        except OSError as err:
            log(f"cannot accept: {err.strerror}; trying again in {ACCEPT_PAUSE} s")
            server.accept_paused_until = time.monotonic() + ACCEPT_PAUSE
            return
        if seat_free(sock, server):  # --max-clients, and what select() can watch
            set_socket_options(sock)  # no Nagle delay, a bounded kernel buffer
            yield sock, addr
        else:
            refuse(sock, addr, server)


def seat_free(sock, server):
    """Room for one more client: fewer than --max-clients, and a socket that select() can
    watch. select() cannot watch a descriptor numbered FD_SETSIZE or more; on Windows it
    cannot watch more than FD_SETSIZE sockets. Past that, select() would fail."""
    if len(server.clients) >= server.settings.max_clients:
        return False
    if os.name == "nt":
        return len(server.clients) + 1 + len(server.extras) < FD_SETSIZE  # + 1: the listener
    return sock.fileno() < FD_SETSIZE


def refuse(sock, addr, server):
    """No seat for this connection: log it and close it (chat_server.py says why first)."""
    log(f"{format_addr(addr)} refused: server full ({online(server)})")
    try:
        sock.setblocking(False)
        sock.send(b"error: server full, try again later\n")  # an empty send buffer: it fits
    except OSError:
        pass
    sock.close()


def set_socket_options(sock):
    # Send each small write at once. Nagle's algorithm would hold it back until the one
    # before is acknowledged, which can add 40 ms to a chat line (bench/nagle.py).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)


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


def seconds(text):
    """An argparse type: a number of seconds, more than 0 and finite."""
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; "
                             "0.0.0.0 or :: opens the server to the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="TCP port (default: %(default)s; 0 picks a free port)")
    parser.add_argument("--max-clients", type=int, default=default_max_clients(),
                        help="connections served at once; more are refused "
                             "(default: %(default)s here, the most select() can watch)")
    parser.add_argument("--drain-timeout", type=seconds, default=10.0, metavar="SECONDS",
                        help="close a client that has left once it has taken none of its "
                             "pending output for this long (default: %(default)s)")
    parser.add_argument("--stall-budget", type=seconds, default=STALL_BUDGET, metavar="SECONDS",
                        help="drop a reader the room waited this long for (default: %(default)s)")
    parser.add_argument("--nats", metavar="HOST:PORT",
                        help="step 5: share the room through this NATS server (nats_link.py)")
    parser.add_argument("--handshake-timeout", type=seconds, default=5.0, metavar="SECONDS",
                        help="NATS's greeting, and a TLS client's handshake, must be done "
                             "within this (default: %(default)s)")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                        help="step 6: serve over TLS with this certificate and key (tls_layer.py)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if args.max_clients < 1:
        parser.error("--max-clients must be at least 1")
    return args


def start(args):
    """The listening socket, or None after saying on stderr why there is none."""
    # A closed stdin, stdout or stderr gets /dev/null in its place. Otherwise the next
    # socket we open would take its number, and log lines would go to a client.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
    try:
        return open_listener(args.host, args.port)
    except (socket.gaierror, UnicodeError) as err:  # UnicodeError: "a..b" is no host name
        why = err.strerror if isinstance(err, socket.gaierror) else "not a valid host name"
        print(f"error: cannot resolve host {args.host!r}: {why}", file=sys.stderr)
    except OSError as err:
        why = describe(err)
        if err.errno == errno.EADDRINUSE:  # in the same words on every system
            why = "address already in use (is another server running?)"
        print(f"error: cannot listen on {format_addr((args.host, args.port))}: {why}",
              file=sys.stderr)
    return None


def main(argv=None):
    try:
        args = parse_args(argv)
        listener = start(args)
        server = listener and join_steps(Server(listener, args))
    except KeyboardInterrupt:  # Ctrl-C while we start
        return 0
    if not server:
        return 1
    # Ctrl-C raises KeyboardInterrupt; make SIGTERM (kill, systemd, docker stop) and SIGHUP
    # (the terminal went away) do the same. A signal that lands just before select() starts
    # to wait is seen only when select() returns: TICK bounds that wait.
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
        serve(server)
    except KeyboardInterrupt:
        log("shutting down")  # the system closes every client's socket as we exit
    finally:
        listener.close()
    return 0


def join_steps(server):
    """Steps 5 (--nats) and 6 (--tls) live in modules beside this file, loaded only for
    their option: copied alone, this file runs steps 1 to 4. None if one cannot start."""
    try:
        if server.settings.tls:
            import tls_layer
            server = tls_layer.open_door(server, accept_clients, read_from, seat_free, log)
        if server and server.settings.nats:
            import nats_link
            rules = dict(RECV_SIZE=RECV_SIZE, LINE_LIMIT=LINE_LIMIT, BEHIND=BEHIND, REFILL=REFILL)
            server = nats_link.join(server, dict(rules, PAYBACK=PAYBACK), broadcast, log)
    except ImportError as err:
        option = "--tls" if err.name == "tls_layer" else "--nats"
        print(f"error: {option} needs {err.name}.py beside chat_server.py", file=sys.stderr)
        return None
    return server


if __name__ == "__main__":
    sys.exit(main())
