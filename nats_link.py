"""Step 5: several chat servers, one room, through a NATS server.

Run it:      /usr/sbin/nats-server -a 127.0.0.1 -p 4222      (Debian: apt install nats-server)
             python chat_server.py --port 7001 --nats localhost:4222
             python chat_server.py --port 7002 --nats localhost:4222

chat_server.py loads this module only for --nats and calls join() with what it needs: its
Server, its broadcast() (the link relays what it gets to our clients with itself as the
sender, so nothing goes back to NATS), its log, and the room's rules. Each
server publishes what its clients say on the subject "chatroom", and relays to its own
clients what the others publish. The link is one more socket in the same select() loop:
serve() calls add_sockets() before select() and serve_ready() after it, broadcast() calls
publish(), and room_is_waiting() asks behind().

Read first: the class NatsLink, in the order one turn meets it, down to "The fine print".
NATS speaks lines of text. It greets us with INFO {...}; we answer CONNECT {...} ("echo":
false: it never hands us back our own lines), SUB chatroom 1, and PING, and its PONG says
we are in. We send PUB chatroom N, then N bytes; the others' lines come to us as MSG
chatroom 1 N, then N bytes (handle_input()). NATS sends PING now and then; we answer PONG.

A peer server is as untrusted as a client: anyone who can publish on the subject is one.
What comes from NATS gets a client's rules: whole lines only, each within the line limit,
payloads within our own cap (whatever NATS's INFO claims), and no reading while the room
waits for a reader. A link that holds the room back is dropped like a slow reader (by
check_health(), with the reader's stall budget), and made again. A MSG over our cap drops
the link (it is made again at once), so a peer can cost us that reconnect, not memory.
Connecting never waits either: connect_ex() starts it, and select() says when it is done.
Left out: TLS to NATS, JetStream (core NATS delivers at most once: lines sent while the
link is down are lost), and a count of the whole room (each server counts its own).
What a real link needs besides the lesson comes after the line "The fine print".
"""
import errno
import json
import os
import re
import socket
import sys
import time
import unicodedata
import urllib.parse

SUBJECT = "chatroom"        # where the linked servers publish their lines
# Our cap on one message, both ways: with its MSG line it fits in one read (RECV_SIZE, 64 KiB),
# and the link never holds more than that (see read_from_nats()). So one turn relays 64 KiB
# at most, and only in a turn that has not filled any reader (see the room's broadcast()):
# no reader is then pushed past the 256 KiB that gets it dropped. A MSG announcing more is
# refused before it is read.
MAX_PAYLOAD = 60 * 1024
RETRY_MIN, RETRY_MAX = 0.25, 2.0  # seconds between tries to link again, doubling
PING_EVERY = 5.0            # seconds between our PINGs: two unanswered, the link is dropped
PROTOCOL_LINE_LIMIT = 16 * 1024  # no line of NATS's protocol (INFO included) is longer


