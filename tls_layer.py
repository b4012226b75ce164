"""Step 6: the room over TLS, with every rule of the room as it was.

Run it:      openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \\
               -keyout key.pem -out cert.pem -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \\
               -addext "basicConstraints=critical,CA:TRUE"
             python chat_server.py --tls cert.pem key.pem
             python chat_client.py --tls cert.pem      (it trusts cert.pem, and nothing else)

chat_server.py loads this module only for --tls, and so does chat_client.py. TLS is a
transform on bytes: ciphertext on the wire, plaintext in the program. So the socket stays
a plain non-blocking socket in the same select() loop, and a TlsSocket stands in for it:
recv() returns plaintext, send() takes plaintext. Everything else in steps 1 to 4 (outbuf,
partial sends, the line and output caps, the flood rule, the stall budget) keeps its
meaning, because it still counts plaintext: the lessons do not change.

Read first: TlsSocket, then TlsListener, down to "The fine print". Inside, an ssl.SSLObject
does the cryptography between two memory buffers (ssl.MemoryBIO): what recv() brings goes
into `incoming`, and plaintext comes out; plaintext goes in, and we send what `outgoing`
then holds. asyncio does TLS this way too. It avoids the traps of a non-blocking
ssl.SSLSocket under select(): its SSLWantReadError is an OSError but no BlockingIOError
(the loop would drop a healthy client); a read may need a write; plaintext that OpenSSL
holds is invisible to select(); a retried send() must pass the same bytes; and shutdown()
drops TLS without a word.

Who is trusted. The client checks the server's certificate against the file it is given,
host name included, and has no switch to turn that off: a client that does not check can
be fooled by anyone on the way, who then reads and changes every line. The server asks
no certificate of clients: anyone may join, as in plain mode, but no one on the way can
read or change a line. Nothing reaches a client before its handshake is done, not even
"server full" (a refused connection is just closed). A handshake holds a seat, so it must
be done within --handshake-timeout (5 s), or the connection is dropped; so is one not
TLS at all (a plain client), and the room goes on.
Other clients that check the server chat too: `openssl s_client -quiet -verify_return_error
-CAfile cert.pem -connect localhost:7007`, `ncat --ssl --ssl-verify --ssl-trustfile cert.pem
localhost 7007` (without --ssl-verify, ncat checks nothing: the wrong reflex to learn).
Left out: client certificates, reloading the certificate, session resumption.
"""
import ssl
import sys
import time

RECORD = 16 * 1024          # plaintext encrypted per send(): one TLS record at most
RECV_SIZE = 64 * 1024       # ciphertext taken per recv() during a handshake
UNSENT_LIMIT = 64 * 1024    # TLS's own messages a peer leaves unread: past this, it is dropped
ACCEPT_BATCH = 16           # connections accepted per accept() at most


class TlsSocket:
    """A plain non-blocking socket that speaks TLS. It has what the loops use of a socket:
    fileno() for select(), recv(), send(), setblocking(), shutdown() and close()."""

    def __init__(self, sock, tls, incoming, outgoing):  # made by wrap()
        self.sock = sock            # the plain socket: ciphertext goes through it
        self.tls = tls              # an ssl.SSLObject between the two buffers
        self.incoming, self.outgoing = incoming, outgoing
        self.unsent = bytearray()   # ciphertext the kernel has not taken yet
        self.ahead = 0              # plaintext that unsent stands for: see send()
        self.peer_closed = False    # its close_notify (or its end) came with the last plaintext
        self.on_peer_closed = None  # the server wants to know: see TlsListener.serve_ready()

    def fileno(self):
        return self.sock.fileno()

    def recv(self, size):
        """Plaintext from one recv() of the socket. If that brought none (half a record, or
        a handshake message), BlockingIOError, as from a socket with nothing to read; b""
        once the peer has closed. A TLS error is an OSError (ssl.SSLError): the loop drops."""
        if self.peer_closed:
            return b""
        data = self.sock.recv(size)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        plaintext = read_plaintext(self)  # all of it: what OpenSSL keeps, select() cannot see
        send_now(self)  # whatever reading made TLS say (an alert, a key update)
        if len(self.unsent) > UNSENT_LIMIT:  # a peer that asks for answers it never reads
            raise ConnectionError("TLS messages pile up unread")
        if not data:
            self.peer_closed = True
        if plaintext:
            if self.peer_closed and self.on_peer_closed:
                self.on_peer_closed(self)  # its lines first, then it leaves
            return plaintext
        if self.peer_closed:
            return b""
        raise BlockingIOError("no plaintext yet")

    def send(self, data):
        """Send from data, the caller's plaintext (its outbuf); return how much of it is done.
        One record at a time is encrypted into unsent, and counted as done only once the
        kernel has taken all of it. So the caller keeps it until then: its outbuf stays
        non-empty, the loop keeps watching for writability, and a leaver is not closed too
        soon. The caller passes the same bytes again, as outbuf does."""
        if self.unsent:
            sent = self.sock.send(self.unsent)  # BlockingIOError and OSError go up
            del self.unsent[:sent]
            if self.unsent:
                return 0  # progress, but nothing done yet
        if self.ahead or not data:
            done, self.ahead = self.ahead, 0
            return done
        chunk = data[:RECORD]
        self.tls.write(chunk)
        self.unsent += self.outgoing.read()
        self.ahead = len(chunk)
        return self.send(data)

    def setblocking(self, flag):
        self.sock.setblocking(flag)

    def setsockopt(self, *option):
        self.sock.setsockopt(*option)

    def shutdown(self, how):
        """A half-close: our close_notify first, then the socket's own."""
        say_goodbye(self)
        self.sock.shutdown(how)

    def close(self):
        say_goodbye(self)
        self.sock.close()


