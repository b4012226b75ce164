#!/usr/bin/env python3
"""Step 1: a TCP echo server (RFC 862) that serves many clients with one select() loop.

Run it:      python echo_server.py        then, in another terminal: nc localhost 7007

Every byte a client sends comes back to it, unchanged and in order. One loop serves
everyone: select.select() waits until some socket is ready, so no client waits on
another. Left out: idle timeouts, UDP (RFC 862 has it), TLS, and the fine print.
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
PAUSE_READING_AT = 256 * 1024  # a client with this much unsent echo is not read until it drains
TICK = 0.5                  # select() waits this long at most: see time_to_wait()


class Client:
    """Everything the server keeps for one connection (smallchat keeps a struct)."""

    def __init__(self, sock, addr):
        self.sock = sock
        self.addr = addr            # "127.0.0.1:50312", for the log
        self.outbuf = bytearray()   # bytes for this client that the kernel has not taken yet
        self.closing = False        # it has left: close once outbuf is sent
        self.last_sent = time.monotonic()  # when send() last took some of outbuf


class Server:
    """Everything the loop keeps, in one place."""

    def __init__(self, listener, settings):
        self.listener, self.settings, self.clients = listener, settings, {}  # socket -> Client
        self.accept_paused_until = 0.0  # accept() failed for want of descriptors: wait


def serve(server):
    """The one loop. It runs until Ctrl-C (KeyboardInterrupt)."""
    while True:
        # Ask only for what we can act on: not the listener just after accept() failed (we
        # would spin), not a client whose echo piles up (backpressure: TCP slows it down), and
        # writability only while we have something to send, or select() wakes us at once.
        want_read = [server.listener] if time.monotonic() >= server.accept_paused_until else []
        want_read += [c.sock for c in server.clients.values()
                      if not c.closing and len(c.outbuf) < PAUSE_READING_AT]
        want_write = [c.sock for c in server.clients.values() if c.outbuf]

        # The one place we wait: until a socket is ready or a timer is due. Writable means the
        # kernel's send buffer has room (not that data arrived): a full one has taken some.
        readable, _, _ = select.select(want_read, want_write, [], time_to_wait(server))
        for sock in readable:
            if sock is server.listener:
                accept_clients(server)
            elif sock in server.clients:  # skip a client dropped earlier in this pass
                read_from(server.clients[sock], server)
        # One send() to every client with output, not only to those select() found writable,
        # so what was queued this turn leaves this turn (speed). A full socket just refuses.
        for client in list(server.clients.values()):
            if client.outbuf:
                write_to(client, server)
        close_leavers(server)


def time_to_wait(server):
    """How long select() may wait: until a client that has left runs out of --drain-timeout,
    or accept() may be tried again; TICK at most (on Windows, Ctrl-C cannot cut it short)."""
    now, timers = time.monotonic(), [server.accept_paused_until]
    timers += [c.last_sent + server.settings.drain_timeout
               for c in server.clients.values() if c.closing]
    return min([TICK] + [t - now for t in timers if t > now])


def accept_clients(server):
    """A readable listener means connections are waiting: accept() will not block."""
    for sock, addr in accept_waiting(server):  # listener.accept(), up to 16; the refused go
        sock.setblocking(False)
        client = Client(sock, format_addr(addr))
        server.clients[sock] = client
        log(f"{client.addr} connected ({online(server)})")


def read_from(client, server):
    try:
        data = client.sock.recv(RECV_SIZE)
    except BlockingIOError:
        return  # select() said readable, but the data was gone (rare); try again next turn
    except OSError as err:  # ECONNRESET and friends: the client vanished
        drop_client(client, server, f"dropped: {describe(err)}")
        return
    if not data:  # b"": the client shut down its side. We send what is left, then close
        client.closing = True
    client.outbuf += data  # the echo: write_to() sends it


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


def close_leavers(server):
    """A client that has left gets its pending output while it keeps taking it. We close it
    once all is sent, or after --drain-timeout (10 s) in which send() took nothing."""
    limit = server.settings.drain_timeout
    for client in list(server.clients.values()):
        if client.closing and not client.outbuf:
            drop_client(client, server, "disconnected")
        elif client.closing and time.monotonic() - client.last_sent > limit:
            drop_client(client, server, f"closed: took nothing for {limit:g} s after leaving")


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


# The fine print ------------------------------------------------------------------------
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
SNDBUF = 256 * 1024
log_lost = 0                # log lines that stderr could not take: see log()


def drop_client(client, server, why):
    """Close the connection now and forget the client."""
    del server.clients[client.sock]
    client.sock.close()
    log(f"{client.addr} {why} ({online(server)})")


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
        return len(server.clients) + 1 < FD_SETSIZE  # + 1: the listener
    return sock.fileno() < FD_SETSIZE


def refuse(sock, addr, server):
    """No seat for this connection: log it and close it (chat_server.py says why first)."""
    log(f"{format_addr(addr)} refused: server full ({online(server)})")
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
        server = listener and Server(listener, args)
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
            print(f"echo server listening on {format_addr(listener.getsockname())}", flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