class NatsLink:
    """Our room's link to the other servers' rooms: one TCP connection to NATS."""

    def __init__(self, address, server_name, rules, log, relay, turn_is_full):
        self.host, self.port, self.credentials = address
        self.where = format_addr(self.host, self.port)  # never the credentials: the log shows it
        self.server_name = server_name  # in our notices: "3 online on host:7007"
        self.rules, self.log, self.relay = rules, log, relay
        self.turn_is_full = turn_is_full  # True once a reader is one read from being dropped
        self.sock = None
        self.state = "down"             # "connecting", "greeting" (until PONG), "up"
        self.inbuf = bytearray()        # from NATS: the start of a line or of a MSG's payload
        self.outbuf = bytearray()       # to NATS, not taken by the kernel yet
        self.since = time.monotonic()   # when the state last changed
        self.retry_in = RETRY_MIN
        self.max_payload = MAX_PAYLOAD  # the smaller of ours and NATS's (INFO says)
        self.pings = 0                  # PINGs of ours not answered yet
        self.stalled = 0.0              # seconds of stall budget spent, as for a reader
        self.taken = 0                  # bytes NATS took this turn
        self.waited_for = False         # whether the room waits for us this turn
        self.last_turn = time.monotonic()
        self.lost_at = None             # when the link went down, while it is down
        self.why = ""                   # why it last went down
        self.introduced = False         # whether we sent CONNECT on this connection
        self.spare = socket.socket()    # keeps a low descriptor for the next socket of ours, one
                                        # select() can watch: see reserve_descriptor()

    def add_sockets(self, want_read, want_write, room_is_waiting):
        """Add our socket to what select() watches, or start a connection when it is time.
        Like a client, we are not read while the room waits for a reader."""
        if self.state == "down" and time.monotonic() >= self.since + self.retry_in:
            start_connecting(self)
        self.waited_for = self.behind()
        if self.state == "connecting":
            want_write.append(self.sock)  # writable: the connection is made, or has failed
        elif self.state != "down":
            if not room_is_waiting:
                want_read.append(self.sock)
            if self.outbuf:
                want_write.append(self.sock)

    def behind(self):
        """True while we hold the room back: more than BEHIND bytes NATS has not taken."""
        return self.state == "up" and len(self.outbuf) > self.rules["BEHIND"]

    def serve_ready(self, readable, writable):
        """One turn of the loop for the link: connect, read (read_from_nats(): one recv(),
        then handle_input()), write, and check its health (check_health(): the stall budget
        of a reader, as chat_server.py's drop_slow_readers() keeps it, and PINGs)."""
        now = time.monotonic()
        if self.state == "connecting":
            finish_connecting(self, self.sock in writable)
        if self.state in ("greeting", "up") and self.sock in readable and not self.turn_is_full():
            read_from_nats(self)  # (like a client: not in a turn that has filled a reader)
        if self.state in ("greeting", "up") and self.outbuf:
            write_to_nats(self)
        limit = self.rules["GREETING_TIMEOUT"]  # for all of connect, INFO and PONG
        if self.state in ("connecting", "greeting") and now - self.since > limit:
            drop_link(self, f"no greeting in {limit:g} s")
        if self.state == "up":
            check_health(self, now)
        self.last_turn = now

    def publish(self, data, sender=None):
        """Queue data (whole lines) for the other servers, in messages of max_payload at
        most, cut at line ends; not what came from them. While the link is down, nothing."""
        if self.state != "up" or sender is self:
            return
        if data.startswith(b"* ") and data.endswith(b" online)\n"):  # our notice: whose count?
            data = data[:-2] + f" on {self.server_name})\n".encode()  # "(3 online on host:7007)"
        start = 0
        while start < len(data):
            end = start + self.max_payload
            if end < len(data):
                end = data.rfind(b"\n", start, end) + 1
                if end <= start:  # no line end in sight (cannot be: our lines are short)
                    end = data.find(b"\n", start) + 1 or len(data)
            chunk = data[start:end]
            self.outbuf += b"PUB %s %d\r\n%s\r\n" % (SUBJECT.encode(), len(chunk), chunk)
            start = end

    def handle_input(self):
        """Act on every complete line NATS sent. A MSG's payload goes to our clients, as
        whole lines only, each within the line limit. False if the link was dropped."""
        while True:
            end = self.inbuf.find(b"\r\n")
            if end < 0:
                if len(self.inbuf) > PROTOCOL_LINE_LIMIT:
                    return drop_link(self, "NATS sent a line too long")
                return True
            words = bytes(self.inbuf[:end]).split()
            op = words[0].upper() if words else b""
            if op == b"MSG":  # MSG chatroom 1 N, then N bytes and \r\n
                size = int(words[-1]) if words[-1].isdigit() else -1
                if len(words) not in (4, 5) or not 0 <= size <= MAX_PAYLOAD:
                    # Refused before its bytes are read: a peer cannot grow our memory.
                    return drop_link(self, f"NATS sent a bad MSG line: {shown(self.inbuf[:end])}")
                if len(self.inbuf) < end + 2 + size + 2:
                    return True  # the rest of the payload is still on its way
                payload = bytes(self.inbuf[end + 2:end + 2 + size])
                del self.inbuf[:end + 2 + size + 2]
                self.relay(self.whole_lines(payload), self)  # we are its sender: not back to NATS
                continue
            line = bytes(self.inbuf[:end])
            del self.inbuf[:end + 2]
            if not obey(self, op, line):
                return False

    def whole_lines(self, payload):
        """The payload's lines that a client could have sent: whole (ending in "\\n") and
        within LINE_LIMIT. A tail without "\\n" is dropped, never glued to the next
        payload; so is a line too long, not even cut short. What we drop is logged."""
        end = payload.rfind(b"\n") + 1
        lines, tail, limit = payload[:end], payload[end:], self.rules["LINE_LIMIT"]
        if tail:
            self.log(f"NATS at {self.where}: dropped a line without its end")
        if not no_line_longer_than(lines, limit):  # rare: then we take the payload apart
            kept = [line for line in lines.split(b"\n")[:-1] if len(line) <= limit]
            lines = b"".join(line + b"\n" for line in kept)
            self.log(f"NATS at {self.where}: dropped a line over {limit} bytes")
        return lines