class TlsListener:
    """The server's side. It stands in for the listening socket: select() watches it, and
    accept() returns only connections whose handshake is done, as (TlsSocket, address).
    Until then a new connection waits here, out of the room: no welcome, no notice. It is
    also one more part of the server's loop, like step 5's link: serve() asks it for the
    sockets it is shaking hands on before select() (add_sockets()), and hands it what is
    ready after (serve_ready())."""

    def __init__(self, listener, context, server, admit, read, seat_free, log):
        self.listener = listener    # the plain listening socket
        self.context, self.server = context, server
        self.admit = admit          # chat_server.py's accept_clients(): it calls accept()
        self.read = read            # its read_from(), for a leaver whose goodbye came early
        self.seat_free, self.log = seat_free, log
        self.handshaking = {}       # plain socket -> [TlsSocket, address, deadline]
        self.ready = []             # (TlsSocket, address): handshake done, not yet accepted
        self.leaving = []           # TlsSockets whose close_notify came with their last lines

    def fileno(self):  # readable: connections are waiting at the listener
        return self.listener.fileno()

    def accept(self):
        """A connection whose handshake is done; BlockingIOError if none is. Those waiting
        at the listener start their handshake here, each one that has a seat."""
        start_handshakes(self)
        if not self.ready:
            raise BlockingIOError("no TLS handshake done yet")
        return self.ready.pop(0)

    def add_sockets(self, want_read, want_write, room_waits):
        for sock, (tls, _, _) in self.handshaking.items():
            want_read.append(sock)
            if tls.unsent:
                want_write.append(sock)

    def serve_ready(self, readable, writable):
        now = time.monotonic()
        for sock, (tls, addr, deadline) in list(self.handshaking.items()):
            if now > deadline:  # one deadline, however it drips its bytes in
                limit = self.server.settings.handshake_timeout
                drop_unjoined(self, sock, addr, f"no TLS handshake in {limit:g} s")
            elif sock in readable or sock in writable:
                handshake_step(self, sock, tls, addr)  # done: into self.ready
        if self.ready:
            self.admit(self.server)
        while self.leaving:  # its recv() now returns b"": it leaves
            client = self.server.clients.get(self.leaving.pop())
            if client:
                self.read(client, self.server)

    def behind(self):  # what the loop asks of step 5's link: we hold no lines back
        return False

    def publish(self, data, sender=None):  # nor do we pass lines on
        pass

    def getsockname(self):
        return self.listener.getsockname()


# The fine print ------------------------------------------------------------------------
# What a real TLS layer needs besides the lesson: the handshake, step by step, on both
# sides; telling a plain client from a TLS one; the ends of a connection; and errors that
# say what went wrong.


def wrap(sock, context, server_side, hostname=None):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=hostname)
    return TlsSocket(sock, tls, incoming, outgoing)


def read_plaintext(tls):
    """All the plaintext that incoming holds now. Notes the peer's close_notify, and its end
    without one (SSLEOFError on Python 3.10 and later; a plain b"" on 3.9)."""
    plaintext = bytearray()
    try:
        while True:
            chunk = tls.tls.read(RECV_SIZE)
            if not chunk:
                tls.peer_closed = True
                break
            plaintext += chunk
    except ssl.SSLWantReadError:
        pass  # it needs more ciphertext
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        tls.peer_closed = True
    return bytes(plaintext)


def send_now(tls):
    """Send what TLS has to say now, as far as the kernel takes it; the rest waits."""
    tls.unsent += tls.outgoing.read()
    if tls.unsent:
        try:
            del tls.unsent[:tls.sock.send(tls.unsent)]
        except OSError:  # BlockingIOError: later; any other: the next recv() or send() says
            pass


