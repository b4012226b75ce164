#!/usr/bin/env python3
"""How far does it go? A load generator for the chat and echo servers.

Run it:      python bench/loadtest.py              (about 50 seconds; --repeat 3 takes 2.5 min)
Options:     python bench/loadtest.py --help

By default it starts each server on a free port, runs every test against a fresh copy,
stops it, and prints one table with a column per server: chat_server.py next to
bench/asyncio_chat_server.py, and echo_server.py next to bench/asyncio_echo_server.py.
Other servers are given as commands with {port} in them, a running one with --connect:

    python bench/loadtest.py --chat "ncat --broker -l -m 2000 127.0.0.1 {port}" --only fanout
    python bench/loadtest.py --connect 127.0.0.1:7007 --pid 4242 --only fanout,latency

Step 5, several servers sharing one room through NATS: --cluster N adds a column for N
chat_server.py linked through one nats-server (which must be installed), with the
clients spread across them in turn. Its latency rows tell lines within one server from
lines across servers. To hold 4,000 clients on 4 servers:

    python bench/loadtest.py --cluster 4 --only hold --hold 4000

Step 6, the room over TLS: --tls adds a column for chat_server.py --tls in fanout and
latency (the clients speak TLS too, through tls_layer.py; openssl makes the certificate):

    python bench/loadtest.py --only fanout,latency --tls

The tests:
  fanout    100 clients, 10 of them sending flat out: lines received per second, across
            all clients ("deliveries"). Each sender has a window of lines in flight, so no
            receiver can fall behind far enough to be cut off as a slow consumer.
  latency   100 clients sending 1,000 lines/s in all, each line carrying its send time:
            p50, p99 and max from send to receipt, over every delivery.
  hold      1,000 clients (and 20 more than that): how many the server holds, how many
            it refuses with a message, and whether one line then reaches all the others.
  bulk      one echo connection, sending and reading flat out: MB/s, checked byte by byte.
  rtt1      64-byte echo round trips per second over 1 connection,
  rtt50     and over 50 connections at once.

Every chat line is checked: lines lost, duplicated, reordered, sent back to their sender,
or garbled are counted, and the report says so when any is not zero (exit status 1).
The server's CPU time and peak RSS are read from /proc (Linux only; with --connect only
if --pid is given). Our own CPU time is shown next to it: a generator that is itself the
bottleneck measures nothing. It is one process with selectors (epoll), so it may use
what the four scripts may not; in the latency test it polls without sleeping.

Before each test it opens and closes one connection, so that every server is measured in
the state a long-running one is in (see warm_up() for why that matters to asyncio).
"""
import argparse
import collections
import os
import platform
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

try:
    import resource  # POSIX only
except ImportError:
    resource = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = shlex.quote(sys.executable)
DEFAULT_CHAT = [f"{PY} {shlex.quote(os.path.join(ROOT, 'chat_server.py'))} --port {{port}}",
                f"{PY} {shlex.quote(os.path.join(ROOT, 'bench', 'asyncio_chat_server.py'))} --port {{port}}"]
DEFAULT_ECHO = [f"{PY} {shlex.quote(os.path.join(ROOT, 'echo_server.py'))} --port {{port}}",
                f"{PY} {shlex.quote(os.path.join(ROOT, 'bench', 'asyncio_echo_server.py'))} --port {{port}}"]
CHAT_TESTS = ("fanout", "latency", "hold")
ECHO_TESTS = ("bulk", "rtt1", "rtt50")
RECV_SIZE = 64 * 1024  # a new bytes object of over 128 KiB per recv() may cost an mmap() each
BULK_SIZE = 1024 * 1024  # what bulk hands send() at a time
WAIT = 10  # seconds any one wait may take (connecting, settling, draining)

# Fan-out lines are fixed width: a sender letter, a 14-digit sequence number, "\n". Fixed
# width lets us check a whole chunk at C speed: every 16th byte is a sender letter, and a
# run of lines from one sender must equal that sender's stream at the expected place.
WIDTH = 16
SENDER_IDS = b"ABCDEFGHIJKLMNOPQRSTUVWYZabcdefghijklmnopqrstuvwxyz"  # no X: it is the template's
DATA_LINE = re.compile(rb"([A-Za-z])(\d{14})")
NOT_ID = {c: re.compile(b"[^" + bytes([c]) + b"]") for c in SENDER_IDS}
LATENCY_LINE = re.compile(rb"T(\d{4}) (\d{9}) (\d{20})")  # client, sequence, send time in ns


def now():
    return time.monotonic()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit(wanted):
    """The hold test needs more than 1,000 sockets: raise our soft limit toward the hard one."""
    if resource:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def label(cmd):
    """"python /x/chat_server.py --port {port}" -> "chat_server.py"; "ncat --broker" -> "ncat"."""
    words = shlex.split(cmd)
    scripts = [w for w in words if w.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else words[0])