# The fine print ------------------------------------------------------------------------
# What a real link needs besides the lesson: the greeting, checked; credentials; a retry
# with back-off; PINGs; a descriptor select() can watch; and logging what NATS says
# harmlessly.


def join(server, rules, broadcast, log):
    """Link server's room (chat_server.py's Server) to NATS at server.settings.nats (--nats),
    now, waiting for the greeting (--handshake-timeout at most): the server does not start
    without its link. Returns server once linked; None after saying on stderr why not."""
    address = server.settings.nats
    try:
        host, port, credentials = parse_address(address)
    except ValueError as err:  # (what is before an "@" may be a secret: not shown)
        print(f"error: --nats {shown(re.sub(r'//[^/]*@', '//...@', address))}: {err}",
              file=sys.stderr)
        return None
    name = f"{socket.gethostname()}:{server.listener.getsockname()[1]}"
    rules = dict(rules, STALL_BUDGET=server.settings.stall_budget,  # the command line's
                 GREETING_TIMEOUT=server.settings.handshake_timeout)
    peer = NatsLink((host, port, credentials), name, rules, log,
                    relay=lambda data, sender: broadcast(data, server, sender),
                    turn_is_full=lambda: server.turn_is_full)
    try:
        greet_now(peer)
    except (socket.gaierror, UnicodeError):
        print(f"error: cannot resolve NATS host {shown(host)!r}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: cannot link to NATS at {peer.where}: connection refused "
              "(is nats-server running?)", file=sys.stderr)
    except socket.timeout:
        print(f"error: cannot link to NATS at {peer.where}: no greeting in "
              f"{rules['GREETING_TIMEOUT']:g} s (is it a NATS server?)", file=sys.stderr)
    except OSError as err:
        print(f"error: cannot link to NATS at {peer.where}: {describe(err)}", file=sys.stderr)
    else:
        server.extras.append(peer)
        log(f"linked to NATS at {peer.where}, as {peer.server_name}")
        return server
    return None


def parse_address(address):
    """HOST:PORT, or NATS's URL form: nats://HOST:PORT, nats://USER:PASSWORD@HOST:PORT,
    nats://TOKEN@HOST:PORT. With none in the URL, the credentials come from the
    environment, as for NATS's own tools: NATS_USER and NATS_PASSWORD, or NATS_TOKEN.
    (There they stay off the command line, where ps would show them.)"""
    if not address.isprintable() or not address.isascii():
        raise ValueError("must be HOST:PORT or nats://[USER:PASSWORD@]HOST:PORT")
    url = urllib.parse.urlsplit(address if "://" in address else "nats://" + address)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme != "nats" or not url.hostname or not port or url.path not in ("", "/"):
        raise ValueError("must be HOST:PORT or nats://[USER:PASSWORD@]HOST:PORT, "
                         "such as localhost:4222")
    user = urllib.parse.unquote(url.username or "")
    password = urllib.parse.unquote(url.password or "")
    if user and url.password is not None:
        credentials = {"user": user, "pass": password}
    elif user:
        credentials = {"auth_token": user}
    elif os.environ.get("NATS_TOKEN"):
        credentials = {"auth_token": os.environ["NATS_TOKEN"]}
    elif os.environ.get("NATS_USER"):
        credentials = {"user": os.environ["NATS_USER"],
                       "pass": os.environ.get("NATS_PASSWORD", "")}
    else:
        credentials = {}
    return url.hostname, port, credentials