def say_goodbye(tls):
    """Our close_notify, and what is unsent, as far as the kernel takes it now."""
    try:
        tls.tls.unwrap()  # queues close_notify; the peer's may never come: we do not wait
    except (ssl.SSLError, ValueError):
        pass
    send_now(tls)


def start_handshakes(door):
    """Take the connections waiting at the listener: each with a seat starts its handshake,
    with --handshake-timeout to finish it; one without is closed, without a word."""
    for _ in range(ACCEPT_BATCH):
        try:
            sock, addr = door.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError:  # EMFILE: the server pauses accept() if no handshake is done
            if door.ready:
                return
            raise
        server = door.server
        if (len(server.clients) + len(door.handshaking) >= server.settings.max_clients
                or not door.seat_free(sock, server)):
            door.log(f"{format_addr(addr)} refused: server full (not a word before a handshake)")
            sock.close()
            continue
        sock.setblocking(False)
        tls = wrap(sock, door.context, server_side=True)
        tls.on_peer_closed = door.leaving.append
        deadline = time.monotonic() + server.settings.handshake_timeout
        door.handshaking[sock] = [tls, addr, deadline]


def handshake_step(door, sock, tls, addr):
    """One step of a server-side handshake, when its socket is ready."""
    try:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            data = None  # only writable: send what is waiting
        if data == b"":
            raise ConnectionError("closed during the TLS handshake")
        if data:
            tls.incoming.write(data)
        tls.tls.do_handshake()
    except ssl.SSLWantReadError:
        send_now(tls)
        return
    except ssl.SSLError as err:
        drop_unjoined(door, sock, addr, why_not(err))
        return
    except OSError as err:
        drop_unjoined(door, sock, addr, f"TLS handshake failed: {describe(err)}")
        return
    send_now(tls)
    del door.handshaking[sock]
    door.ready.append((tls, addr))


def drop_unjoined(door, sock, addr, why):
    """Close a connection that never joined, and log why."""
    del door.handshaking[sock]
    sock.close()
    door.log(f"{format_addr(addr)} dropped: {why}")



def why_not(err):
    """Why a handshake failed, in a few words: "not TLS" for a plain client."""
    reason = describe(err)
    if reason in ("wrong version number", "http request", "unknown protocol",
                  "record layer failure", "packet length too long", "unsupported protocol"):
        return f"not TLS ({reason})"
    return f"TLS handshake failed: {reason}"


def open_door(server, admit, read, seat_free, log):
    """Put a TlsListener in the place of server's listener, with the certificate and key
    of --tls (server.settings.tls). Returns server; None after saying on stderr why not."""
    cert, key = server.settings.tls
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.num_tickets = 0  # no session tickets: they would come after the handshake
        context.options |= ssl.OP_NO_RENEGOTIATION  # (TLS 1.2) a handshake costs us CPU
        context.load_cert_chain(cert, key)
    except (OSError, ValueError) as err:  # missing file, not PEM, key does not match
        print(f"error: --tls {cert} {key}: {describe(err)}", file=sys.stderr)
        return None
    server.listener = TlsListener(server.listener, context, server, admit, read, seat_free, log)
    server.extras.append(server.listener)
    return server


def client_context(cafile):
    """The client's TLS settings: it trusts the certificates in cafile, and only those; it
    checks the server's, host name included (create_default_context() does both)."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as err:  # a file, but no certificate in it
        raise OSError(f"no certificate in it ({describe(err)})") from None


def connect(sock, context, host, timeout):
    """The client's side, while it connects: a blocking handshake on sock (connected)
    that checks the server's certificate (context: client_context()). Returns a
    TlsSocket, non-blocking. Raises OSError: ssl.SSLCertVerificationError if the server
    is not the one the context trusts (its verify_message says why)."""
    tls = wrap(sock, context, server_side=False, hostname=host)
    sock.settimeout(timeout)
    while True:
        try:
            tls.tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(tls.outgoing.read())
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("it closed the connection during the TLS handshake "
                                      "(is it a TLS server?)") from None
            tls.incoming.write(data)
        except ssl.SSLCertVerificationError as err:  # the one error a user must understand
            raise ConnectionError(f"its certificate is not trusted: {err.verify_message} "
                                  "(is --tls given the server's certificate?)") from None
        except ssl.SSLError as err:
            raise ConnectionError(f"TLS failed: {describe(err)} (is it a TLS server?)") from None
    sock.sendall(tls.outgoing.read())
    sock.setblocking(False)
    return tls


def format_addr(addr):
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(err):
    """An OSError (ssl.SSLError included) in a few lower-case words."""
    reason = getattr(err, "reason", None)  # ssl.SSLError's: "WRONG_VERSION_NUMBER"
    words = reason.lower().replace("_", " ") if reason else err.strerror or str(err)
    return words[:1].lower() + words[1:]