def cpu_seconds(pid):
    """CPU time a process has used so far, from /proc; None if we cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError):
        return None


class Server:
    """A server under test: started from a command (and stopped by its PID), or one
    already running at --connect. cpu() and peak_rss_mb() read /proc when we know the PID."""

    servers = 1  # how many servers share the room (a Cluster has more)

    def __init__(self, cmd=None, addr=None, pid=None, tls=None):
        self.cmd, self.popen, self.pid = cmd, None, pid
        self.tls = tls  # step 6: the clients' TLS context, for a server started with --tls
        self.host, self.port = addr if addr else ("127.0.0.1", free_port())
        self.connections = 0  # made so far: see next_address()

    def next_address(self):
        """Where the next client connects."""
        self.connections += 1
        return self.host, self.port

    def server_of(self, client):
        """Which of the servers client number client was sent to."""
        return 0

    def __enter__(self):
        if self.cmd:
            self.popen = subprocess.Popen(shlex.split(self.cmd.format(port=self.port)),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            self.pid = self.popen.pid
        end = now() + WAIT
        while self.cmd and not self.listening():
            if now() > end or (self.popen and self.popen.poll() is not None):
                self.__exit__()
                raise RuntimeError(f"server did not start: {self.cmd or self.port}")
            time.sleep(0.02)
        self.warm_up()
        self.start_rss_mb = self.peak_rss_mb()
        return self

    def warm_up(self):
        """One connection in and out before we measure: we half-close it and wait for the
        server to close its side, so its slot is free again when the test starts. This puts
        every server in the state a long-running one is in. It matters for asyncio, which
        reads into a fresh 256 KiB buffer per recv(): until one such buffer has been freed
        whole (at the first end of a connection), the C library gets each one from mmap(),
        and asyncio runs at half speed or less."""
        if self.tls:  # one TLS connection in and out instead
            sock = connect(self, 1)[0]
            sock.shutdown(socket.SHUT_WR)
            while select.select([sock], [], [], WAIT)[0] and read_chat_lines(sock, [])[1]:
                pass
            sock.close()
            self.connections = 0
            return
        with socket.create_connection((self.host, self.port), timeout=WAIT) as sock:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass

    def listening(self, port=None):
        """Is the server listening yet? On Linux we look in /proc/net/tcp for a socket in
        state 0A (LISTEN) on our port, so no test connection takes a chat server's slot or
        sends a "user left" notice. Elsewhere we connect once and close."""
        port = port or self.port
        tables = [t for t in ("/proc/net/tcp", "/proc/net/tcp6") if os.path.exists(t)]
        if not tables:
            try:
                socket.create_connection((self.host, port), timeout=1).close()
                return True
            except OSError:
                return False
        for table in tables:
            with open(table) as f:
                for row in f.read().splitlines()[1:]:
                    fields = row.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        return False

    def __exit__(self, *exc):
        if self.popen:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()

    def alive(self):
        return self.popen is None or self.popen.poll() is None

    def cpu(self):
        return cpu_seconds(self.pid)

    def peak_rss_mb(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, TypeError, StopIteration):
            return None


class Window:
    """Measures a stretch of time: wall clock, the server's CPU, and our own CPU."""

    def __init__(self, server):
        self.server = server
        self.start, self.cpu0, self.own0 = now(), server.cpu(), time.process_time()
        self.nats0 = server.nats_cpu() if server.servers > 1 else None

    def close(self, result):
        result["seconds"] = now() - self.start
        if result["seconds"] >= 0.1:  # /proc counts CPU time in 10 ms ticks
            cpu = self.server.cpu()
            if cpu is not None and self.cpu0 is not None:
                result["server CPU %"] = 100 * (cpu - self.cpu0) / result["seconds"]
            if self.nats0 is not None:
                result["nats-server CPU %"] = 100 * (self.server.nats_cpu() - self.nats0) / result["seconds"]
            result["loadtest CPU %"] = 100 * (time.process_time() - self.own0) / result["seconds"]
        return result