def greet_now(link):
    """At start: connect and greet, waiting, within --handshake-timeout in all; or raise
    OSError (socket.timeout, ConnectionRefusedError, ...) saying why."""
    deadline = time.monotonic() + link.rules["GREETING_TIMEOUT"]
    reserve_descriptor(link, False)
    link.sock = socket.create_connection((link.host, link.port),
                                         timeout=link.rules["GREETING_TIMEOUT"])
    link.state, link.introduced = "greeting", False
    while link.state == "greeting":
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        link.sock.settimeout(left)  # one deadline for the whole greeting, not per recv()
        data = link.sock.recv(link.rules["RECV_SIZE"])
        if not data:
            raise OSError("it closed the connection")
        link.inbuf += data
        if not link.handle_input():
            raise OSError(link.why)
        link.sock.sendall(link.outbuf)
        link.outbuf.clear()
    link.sock.setblocking(False)

def start_connecting(link):
    """Connect without waiting: select() says when the connection is made."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            link.host, link.port, type=socket.SOCK_STREAM)[0]
        reserve_descriptor(link, False)
        link.sock = socket.socket(family, kind, proto)
        link.sock.setblocking(False)
        err = link.sock.connect_ex(addr)
    except (OSError, UnicodeError) as exc:  # EMFILE, the resolver: try again later
        link.sock = link.sock or socket.socket()
        link.state = "connecting"
        return drop_link(link, f"cannot connect: {describe(exc)}")
    link.state, link.since, link.introduced = "connecting", time.monotonic(), False
    if err not in (0, errno_in_progress()):
        drop_link(link, describe(OSError(err, os.strerror(err))))

def finish_connecting(link, writable):
    # Writable: connected, or failed. (Windows tells a failure in select()'s third
    # list, which we do not use: so we ask each turn.)
    err = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        drop_link(link, describe(OSError(err, os.strerror(err))))
    elif writable:
        link.state = "greeting"  # (since: still when we began to connect, one deadline for all)

def read_from_nats(link):
    """One read, of what makes inbuf one read's worth (RECV_SIZE) at most: see MAX_PAYLOAD."""
    try:
        data = link.sock.recv(max(1, link.rules["RECV_SIZE"] - len(link.inbuf)))
    except BlockingIOError:
        return
    except OSError as err:
        return drop_link(link, describe(err))
    if not data:
        return drop_link(link, "NATS closed the connection")
    link.inbuf += data
    link.handle_input()

def write_to_nats(link):
    try:
        sent = link.sock.send(link.outbuf)
    except BlockingIOError:
        return
    except OSError as err:
        return drop_link(link, describe(err))
    del link.outbuf[:sent]
    link.taken += sent

def obey(link, op, line):
    """A protocol line that is not a MSG. False if the link was dropped."""
    if op == b"PING":
        link.outbuf += b"PONG\r\n"
    elif op == b"PONG":
        link.pings = 0
        if link.state == "greeting":
            if not link.introduced:
                return drop_link(link, "NATS answered before its INFO")
            link_up(link)
    elif op == b"INFO":
        return read_info(link, line[4:])
    elif op == b"-ERR":
        said = shown(line[4:].strip())
        if link.state == "greeting" and b"authoriz" in line.lower():
            return drop_link(link, f"authorization failed: NATS refused our credentials ({said})")
        link.log(f"NATS at {link.where} says: {said}")
        if link.state == "greeting":
            return drop_link(link, said.strip("'").lower())
    elif op not in (b"+OK",):
        return drop_link(link, f"NATS sent what NATS does not send: {shown(line)}")
    return True

def read_info(link, text):
    """NATS's INFO: its limits, checked. The first one is our cue to say who we are."""
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        info = None
    size = info.get("max_payload", MAX_PAYLOAD) if isinstance(info, dict) else None
    if type(size) is not int or size < 1:  # a JSON object, with a whole number
        return drop_link(link, f"NATS sent a bad INFO: {shown(text[:200].strip())}")
    link.max_payload = min(size, MAX_PAYLOAD)
    if link.state == "greeting" and not link.introduced:
        link.introduced = True
        options = {"verbose": False, "pedantic": False, "echo": False, "protocol": 1,
                   "name": f"chat_server.py {link.server_name}", **link.credentials}
        link.outbuf += (f"CONNECT {json.dumps(options)}\r\nSUB {SUBJECT} 1\r\n"
                        "PING\r\n").encode()
    return True