class Cluster(Server):
    """Step 5: n chat_server.py linked through one nats-server. Clients go to the servers
    in turn (client k to server k % n). CPU time and peak RSS are the chat servers' added
    up; the nats-server's CPU time is reported on its own row."""

    def __init__(self, n, nats):
        super().__init__()
        self.servers, self.nats = n, nats
        self.ports = [self.port] + [free_port() for _ in range(n - 1)]
        self.nats_port = free_port()
        self.members = []
        self.nats_popen = None

    def __enter__(self):
        try:
            self.nats_popen = subprocess.Popen([self.nats, "-a", "127.0.0.1", "-p", str(self.nats_port)],
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
            end = now() + WAIT
            while not self.listening(self.nats_port):
                if now() > end or self.nats_popen.poll() is not None:
                    raise RuntimeError(f"nats-server did not start on port {self.nats_port}")
                time.sleep(0.02)
            for port in self.ports:
                member = Server(f"{DEFAULT_CHAT[0]} --nats 127.0.0.1:{self.nats_port}", ("127.0.0.1", port))
                self.members.append(member.__enter__())
        except BaseException:
            self.__exit__()
            raise
        self.start_rss_mb = self.peak_rss_mb()
        return self

    def __exit__(self, *exc):
        for member in self.members:
            member.__exit__()
        if self.nats_popen:
            self.nats_popen.terminate()
            self.nats_popen.wait()

    def next_address(self):
        self.connections += 1
        return self.host, self.ports[(self.connections - 1) % self.servers]

    def server_of(self, client):
        return client % self.servers

    def alive(self):
        return all(member.alive() for member in self.members) and self.nats_popen.poll() is None

    def cpu(self):
        times = [member.cpu() for member in self.members]
        return None if None in times else sum(times)

    def nats_cpu(self):
        return cpu_seconds(self.nats_popen.pid)

    def peak_rss_mb(self):
        sizes = [member.peak_rss_mb() for member in self.members]
        return None if None in sizes or not sizes else sum(sizes)


def connect(server, n, nodelay=False):
    socks = []
    for _ in range(n):
        sock = socket.create_connection(server.next_address(), timeout=WAIT)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server.tls:  # step 6: a TlsSocket has recv() and send() of plaintext, like a socket
            sock = tls_layer.connect(sock, server.tls, server.host, WAIT)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def close_all(socks):
    for sock in socks:
        sock.close()


# ---------------------------------------------------------------------------------------
# Chat: the bookkeeping that counts lost, duplicated, reordered and sent-back lines
# ---------------------------------------------------------------------------------------

class Ledger:
    """What each receiver has had from each sender. expected[s][r] is the next sequence
    number receiver r needs from sender s; a line that comes early waits in ahead."""

    def __init__(self, n_senders, n_clients):
        self.expected = [[0] * n_clients for _ in range(n_senders)]
        for s in range(n_senders):
            self.expected[s][s] = float("inf")  # a sender expects nothing from itself
        self.ahead = {}  # (s, r) -> sequence numbers that came before their turn
        self.counts = dict.fromkeys(("delivered", "lost", "duplicated", "reordered",
                                     "sent back", "garbled"), 0)

    def one_line(self, s, r, seq):
        """One line, checked on its own."""
        self.counts["delivered"] += 1
        expected = self.expected[s]
        if seq == expected[r] and (s, r) not in self.ahead:  # the usual case, made quick
            expected[r] = seq + 1
            return
        if s == r:
            self.counts["sent back"] += 1
            return
        expected, ahead = self.expected[s][r], self.ahead.setdefault((s, r), set())
        if seq == expected:
            expected += 1
            while expected in ahead:
                ahead.remove(expected)
                expected += 1
            self.expected[s][r] = expected
        elif seq < expected or seq in ahead:
            self.counts["duplicated"] += 1
        else:
            self.counts["reordered"] += 1
            ahead.add(seq)

    def count_lost(self, sent):
        for s, total in enumerate(sent):
            for r, got in enumerate(self.expected[s]):
                if r != s:
                    self.counts["lost"] += total - got - len(self.ahead.get((s, r), ()))

    def errors(self, cut_off=0):
        """Every count that should be zero and is not; cut_off: receivers the server closed."""
        errors = {k: v for k, v in self.counts.items() if k != "delivered" and v}
        if cut_off:
            errors["clients cut off"] = cut_off
        return errors


class Streams:
    """Sender s sends the bytes stream(s)[16 k:16 (k + 1)] as its line k. Receivers compare
    what comes against the same bytes. Grown on demand, by doubling."""

    def __init__(self, n_senders):
        self.template = b""
        self.streams = [b""] * n_senders
        self.tables = [bytes.maketrans(b"X", SENDER_IDS[s:s + 1]) for s in range(n_senders)]

    def get(self, s, lines):
        if len(self.streams[s]) < lines * WIDTH:
            have = len(self.template) // WIDTH
            if have < lines:
                more = max(lines, 2 * have, 4096)
                self.template += b"".join(b"X%014d\n" % k for k in range(have, more))
            self.streams[s] = self.template.translate(self.tables[s])
        return self.streams[s]


def read_chat_lines(sock, pending):
    """recv() once; return (complete lines as one bytes, True) or (b"", False) at EOF."""
    try:
        data = sock.recv(RECV_SIZE)
    except BlockingIOError:
        return b"", True
    except OSError:
        data = b""
    if not data:
        return b"", False
    if pending:
        data = pending.pop() + data
    end = data.rfind(b"\n") + 1
    if end < len(data):
        pending.append(data[end:])  # a line cut in two: its start waits for the rest
    return data[:end], True


def check_fanout_chunk(chunk, r, ledger, streams, n_senders):
    """Account for a chunk of complete lines received by client r."""
    n, rest = divmod(len(chunk), WIDTH)
    ids = chunk[0::WIDTH]
    if rest == 0 and n and not ids.translate(None, SENDER_IDS[:n_senders]):
        # The fast path: only data lines. Walk the runs of lines from one sender and
        # compare each run with that sender's stream in one go.
        i = 0
        while i < n:
            c = ids[i]
            match = NOT_ID[c].search(ids, i)
            j = match.start() if match else n
            s = SENDER_IDS.index(c)
            expected = ledger.expected[s][r]
            if s != r and chunk[i * WIDTH:j * WIDTH] == \
                    streams.get(s, expected + j - i)[expected * WIDTH:(expected + j - i) * WIDTH]:
                ledger.expected[s][r] = expected + j - i
                ledger.counts["delivered"] += j - i
            else:
                check_lines_one_by_one(chunk[i * WIDTH:j * WIDTH], r, ledger, n_senders)
            i = j
    else:
        check_lines_one_by_one(chunk, r, ledger, n_senders)


def check_lines_one_by_one(chunk, r, ledger, n_senders):
    for line in chunk.split(b"\n")[:-1]:
        match = DATA_LINE.fullmatch(line)
        if match and match.group(1) in SENDER_IDS[:n_senders]:
            ledger.one_line(SENDER_IDS.index(match.group(1)), r, int(match.group(2)))
        elif not line.startswith((b"* ", b"Welcome", b"#")):  # server notices, our sync marks
            ledger.counts["garbled"] += 1


def settle(sel, socks, pending, on_chunk=None):
    """Make sure every client is in the room before we start: client 0 sends a mark until
    every other client has seen one. Everything received meanwhile is handed to on_chunk."""
    seen = [False] * len(socks)
    seen[0] = True
    for attempt in range(int(WAIT / 0.2)):
        socks[0].send(b"#sync %d\n" % attempt)
        end = now() + 0.2
        while not all(seen) and now() < end:
            for key, _ in sel.select(0.05):
                r = key.data
                chunk, open_ = read_chat_lines(key.fileobj, pending[r])
                if not open_:
                    raise RuntimeError(f"client {r} was disconnected while joining")
                if b"#sync" in chunk:
                    seen[r] = True
                if on_chunk:
                    on_chunk(chunk, r)
        if all(seen):
            return
    raise RuntimeError(f"only {sum(seen)} of {len(socks)} clients got into the room")


def test_fanout(server, clients=100, senders=10, seconds=3.0, window_bytes=128 * 1024):
    """Senders send flat out; every client reads. Each sender keeps at most window lines
    beyond what its slowest receiver has read, so one receiver has at most window_bytes
    in flight, well under the server's slow-consumer cap of 256 KiB."""
    senders = min(senders, clients, len(SENDER_IDS))
    window = max(1, window_bytes // (WIDTH * senders))
    socks = connect(server, clients)
    sel = selectors.DefaultSelector()
    pending = [[] for _ in socks]
    try:
        for r, sock in enumerate(socks):
            sel.register(sock, selectors.EVENT_READ, r)
        ledger, streams = Ledger(senders, clients), Streams(senders)
        settle(sel, socks, pending)
        sent = [0] * senders
        unsent = [b""] * senders  # what send() did not take yet
        measure = Window(server)
        stop_sending = measure.start + seconds
        closed, progress, last_progress = 0, 0, now()
        while now() < stop_sending or now() - last_progress < WAIT:  # WAIT: a silent server
            if ledger.counts["delivered"] != progress:
                progress, last_progress = ledger.counts["delivered"], now()
            sending = now() < stop_sending
            for s in range(senders):
                if unsent[s] or not sending:
                    continue
                room = window - (sent[s] - min(ledger.expected[s]))
                if room >= window // 2:  # send in big batches, not a line at a time
                    data = streams.get(s, sent[s] + room)[sent[s] * WIDTH:(sent[s] + room) * WIDTH]
                    sent[s] += room
                    unsent[s] = data[socks[s].send(data):]
                    if unsent[s]:
                        sel.modify(socks[s], selectors.EVENT_READ | selectors.EVENT_WRITE, s)
            if not sending and all(min(ledger.expected[s]) >= sent[s] for s in range(senders)):
                break  # everything sent has been received everywhere
            for key, mask in sel.select(0.05):
                r = key.data
                if mask & selectors.EVENT_WRITE:
                    unsent[r] = unsent[r][socks[r].send(unsent[r]):]
                    if not unsent[r]:
                        sel.modify(socks[r], selectors.EVENT_READ, r)
                if mask & selectors.EVENT_READ:
                    chunk, open_ = read_chat_lines(key.fileobj, pending[r])
                    if not open_:
                        sel.unregister(key.fileobj)
                        closed += 1
                    elif chunk:
                        check_fanout_chunk(chunk, r, ledger, streams, senders)
        result = measure.close({})
        ledger.count_lost(sent)
        result["deliveries/s"] = ledger.counts["delivered"] / result["seconds"]
        result["lines sent"] = sum(sent)
        result["clients cut off"] = closed
        result["errors"] = ledger.errors(closed)
        return result
    finally:
        sel.close()
        close_all(socks)


def test_latency(server, clients=100, rate=1000, seconds=3.0):
    """Clients take turns to send one line each 1/rate seconds; each line carries its
    send time, and every receipt gives one latency sample. While the test runs we only
    note when each chunk arrived; the lines are checked afterwards, so that our own work
    per line cannot delay the next receipt."""
    socks = connect(server, clients, nodelay=True)
    sel = selectors.DefaultSelector()
    pending = [[] for _ in socks]
    try:
        for r, sock in enumerate(socks):
            sel.register(sock, selectors.EVENT_READ, r)
        settle(sel, socks, pending)
        measure = Window(server)
        start, sent, closed, arrived, chunks = measure.start, 0, 0, 0, []
        total = int(rate * seconds)
        end = start + seconds + WAIT
        while now() < end and arrived < total * (clients - 1):
            due = min(total, int((now() - start) * rate) + 1)
            while sent < due:
                s = sent % clients
                line = b"T%04d %09d %020d\n" % (s, sent // clients, time.monotonic_ns())
                if socks[s].send(line) != len(line):
                    raise RuntimeError("a small send() did not go through whole")
                sent += 1
            # We poll without sleeping, so this test shows us at 100% CPU. Were we to sleep in
            # epoll_wait(), the server's send() would have to wake us, 99 times per line, and
            # on a small VM that wake-up is dear. Clients on other machines cost the server
            # nothing of the kind.
            for key, _ in sel.select(0):
                chunk, open_ = read_chat_lines(key.fileobj, pending[key.data])
                if not open_:
                    sel.unregister(key.fileobj)
                    closed += 1
                elif chunk:
                    chunks.append((key.data, time.monotonic_ns(), chunk))
                    arrived += chunk.count(b"\nT") + chunk.startswith(b"T")  # data lines
        result = measure.close({})
        ledger, samples, across = Ledger(clients, clients), [], []
        for r, when, chunk in chunks:
            for line in chunk.split(b"\n")[:-1]:
                if LATENCY_LINE.fullmatch(line):
                    s = int(line[1:5])
                    ledger.one_line(s, r, int(line[6:15]))
                    if s != r:
                        same = server.server_of(s) == server.server_of(r)
                        (samples if same else across).append(when - int(line[16:]))
                elif not line.startswith((b"* ", b"Welcome", b"#")):
                    ledger.counts["garbled"] += 1
        ledger.count_lost([sent // clients + (s < sent % clients) for s in range(clients)])
        # With several servers: the lines within one server, then those across servers.
        for group, suffix in ((samples, ""), (across, ", across servers")):
            group.sort()
            if group:
                for name, q in (("p50 ms", 0.50), ("p99 ms", 0.99)):
                    result[name + suffix] = group[min(len(group) - 1, int(q * len(group)))] / 1e6
                result["max ms" + suffix] = group[-1] / 1e6
        result["lines sent"] = sent
        result["deliveries"] = ledger.counts["delivered"]
        result["errors"] = ledger.errors(closed)
        return result
    finally:
        sel.close()
        close_all(socks)


def test_hold(server, clients=1000, extra=20):
    """Connect clients + extra, one after another. Each is held (it got the welcome and
    stays) or refused (it got "error: server full", or was just closed). Then one held
    client sends a line, and we count the held clients it reaches."""
    raise_fd_limit(clients + extra + 64)
    socks, sel = [], selectors.DefaultSelector()
    # index in socks -> "held", "refused politely", "refused silently" or "closed after joining"
    state = {}
    pending, failed = [], 0
    try:
        measure = Window(server)
        for _ in range(clients + extra):
            try:
                sock = connect(server, 1)[0]
            except OSError:  # the server's listen queue is full, say
                failed += 1
                continue
            sel.register(sock, selectors.EVENT_READ, len(socks))
            socks.append(sock)
            pending.append([])
        reached = set()

        def drain(done):
            """Read until done() or the server has been silent for a second."""
            end, quiet_since = now() + WAIT, now()
            while not done() and now() < end and now() - quiet_since < 1:
                for key, _ in sel.select(0.05):
                    quiet_since, i = now(), key.data
                    chunk, open_ = read_chat_lines(key.fileobj, pending[i])
                    if b"Welcome to the chatroom!" in chunk:
                        state.setdefault(i, "held")
                    if b"error: server full" in chunk:
                        state[i] = "refused politely"
                    if b"#hello from client" in chunk:
                        reached.add(i)
                    if not open_:
                        state[i] = "closed after joining" if state.get(i) == "held" else \
                            state.get(i, "refused silently")
                        sel.unregister(key.fileobj)

        # A client is held once welcomed. (ncat sends no welcome: for it, a client is held
        # if it is not closed by the time the server has been silent for a second.)
        drain(lambda: len(state) >= len(socks))
        held = [i for i in range(len(socks)) if state.get(i, "held") == "held"]
        if held:
            socks[held[0]].send(b"#hello from client %d\n" % held[0])
            drain(lambda: len(reached) >= len(held) - 1)
        result = measure.close({})
        counts = collections.Counter(state.get(i, "held") for i in range(len(socks)))
        result["clients held"] = len(held)
        result["refused politely"] = counts.get("refused politely", 0)
        result["refused silently"] = counts.get("refused silently", 0)
        if failed:
            result["could not connect"] = failed
        result["one line reached"] = len(reached)
        result["server alive"] = server.alive()
        result["errors"] = {}
        if len(reached) < len(held) - 1:
            result["errors"]["not reached"] = len(held) - 1 - len(reached)
        if counts.get("closed after joining"):
            result["errors"]["closed after joining"] = counts["closed after joining"]
        if not server.alive():
            result["errors"]["server died"] = 1
        return result
    finally:
        sel.close()
        close_all(socks)


# ---------------------------------------------------------------------------------------
# Echo
# ---------------------------------------------------------------------------------------

PATTERN = bytes(range(256)) * (BULK_SIZE // 256 + 1)  # the byte at offset k is k % 256
# bulk's recv_into() buffer. Under 128 KiB, the C library takes it from its heap rather than
# from mmap(): with a 1 MiB buffer from mmap(), this loop ran at two thirds of the speed here.
BULK_BUFFER = bytearray(120 * 1024)


def test_bulk(server, seconds=3.0):
    """One connection: send the pattern flat out, read the echo, check every byte."""
    sock = connect(server, 1)[0]
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    buf = BULK_BUFFER
    view, pattern = memoryview(buf), memoryview(PATTERN)
    sent = received = bad = 0
    try:
        measure = Window(server)
        stop_sending = measure.start + seconds
        while received < sent or now() < stop_sending:
            if now() > stop_sending + WAIT:
                break
            if now() >= stop_sending and sent > received:
                sel.modify(sock, selectors.EVENT_READ)
            for _, mask in sel.select(0.1):
                if mask & selectors.EVENT_WRITE and now() < stop_sending:
                    sent += sock.send(pattern[sent % 256:sent % 256 + BULK_SIZE - 256])
                if mask & selectors.EVENT_READ:
                    n = sock.recv_into(buf)
                    if not n:
                        raise RuntimeError("the echo server closed the connection")
                    # One memcmp() with no copy. (memoryview == memoryview goes item by item.)
                    if not PATTERN.startswith(view[:n], received % 256):
                        bad += 1
                    received += n
        result = measure.close({})
        result["MB/s"] = received / result["seconds"] / 1e6
        result["errors"] = {}
        if bad:
            result["errors"]["corrupt chunks"] = bad
        if received != sent:
            result["errors"]["bytes lost"] = sent - received
        return result
    finally:
        sel.close()
        sock.close()


def test_rtt(server, connections=1, seconds=3.0, size=64, idle=0):
    """Each connection sends size bytes, waits until all of them are back, and again.
    This loop is kept lean (epoll itself, small reads), so that it is not the bottleneck.
    With idle, that many more connections stay open and silent: what they cost a server
    is the price of watching them."""
    raise_fd_limit(connections + idle + 64)
    bystanders = connect(server, idle)
    socks = connect(server, connections, nodelay=True)
    poller = select.epoll() if hasattr(select, "epoll") else None
    by_fd = {sock.fileno(): sock for sock in socks}
    message = b"x" * (size - 1) + b"\n"
    got = dict.fromkeys(by_fd, 0)  # bytes of the current echo back so far, per connection
    trips = bad = 0
    try:
        for fd in by_fd:
            if poller:
                poller.register(fd, select.EPOLLIN)
        measure = Window(server)
        end = measure.start + seconds
        for sock in socks:
            sock.send(message)
        while now() < end:
            ready = poller.poll(0.1) if poller else \
                [(fd, 0) for fd in select.select(list(by_fd), [], [], 0.1)[0]]
            for fd, _ in ready:
                sock = by_fd[fd]
                data = sock.recv(size)
                if len(data) == size and not got[fd]:  # the usual case: all of it at once
                    if data != message:
                        bad += 1
                else:
                    if not data:
                        raise RuntimeError("the echo server closed a connection")
                    if data != message[got[fd]:got[fd] + len(data)]:
                        bad += 1
                    got[fd] += len(data)
                    if got[fd] < size:
                        continue
                    got[fd] = 0
                trips += 1
                sock.send(message)
        result = measure.close({})
        result["round trips/s"] = trips / result["seconds"]
        result["errors"] = {"corrupt replies": bad} if bad else {}
        return result
    finally:
        if poller:
            poller.close()
        close_all(socks + bystanders)


# ---------------------------------------------------------------------------------------
# Running the tests and printing the table
# ---------------------------------------------------------------------------------------

def run_one(test, server, args):
    if test == "fanout":
        result = test_fanout(server, args.clients, args.senders, args.seconds)
    elif test == "latency":
        result = test_latency(server, args.clients, args.rate, args.seconds)
    elif test == "hold":
        result = test_hold(server, args.hold, args.hold_extra)
    elif test == "bulk":
        result = test_bulk(server, args.seconds)
    else:
        result = test_rtt(server, 1 if test == "rtt1" else args.rtt_connections, args.seconds,
                          idle=args.idle)
    rss = server.peak_rss_mb()
    if rss is not None:
        result["server RSS at start MB"] = server.start_rss_mb
        result["server peak RSS MB"] = rss
    return result


HEADLINE = {"fanout": "deliveries/s", "latency": "p50 ms", "hold": "one line reached",
            "bulk": "MB/s", "rtt1": "round trips/s", "rtt50": "round trips/s"}


def median_run(test, rounds):
    """With --repeat, the round whose headline figure is the median, with every error seen."""
    ranked = sorted(rounds, key=lambda result: result.get(HEADLINE[test], -1))
    result = dict(ranked[len(ranked) // 2])
    result["errors"] = {}
    for other in rounds:
        for error, count in other["errors"].items():
            result["errors"][error] = result["errors"].get(error, 0) + count
    if len(rounds) > 1:
        result["rounds"] = len(rounds)
    return result


def fmt(value):
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def describe(test, args):
    idle = f", and {args.idle} idle ones" if args.idle else ""
    return {"fanout": f"{args.clients} clients, {args.senders} sending flat out",
            "latency": f"{args.clients} clients, {args.rate} lines/s in all",
            "hold": f"{args.hold} clients, and {args.hold_extra} more",
            "bulk": "1 connection",
            "rtt1": "64-byte round trips, 1 connection" + idle,
            "rtt50": f"64-byte round trips, {args.rtt_connections} connections" + idle}[test]


def print_table(test, results, args):
    names = list(results)
    rows = []
    for result in results.values():
        rows += [k for k in result if k not in rows and k != "errors"]
    rows.append("errors")
    width = max(len(r) for r in rows) + 2
    cols = [max(14, len(n) + 2) for n in names]
    print(f"\n{test}: {describe(test, args)}")
    print("".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cols)))
    for row in rows:
        cells = []
        for name, c in zip(names, cols):
            value = results[name].get(row, "")
            if row == "errors":
                value = "none" if not value else ", ".join(f"{v} {k}" for k, v in value.items())
            cells.append(fmt(value).rjust(c) if value != "" else "".rjust(c))
        print(f"  {row}".ljust(width) + "".join(cells))


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def tls_server():
    """Step 6: (a command that starts chat_server.py over TLS, the clients' TLS context).
    The certificate and key are made now, in a folder that is removed when we exit."""
    import atexit
    import tempfile
    global tls_layer
    sys.path.insert(0, ROOT)
    import tls_layer
    folder = tempfile.mkdtemp(prefix="loadtest.")
    atexit.register(shutil.rmtree, folder)
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", key, "-out", cert, "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-addext",
                    "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
    command = (f"{PY} {shlex.quote(os.path.join(ROOT, 'chat_server.py'))} --port {{port}} "
               f"--tls {shlex.quote(cert)} {shlex.quote(key)}")
    return command, tls_layer.client_context(cert)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chat", action="append", metavar="CMD",
                        help="a command that starts a chat server on {port}; may be repeated "
                             "(default: chat_server.py and bench/asyncio_chat_server.py)")
    parser.add_argument("--echo", action="append", metavar="CMD",
                        help="the same for echo servers (default: echo_server.py and "
                             "bench/asyncio_echo_server.py)")
    parser.add_argument("--connect", metavar="HOST:PORT",
                        help="test a server that is already running instead (one kind: see --only)")
    parser.add_argument("--pid", type=int, help="with --connect: the server's PID, to read its CPU and RSS")
    parser.add_argument("--only", default=",".join(CHAT_TESTS + ECHO_TESTS),
                        help="comma-separated tests to run (default: all)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each timed test (default: 3)")
    parser.add_argument("--clients", type=int, default=100,
                        help="chat clients in fanout and latency (default: 100)")
    parser.add_argument("--senders", type=int, default=10, help="clients that send in fanout (default: 10)")
    parser.add_argument("--rate", type=int, default=1000, help="lines per second in latency (default: 1000)")
    parser.add_argument("--hold", type=int, default=1000, help="clients to hold in hold (default: 1000)")
    parser.add_argument("--hold-extra", type=int, default=20, help="clients beyond that (default: 20)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of each test, taking turns between servers; the table "
                             "shows the median round (default: 1)")
    parser.add_argument("--rtt-connections", type=int, default=50, help="connections in rtt50 (default: 50)")
    parser.add_argument("--idle", type=int, default=0,
                        help="in rtt1 and rtt50: connections that stay open and silent meanwhile "
                             "(default: 0)")
    parser.add_argument("--tls", action="store_true",
                        help="in fanout and latency, add a column for chat_server.py over TLS "
                             "(step 6), with a throwaway certificate that openssl makes")
    parser.add_argument("--cluster", type=int, default=0, metavar="N",
                        help="in the chat tests, add N chat_server.py linked through one "
                             "nats-server (step 5), after the other chat servers (default: none)")
    args = parser.parse_args(argv)
    tests = [t for t in args.only.split(",") if t]
    unknown = set(tests) - set(CHAT_TESTS + ECHO_TESTS)
    if unknown:
        parser.error(f"unknown test: {', '.join(sorted(unknown))}")
    if min(args.seconds, args.clients, args.senders, args.rate, args.hold, args.rtt_connections,
           args.repeat) <= 0:
        parser.error("sizes and --seconds must be positive")
    if args.clients < 2:
        parser.error("--clients must be at least 2")

    if args.connect:
        host, _, port = args.connect.rpartition(":")
        if not host or not port.isdigit():
            parser.error("--connect takes HOST:PORT")
        targets = {"chat": [None], "echo": [None]}
    else:
        targets = {"chat": args.chat or DEFAULT_CHAT, "echo": args.echo or DEFAULT_ECHO}
    nats = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
    if args.cluster:
        if args.cluster < 2 or args.connect:
            parser.error("--cluster takes 2 or more servers, and not --connect")
        if not nats:
            parser.error("--cluster needs nats-server (Debian: apt install nats-server)")
        targets["chat"] = targets["chat"] + [None]  # None: the cluster
    tls_command = tls_context = None
    if args.tls:
        if args.connect or not shutil.which("openssl"):
            parser.error("--tls needs openssl (Debian: apt install openssl), and not --connect")
        tls_command, tls_context = tls_server()
        targets["chat"] = targets["chat"] + [tls_command]

    print(f"loadtest on {machine()}")
    failed = False
    for test in tests:
        runs = {}  # server name -> one result per round
        for _ in range(args.repeat):
            for cmd in targets["chat" if test in CHAT_TESTS else "echo"]:
                tls = args.tls and cmd == tls_command
                if tls and test not in ("fanout", "latency"):
                    continue
                name = label(cmd) + " --tls" if tls else label(cmd) if cmd else \
                    args.connect or f"{args.cluster} linked by NATS"
                try:
                    if args.connect:
                        server = Server(addr=(host.strip("[]"), int(port)), pid=args.pid)
                    elif cmd is None:
                        server = Cluster(args.cluster, nats)
                    else:
                        server = Server(cmd, tls=tls_context if tls else None)
                    with server:
                        result = run_one(test, server, args)
                except (OSError, RuntimeError) as err:
                    result = {"errors": {f"failed: {err}": 1}}
                runs.setdefault(name, []).append(result)
        results = {name: median_run(test, rounds) for name, rounds in runs.items()}
        failed = failed or any(result["errors"] for result in results.values())
        print_table(test, results, args)
    if failed:
        print("\nSOMETHING WENT WRONG: see the errors rows above.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