def link_up(link):
    link.state, link.since, link.retry_in = "up", time.monotonic(), RETRY_MIN
    link.next_ping = link.since + PING_EVERY
    if link.lost_at is not None:
        link.log(f"NATS link to {link.where} is back after {link.since - link.lost_at:.1f} s")
        link.lost_at = None

def check_health(link, now):
    """The stall budget of a reader (chat_server.py's drop_slow_readers()), and PINGs."""
    waited = now - link.last_turn
    if link.waited_for:  # as for a reader: what NATS did not pay for by reading is charged
        link.stalled += max(0.0, waited - link.taken * link.rules["PAYBACK"])
    else:
        link.stalled = max(0.0, link.stalled - waited * link.rules["REFILL"])
    link.taken = 0
    if link.stalled > link.rules["STALL_BUDGET"]:
        return drop_link(link, f"it held the room back for {link.rules['STALL_BUDGET']:g} s")
    if now >= link.next_ping:
        if link.pings >= 2:
            return drop_link(link, f"no answer to PING in {2 * PING_EVERY:g} s")
        link.outbuf += b"PING\r\n"
        link.pings += 1
        link.next_ping = now + PING_EVERY

def drop_link(link, why):
    """Close the connection; link again after a wait that doubles each time it fails."""
    now = time.monotonic()
    if link.state == "up":
        link.log(f"NATS link to {link.where} lost: {why}; lines do not cross until it is back")
        link.lost_at, link.retry_in = now, RETRY_MIN
    else:  # a try that failed: say why, once per try, and wait longer before the next
        if link.lost_at is not None and link.why != why:  # (at start, main() says why)
            link.log(f"NATS link to {link.where}: {why}; trying again in {link.retry_in:g} s")
        link.retry_in = min(link.retry_in * 2, RETRY_MAX)
    if link.sock:
        link.sock.close()
        reserve_descriptor(link, True)
    link.sock, link.state, link.since, link.why = None, "down", now, why
    link.inbuf.clear()
    link.outbuf.clear()
    link.pings, link.stalled = 0, 0.0
    return False

def reserve_descriptor(link, keep):
    """select() cannot watch a descriptor of FD_SETSIZE or more. While the link is
    down we hold a spare one, taken right after the link's socket is closed, so it
    has a number select() can watch; we give it back just before we make the next
    socket, which then gets that number (or a lower one)."""
    if keep and link.spare is None:
        try:
            link.spare = socket.socket()
        except OSError:
            link.spare = None
    elif not keep and link.spare is not None:
        link.spare.close()
        link.spare = None

def no_line_longer_than(data, limit):
    """True if no line of data (which ends in "\\n") is longer than limit bytes. Mostly in
    C, for speed: a line over limit would hold a whole window of limit // 2 bytes, counted
    from the start, with no "\\n" in it; so we look for "\\n" in each such window."""
    half = limit // 2
    if all(data.find(b"\n", start, start + half) >= 0 for start in range(0, len(data), half)):
        return True
    return max(map(len, data.split(b"\n"))) <= limit


def errno_in_progress():
    return errno.WSAEWOULDBLOCK if os.name == "nt" else errno.EINPROGRESS


def format_addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(err):
    """An OSError in a few lower-case words: "connection refused"."""
    strerror = getattr(err, "strerror", None)
    return shown(strerror.lower() if strerror else str(err))


def shown(text):
    """Text from NATS (or the command line) made harmless for the log, by the rule the
    clients use: control and format characters, line separators and invisible fillers
    are shown as \\xNN or \\uNNNN escapes, so nobody can forge a log line or hide text."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    return "".join(escape(c) if invisible(c) else c for c in text)


def escape(char):
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def invisible(char):
    return (unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
            or char in "\u034f\u115f\u1160\u3164\uffa0")
