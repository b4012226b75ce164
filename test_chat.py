"""Tests for the four scripts: the real scripts, run as subprocesses, over real sockets.

Run them all:   python -m unittest
One class:      python -m unittest -v test_chat.ChatServerTest

Every server starts on --port 0 and tells us its port in its first line. Every wait has a
timeout, and every process a test starts is stopped when the test ends, pass or fail.
"""
import codecs
import importlib.util
import os
import re
import select
import signal
import socket
import ssl
import struct
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import unittest

try:  # POSIX only
    import fcntl
    import pty
    import resource
    import termios
except ImportError:
    fcntl = pty = resource = termios = None

HERE = os.path.dirname(os.path.abspath(__file__))
WAIT = 10  # seconds any one wait may take before the test fails
LISTENING = re.compile(r"(echo|chat) server listening on (\S+):(\d+)")
WELCOME = b"Welcome to the chatroom!"  # what chat_server.py says first


def wait_until(predicate, what, timeout=WAIT):
    """Poll predicate until it is true; fail the test after timeout seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def free_port():
    """A port that nothing listens on (we bind it, then let it go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def a_listener(test):
    """A listening socket on loopback, for a test that plays a server itself (closed when
    the test ends): (the socket, its port)."""
    listener = socket.create_server(("127.0.0.1", 0))
    test.addCleanup(listener.close)
    listener.settimeout(WAIT)
    return listener, listener.getsockname()[1]


def cpu_seconds(pid):
    """User plus system CPU time of a process so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid):
    """The most resident memory a process has used (VmHWM), from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def limit_open_files(n):
    """A preexec_fn that lowers the child's descriptor limit to n."""
    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return preexec


def take_controlling_tty():
    """A preexec_fn: a new session whose controlling terminal is stdin, so Ctrl-C typed
    into the terminal sends SIGINT, as it does in a real shell."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # even if we were started with it ignored


def with_default_sigint(preexec_fn=None):
    """A preexec_fn: SIGINT back at its default, so a test can send it, even when the suite
    runs as a background job of a script (which starts with SIGINT ignored); then
    preexec_fn, if any."""
    def preexec():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn:
            preexec_fn()
    return preexec


class Proc:
    """One of the scripts, running as a subprocess.

    With tty=True it runs in a pseudo-terminal, as a person runs it: we type into the
    terminal and read the screen (stdout and stderr together). Otherwise stdin and
    stdout are pipes and stderr goes to a file."""

    def __init__(self, test, script, *args, tty=False, preexec_fn=None, stderr=None, env=None,
                 windows=False):
        cmd = [sys.executable, os.path.join(HERE, script), *args]
        self.raw = bytearray()
        self.err = None
        if windows:  # the Windows build of Python, under Wine; stderr shares the pipe
            cmd, env, stderr = ["wine", WINE_PYTHON, script, *args], WINE_ENV, subprocess.STDOUT
        if tty:
            master, slave = pty.openpty()
            self.tty_at_start = termios.tcgetattr(slave)
            self.popen = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave,
                                          preexec_fn=take_controlling_tty)
            os.close(slave)
            self.in_fd = self.out_fd = master
            test.addCleanup(os.close, master)
        else:
            # stderr goes to a file of its own, unless the test brings its own pipe or file.
            # (A file object shared with the child would share its offset too: our reads
            # would move where the child writes.)
            err_file = None
            if stderr is None:
                fd, self.err = tempfile.mkstemp(prefix="test_chat.", suffix=".log")
                os.close(fd)
                test.addCleanup(os.remove, self.err)
                stderr = err_file = open(self.err, "ab")
            try:
                self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=stderr, preexec_fn=with_default_sigint(preexec_fn),
                                              env=env, cwd=HERE)
            finally:
                if err_file:
                    err_file.close()
            self.in_fd, self.out_fd = self.popen.stdin.fileno(), self.popen.stdout.fileno()
            test.addCleanup(self.popen.stdout.close)
            test.addCleanup(self.close_stdin)
        test.addCleanup(self.kill)  # runs first: cleanups run last-in, first-out

    @property
    def pid(self):
        return self.popen.pid

    @property
    def output(self):
        """Everything read from stdout so far, with a terminal's "\\r\\n" made "\\n"."""
        return self.raw.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def stderr(self):
        with open(self.err, "rb") as err:
            return err.read().decode("utf-8", errors="replace")

    def wait_for_log(self, text):
        wait_until(lambda: text in self.stderr(), f"{text!r} in the log")

    def type(self, text):
        os.write(self.in_fd, text.encode("utf-8") if isinstance(text, str) else text)

    def tty_now(self):
        """The terminal's attributes now (on Linux the master side reports the slave's)."""
        return termios.tcgetattr(self.in_fd)

    def close_stdin(self):
        if not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass

    def _read_some(self, timeout):
        """Read what stdout has within timeout. False at end of output."""
        ready, _, _ = select.select([self.out_fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.out_fd, 65536)
        except OSError:  # EIO: the terminal's other side has closed
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, text, timeout=WAIT, after=""):
        """Wait until text appears in the output (after the first "after" in it)."""
        end = time.monotonic() + timeout
        while text not in (self.output.partition(after)[2] if after else self.output):
            left = end - time.monotonic()
            if left <= 0 or not self._read_some(left):
                raise AssertionError(f"expected {text!r} in output; got {self.output!r}"
                                     + (f"; stderr {self.stderr()!r}" if self.err else ""))

    def read_to_end(self, timeout=WAIT):
        end = time.monotonic() + timeout
        while self._read_some(max(0, end - time.monotonic())):
            if time.monotonic() > end:
                raise AssertionError(f"output did not end; got {self.output!r}")
        return self.output

    def wait(self, timeout=WAIT):
        return self.popen.wait(timeout)

    def stop(self, sig=signal.SIGTERM):
        self.popen.send_signal(sig)
        return self.wait()

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


class Server(Proc):
    """A server started on --port 0; .port is the port it reports."""

    def __init__(self, test, script, *args, preexec_fn=None, stderr=None, windows=False, env=None):
        super().__init__(test, script, "--port", "0", *args, preexec_fn=preexec_fn, stderr=stderr,
                         windows=windows, env=env and {**os.environ, **env})
        self.expect(" server listening on ")  # (under Wine, a log line may come first)
        self.expect("\n", after=" server listening on ")
        match = LISTENING.search(self.output)
        test.assertTrue(match, f"unexpected first line: {self.output!r}")
        self.host, self.port = match.group(2), int(match.group(3))



class Peer:
    """A test client: a socket with a timeout and a buffer for reading lines."""

    def __init__(self, test, port, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=WAIT)
        test.addCleanup(self.sock.close)
        self.buf = bytearray()

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        """The next line, without its "\\n"."""
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed; unfinished: {bytes(self.buf)!r}")
            self.buf += data
        line, _, rest = self.buf.partition(b"\n")
        self.buf[:] = rest
        return bytes(line)

    def recv_exactly(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed after {len(self.buf)} of {n} bytes")
            self.buf += data
        data, self.buf[:] = bytes(self.buf[:n]), self.buf[n:]
        return data

    def read_to_eof(self):
        """Everything until the server closes; a reset after the data counts as a close."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.buf += data
        except ConnectionResetError:
            pass
        data, self.buf[:] = bytes(self.buf), b""
        return data

    def reset(self):
        """Close with an RST instead of a FIN, as a crashed or killed peer may."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def transfer(sock, payload, timeout=WAIT):
    """Send payload while reading what comes back, as a careful client must (a client
    that sends everything before reading can deadlock once both directions fill up).
    Returns the len(payload) bytes received."""
    sock.setblocking(False)
    view, sent, received = memoryview(payload), 0, bytearray()
    end = time.monotonic() + timeout
    while len(received) < len(payload):
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"transfer stalled: sent {sent}, received {len(received)}")
        readable, writable, _ = select.select([sock], [sock] if sent < len(payload) else [], [], left)
        if writable:
            sent += sock.send(view[sent:sent + 256 * 1024])
        if readable:
            data = sock.recv(1 << 20)
            if not data:
                raise AssertionError(f"closed after {len(received)} of {len(payload)} bytes")
            received += data
    sock.settimeout(WAIT)
    return bytes(received)


def feed_until_it_stops_taking(out, data, most, also_read=()):
    """Write data again and again to out (a socket or a file descriptor) while the other
    side takes it, reading also_read meanwhile, until it has taken nothing for 0.3 s (a
    program whose memory is bounded stops taking) or most bytes have gone (one whose
    memory is not would have taken them all). Returns how much it took."""
    write = out.send if isinstance(out, socket.socket) else lambda chunk: os.write(out, chunk)
    fed, last_taken = 0, time.monotonic()
    while fed < most and time.monotonic() - last_taken < 0.3:
        readable, writable, _ = select.select(list(also_read), [out], [], 0.05)
        for fd in readable:  # what it prints must be read, or it would wait on us
            os.read(fd, 1 << 20)
        if writable:
            try:
                fed += write(data)
            except BlockingIOError:
                continue
            last_taken = time.monotonic()
    return fed


needs_linux_limits = unittest.skipUnless(resource and sys.platform.startswith("linux"),
                                         "needs descriptor limits and /proc")


def no_traceback(test, text):
    test.assertNotIn("Traceback", text)


def press_and_expect_a_clean_exit(test, client, key):
    """Type a control key (Ctrl-C is "\x03", Ctrl-D is "\x04") into a client's terminal:
    it must exit with status 0 and no traceback."""
    client.type(key)
    test.assertEqual(client.wait(), 0)
    no_traceback(test, client.read_to_end())


def tcp_queues(port_a, port_b):
    """For the loopback connection between two ports: (bytes queued to send, bytes
    received but not read yet) at each end, keyed by (local port, remote port), all
    read at one moment from /proc/net/tcp (Linux)."""
    queues = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in list(f)[1:]:
                fields = line.split()
                ends = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
                if set(ends) == {port_a, port_b}:
                    tx, rx = fields[4].split(":")
                    queues[ends] = int(tx, 16), int(rx, 16)
    return queues


def queue_output_beyond_the_kernel(server_port, feeder, leaver, chunk, at_least):
    """Have the server queue output for leaver, which never reads, until at_least bytes
    of it wait in the server's outbuf because the kernel's buffers for it are full.
    feeder sends chunks that the server turns into output for leaver, byte for byte
    (feeder is leaver itself for echo). What is in outbuf is what was fed, less what
    the kernel holds at either end."""
    feeder_port, leaver_port = feeder.getsockname()[1], leaver.getsockname()[1]
    fed = 0
    for _ in range(2000):  # 32 MB at most
        feeder.sendall(chunk)
        fed += len(chunk)
        wait_until(lambda: tcp_queues(server_port, feeder_port)[server_port, feeder_port][1] == 0,
                   "the server to read what was sent")
        queues = tcp_queues(server_port, leaver_port)
        in_kernel = queues[server_port, leaver_port][0] + queues[leaver_port, server_port][1]
        if fed - in_kernel >= at_least:
            return
    raise AssertionError("the kernel kept taking output")


def send_queue(local_port, remote_port):
    """Bytes in the kernel's send queue of the loopback connection local_port -> remote_port."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) \
                        == (local_port, remote_port):
                    return int(fields[4].split(":")[0], 16)
    raise AssertionError(f"no connection {local_port} -> {remote_port}")


def a_small_receive_buffer():
    """A socket that will hold little of what it is sent: the rest waits at the server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


# ---------------------------------------------------------------------------------------
# Step 1: echo_server.py
# ---------------------------------------------------------------------------------------

class EchoServerTest(unittest.TestCase):
    """Step 1. CONTRACT.md, "echo_server.py (RFC 862, TCP)": every byte comes back unchanged
    and in order, to each client its own; partial writes finished later; backpressure
    with memory that stays flat; half-close; a leaver's seat freed; --max-clients."""

    def setUp(self):
        self.server = Server(self, "echo_server.py")

    def echo(self, peer, data):
        peer.send(data)
        return peer.recv_exactly(len(data))

    def test_echoes_a_telnet_line_exactly(self):
        peer = Peer(self, self.server.port)
        self.assertEqual(self.echo(peer, b"Hello, World!\r\n"), b"Hello, World!\r\n")

    def test_echoes_all_256_byte_values_without_a_newline(self):
        peer = Peer(self, self.server.port)
        data = bytes(range(256)) * 4
        self.assertEqual(self.echo(peer, data), data)

    def test_echoes_10_mb_in_one_go(self):
        peer = Peer(self, self.server.port)
        data = os.urandom(10 * 1024 * 1024)
        self.assertEqual(transfer(peer.sock, data), data)

    def test_each_of_many_clients_gets_back_only_its_own_bytes(self):
        peers = [Peer(self, self.server.port) for _ in range(50)]
        for round_ in range(3):  # interleave: every client sends before any reads
            for i, peer in enumerate(peers):
                peer.send(f"client {i} round {round_}|".encode())
            for i, peer in enumerate(peers):
                expected = f"client {i} round {round_}|".encode()
                self.assertEqual(peer.recv_exactly(len(expected)), expected)

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_client_that_writes_before_reading_gets_it_all_back_and_memory_stays_flat(self):
        # Send as much as TCP will take without reading a byte. With backpressure the server
        # stops reading us once our echo piles up, and TCP stops taking more; without it,
        # the server would read on and hold everything in memory.
        peer = Peer(self, self.server.port)
        peer.sock.setblocking(False)
        pattern = os.urandom(1 << 20)
        sent, cap = 0, 200 * 1024 * 1024
        while sent < cap:
            _, writable, _ = select.select([], [peer.sock], [], 0.5)
            if not writable:  # TCP has stopped taking more: the server stopped reading
                break
            offset = sent % len(pattern)
            sent += peer.sock.send(pattern[offset:offset + 256 * 1024])
        self.assertLess(sent, cap, "the server kept reading: no backpressure")
        peer.sock.settimeout(WAIT)
        received = 0
        while received < sent:
            data = peer.recv_exactly(min(len(pattern) - received % len(pattern), sent - received))
            offset = received % len(pattern)
            self.assertEqual(data, pattern[offset:offset + len(data)], f"corrupt at byte {received}")
            received += len(data)
        self.assertLess(peak_rss_mb(self.server.pid), 60)

    def test_half_close_sends_everything_pending_then_closes(self):
        peer = Peer(self, self.server.port)
        data = os.urandom(1024 * 1024)
        peer.send(data)
        peer.sock.shutdown(socket.SHUT_WR)  # we stop sending; we keep reading
        self.assertEqual(peer.read_to_eof(), data)
        self.server.wait_for_log("disconnected")

    def test_client_that_resets_mid_transfer_is_dropped_and_others_do_not_notice(self):
        other = Peer(self, self.server.port)
        rude = Peer(self, self.server.port)
        rude.send(os.urandom(1024 * 1024))  # the server has echo pending for it...
        rude.reset()                             # ...when it vanishes
        self.server.wait_for_log("dropped")
        data = os.urandom(1024 * 1024)
        self.assertEqual(transfer(other.sock, data), data)

    def test_client_killed_mid_transfer_is_dropped_and_others_do_not_notice(self):
        other = Peer(self, self.server.port)
        code = ("import socket, sys\n"
                f"s = socket.create_connection(('127.0.0.1', {self.server.port}))\n"
                "print('connected', flush=True)\n"
                "for _ in range(10000): s.sendall(bytes(65536))\n")
        writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        self.addCleanup(writer.stdout.close)
        self.addCleanup(writer.wait)
        self.addCleanup(writer.kill)
        self.assertEqual(writer.stdout.readline(), b"connected\n")
        self.server.wait_for_log("(2 online)")
        writer.kill()
        wait_until(lambda: self.server.stderr().count("dropped") + self.server.stderr().count(
            "disconnected") >= 1, "the killed client to be dropped")
        self.assertEqual(self.echo(other, b"still here"), b"still here")

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc/net/tcp")
    def test_a_client_that_has_left_and_takes_nothing_gives_up_its_seat(self):
        server = Server(self, "echo_server.py", "--max-clients", "2", "--drain-timeout", "1")
        other = Peer(self, server.port)
        leaver = a_small_receive_buffer()
        self.addCleanup(leaver.close)
        leaver.connect(("127.0.0.1", server.port))
        queue_output_beyond_the_kernel(server.port, leaver, leaver, os.urandom(16 * 1024), 96 * 1024)
        leaver.shutdown(socket.SHUT_WR)  # it leaves, and never reads what is queued for it
        server.wait_for_log("closed: took nothing for 1 s after leaving (1 online)")
        self.assertEqual(self.echo(Peer(self, server.port), b"a seat again"), b"a seat again")
        self.assertEqual(self.echo(other, b"still here"), b"still here")

    def test_connections_beyond_max_clients_are_closed_at_once(self):
        server = Server(self, "echo_server.py", "--max-clients", "2")
        first, second = Peer(self, server.port), Peer(self, server.port)
        self.assertEqual(self.echo(first, b"1"), b"1")
        self.assertEqual(self.echo(second, b"2"), b"2")
        extra = Peer(self, server.port)
        self.assertEqual(extra.read_to_eof(), b"")
        server.wait_for_log("refused: server full")
        self.assertEqual(self.echo(first, b"still 1"), b"still 1")
        first.sock.close()
        server.wait_for_log("disconnected")
        self.assertEqual(self.echo(Peer(self, server.port), b"3"), b"3")


# ---------------------------------------------------------------------------------------
# Step 2: echo_client.py
# ---------------------------------------------------------------------------------------

class EchoClientTest(unittest.TestCase):
    """Step 2. CONTRACT.md, "Clients" and "echo_client.py": send:/recv: lines, an echo that
    comes in pieces printed once whole, quit/exit/Ctrl-D, the server going away, text from
    the network shown harmlessly, and memory bounded whatever the server or stdin sends."""

    def setUp(self):
        self.server = Server(self, "echo_server.py")

    def client(self, *args, tty=False, preexec_fn=None):
        return Proc(self, "echo_client.py", "--host", "127.0.0.1",
                    "--port", str(self.server.port), *args, tty=tty, preexec_fn=preexec_fn)

    def test_send_and_recv_as_in_the_challenge(self):
        client = self.client()
        client.type("hello\nHello, World!\nquit\n")
        self.assertEqual(client.read_to_end(),
                         "send: recv: hello\nsend: recv: Hello, World!\nsend: ")
        self.assertEqual(client.wait(), 0)

    def test_quit_and_exit_in_any_case_with_spaces_end_it(self):
        for word in ("quit", "exit", "QUIT", "  Exit  "):
            with self.subTest(word=word):
                client = self.client()
                client.type(f"hi\n{word}\nnever sent\n")
                self.assertNotIn("never sent", client.read_to_end())
                self.assertEqual(client.wait(), 0)

    def test_end_of_input_ends_it(self):
        client = self.client()
        client.type("last\n")
        client.close_stdin()
        self.assertIn("recv: last\n", client.read_to_end())
        self.assertEqual(client.wait(), 0)

    def test_long_line_comes_back_whole(self):
        # 30 MB is more than both directions of a loopback connection can buffer: a client
        # that sent it all before reading would hang against a server with backpressure.
        line = "x" * (30 * 1024 * 1024)
        client = self.client()
        client.type(line + "\n")
        client.close_stdin()
        self.assertEqual(client.read_to_end(timeout=30), f"send: recv: {line}\nsend: \n")
        self.assertEqual(client.wait(), 0)

    def test_echo_that_arrives_in_pieces_is_printed_once_whole(self):
        # Our own RFC 862 server, which sends each echo back one byte at a time.
        listener, port = a_listener(self)
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1",
                      "--port", str(port))
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(WAIT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.type("pieces\n")
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        for i in range(len(line)):
            conn.send(line[i:i + 1])
            time.sleep(0.01)  # shapes the traffic into separate segments; waits for nothing
        client.expect("recv: pieces\n")
        client.type("quit\n")
        self.assertEqual(client.read_to_end(), "send: recv: pieces\nsend: ")
        self.assertEqual(client.wait(), 0)

    def test_server_that_goes_away_is_reported_and_exit_1(self):
        client = self.client()
        client.type("hello\n")
        client.expect("recv: hello\n")
        self.assertEqual(self.server.stop(), 0)
        client.type("anyone there?\n")
        self.assertEqual(client.wait(), 1)
        self.assertEqual(client.stderr(), "server closed the connection\n")

    def test_no_server_is_a_one_line_error_naming_host_and_port(self):
        port = free_port()
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1", "--port", str(port))
        self.assertEqual(client.wait(), 1)
        self.assertEqual(client.stderr(), f"error: cannot connect to 127.0.0.1:{port}: "
                                          "connection refused (is the server running?)\n")

    def test_what_comes_back_is_shown_harmlessly(self):
        client = self.client()
        client.type("\x1b[2J\x1b]0;pwned\x07 \u202egnp.exe\n")
        client.expect("recv: \\x1b[2J\\x1b]0;pwned\\x07 \\u202egnp.exe\n")
        for raw in (b"\x1b", b"\x07", "\u202e".encode()):
            self.assertNotIn(raw, client.raw)

    def test_invalid_utf8_typed_is_sent_as_it_is(self):
        client = self.client()
        client.type(b"caf\xe9\n")
        client.expect("recv: caf\ufffd\n")
        client.close_stdin()
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.stderr())

    def test_every_typed_line_is_sent_even_if_the_server_sends_more(self):
        listener, port = a_listener(self)
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1", "--port", str(port))
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(WAIT)
        conn.sendall(b"a line we never sent\nand another\n")  # both arrive in one recv()
        client.type("one\ntwo\nthree\n")
        received = b""
        while received.count(b"\n") < 3:
            data = conn.recv(65536)
            self.assertTrue(data, f"the client closed after sending {received!r}")
            conn.sendall(data)  # and we echo, as RFC 862 says
            received += data
        self.assertEqual(received, b"one\ntwo\nthree\n")

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_memory_stays_bounded_against_a_server_that_never_sends_a_newline(self):
        listener, port = a_listener(self)
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1", "--port", str(port))
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        client.type("hello\n")
        conn.setblocking(False)
        sent = feed_until_it_stops_taking(conn, b"x" * (1 << 20), 300 << 20)
        self.assertLess(peak_rss_mb(client.pid), 60, f"{sent} bytes sent")
        client.expect("recv: xxxx")

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_memory_stays_bounded_against_a_server_that_never_reads_and_always_sends(self):
        listener, port = a_listener(self)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it takes little
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1", "--port", str(port))
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        client.type("x" * (8 << 20) + "\n")  # 8 MB that the server never reads
        conn.setblocking(False)  # it sends, and sends, and never reads
        sent = feed_until_it_stops_taking(conn, b"x" * (1 << 20), 300 << 20)
        self.assertLess(peak_rss_mb(client.pid), 100, f"{sent} bytes sent")
        self.assertIsNone(client.popen.poll())  # it waits, with bounded memory, for the server

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_memory_stays_bounded_whatever_comes_in_on_stdin(self):
        listener, port = a_listener(self)  # it never reads and never answers
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1", "--port", str(port))
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        os.set_blocking(client.in_fd, False)  # a line with no end
        fed = feed_until_it_stops_taking(client.in_fd, bytes(1 << 20), 300 << 20)
        self.assertLess(peak_rss_mb(client.pid), 120, f"fed {fed} bytes")

    def test_a_closed_stdout_ends_it_quietly(self):
        client = self.client()
        client.popen.stdout.close()  # as | head -1 does once it has its line
        client.type("hello\n")
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.stderr())

    def test_a_closed_stdin_is_the_end_of_input(self):
        client = self.client(preexec_fn=lambda: os.close(0))
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.stderr())

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_ctrl_c_ends_it_cleanly(self):
        client = self.client(tty=True)
        client.expect("send: ")
        client.type("typed in a terminal\r")  # Enter sends "\r"; the terminal makes it "\n"
        client.expect("recv: typed in a terminal\n")
        client.expect("send: ")
        press_and_expect_a_clean_exit(self, client, "\x03")

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_ctrl_d_ends_it(self):
        client = self.client(tty=True)
        client.expect("send: ")
        press_and_expect_a_clean_exit(self, client, "\x04")


# ---------------------------------------------------------------------------------------
# Step 3: chat_client.py
# ---------------------------------------------------------------------------------------

class ChatClientRoom:
    """A chat server with someone in the room, and chat clients of it: for the two classes
    below, which run side by side."""

    def setUp(self):
        self.server = Server(self, "chat_server.py")
        self.other = Peer(self, self.server.port)  # someone already in the room
        self.assertEqual(self.other.line(), WELCOME)

    def client(self, *args, tty=False, server=None):
        port = (server or self.server).port
        return Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port", str(port), *args, tty=tty)

    def client_of_a_test_server(self, *args):
        """A client (from a pipe, named ci) connected to a server this test plays itself:
        (the client, the server's side of the connection)."""
        listener, port = a_listener(self)
        client = Proc(self, "chat_client.py", "--host", "127.0.0.1",
                      "--port", str(port), "--name", "ci", *args)
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(WAIT)
        return client, conn

    def joined(self, client):
        client.expect("Welcome to the chatroom!\n")
        self.assertEqual(self.other.line(), b"* a user joined (2 online)")


class ChatClientTest(ChatClientRoom, unittest.TestCase):
    """Step 3. CONTRACT.md, "Clients" and "chat_client.py": the name, "John: Hi", lines
    printed whole as they come, pipes and their exit status, untrusted text made visible,
    and bounded memory."""

    def test_a_typed_line_is_sent_with_the_name_and_printed(self):
        client = self.client("--name", "John")
        self.joined(client)
        client.type("Hi\n")
        self.assertEqual(self.other.line(), b"John: Hi")
        client.expect("John: Hi\n")

    def test_received_lines_are_printed_whole(self):
        client = self.client("--name", "John")
        self.joined(client)
        self.other.send(b"Jane: hel")
        self.other.send(b"lo John\nJane: and a second line\n")
        client.expect("Jane: and a second line\n")
        self.assertIn("Jane: hello John\nJane: and a second line\n", client.output)

    def test_name_is_asked_again_until_it_is_not_empty(self):
        client = self.client()
        client.type("\n   \nJohn\nHi\n")
        self.assertEqual(self.other.line(), b"* a user joined (2 online)")
        self.assertEqual(self.other.line(), b"John: Hi")
        client.expect("John: Hi\n")
        self.assertTrue(client.output.startswith("name: name: name: "), client.output)

    def test_a_full_server_is_reported_at_once_while_the_name_is_asked(self):
        server = Server(self, "chat_server.py", "--max-clients", "1")
        Peer(self, server.port)  # the one seat is taken
        client = self.client(server=server)  # nothing typed: it is still asking the name
        self.assertEqual(client.wait(), 1)
        self.assertEqual(client.read_to_end(), "name: \nerror: server full, try again later\n")
        self.assertEqual(client.stderr(), "server closed the connection\n")

    def test_from_a_pipe_a_refusal_is_shown_and_the_exit_status_is_1(self):
        server = Server(self, "chat_server.py", "--max-clients", "1")
        Peer(self, server.port)  # the one seat is taken
        client = self.client("--name", "ci", server=server)
        client.type("a line that will not get in\n")
        client.close_stdin()
        self.assertEqual(client.wait(), 1)
        self.assertIn("error: server full, try again later\n", client.read_to_end())

    def test_from_a_pipe_a_refusal_seen_before_the_input_ends_still_gives_status_1(self):
        # The order that once raced: the refusal is shown while we still read stdin, and
        # the server closes only after our input ends (here it waits for our half-close).
        client, conn = self.client_of_a_test_server()
        conn.sendall(b"error: server full, try again later\n")
        client.expect("error: server full, try again later\n")
        client.close_stdin()
        self.assertEqual(conn.recv(100), b"")  # its half-close
        conn.close()
        self.assertEqual(client.wait(), 1)

    def test_from_a_pipe_a_refusal_that_came_while_the_name_was_asked_gives_status_1(self):
        listener, port = a_listener(self)
        client = Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port", str(port))
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.sendall(b"error: server full, try again later\n")  # it closes only after us
        client.type("Ann\n")
        client.close_stdin()
        conn.settimeout(WAIT)
        self.assertEqual(conn.recv(100), b"")  # the client has said all it will say
        conn.close()
        self.assertEqual(client.wait(), 1)
        self.assertIn("error: server full, try again later", client.read_to_end())

    def test_from_a_pipe_what_the_server_sends_after_the_last_line_is_still_shown(self):
        echo = Server(self, "echo_server.py")
        client = self.client("--name", "John", server=echo)
        client.type("Hi\n")
        client.close_stdin()  # the last line: the client shuts down its side and waits
        self.assertEqual(client.wait(), 0)
        self.assertEqual(client.read_to_end(), "John: Hi\nJohn: Hi\n")

    def test_from_a_pipe_the_wait_for_a_server_that_never_closes_is_bounded(self):
        client, conn = self.client_of_a_test_server("--linger", "1")  # it takes the line,
        client.type("x\n")                                            # and never closes
        client.close_stdin()
        self.assertEqual(conn.recv(100), b"ci: x\n")
        start = time.monotonic()
        self.assertEqual(client.wait(), 0)
        self.assertLess(time.monotonic() - start, 1 + 2)  # --linger 1; the default is in --help

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_memory_stays_bounded_against_a_server_that_does_not_read(self):
        listener, port = a_listener(self)
        client = Proc(self, "chat_client.py", "--host", "127.0.0.1",
                      "--port", str(port), "--name", "J")
        conn, _ = listener.accept()  # and never reads
        self.addCleanup(conn.close)
        os.set_blocking(client.in_fd, False)
        lines = (b"y" * 4000 + b"\n") * 16
        fed = feed_until_it_stops_taking(client.in_fd, lines, 300 << 20, [client.out_fd])
        self.assertLess(peak_rss_mb(client.pid), 40, f"fed {fed} bytes")

    def test_what_the_server_says_while_the_name_is_asked_is_shown_after_it(self):
        client = self.client()
        self.assertEqual(self.other.line(), b"* a user joined (2 online)")
        self.other.send(b"Jane: hello, whoever you are\n")
        client.type("John\n")
        client.expect("Jane: hello, whoever you are\n")
        self.assertTrue(client.output.startswith("name: Welcome to the chatroom!\n"), client.output)

    def test_empty_lines_are_not_sent(self):
        client = self.client("--name", "John")
        self.joined(client)
        client.type("\n\nafter blanks\n")
        self.assertEqual(self.other.line(), b"John: after blanks")

    def test_quit_and_exit_end_it_and_what_was_typed_before_still_goes(self):
        for word in ("quit", " EXIT "):
            with self.subTest(word=word):
                client = self.client("--name", "John")
                client.type(f"before {word.strip()}\n{word}\nafter\n")
                self.assertEqual(client.wait(), 0)
                self.assertEqual([self.other.line() for _ in range(3)],
                                 [b"* a user joined (2 online)", f"John: before {word.strip()}".encode(),
                                  b"* a user left (1 online)"])

    def test_end_of_input_ends_it_and_an_unfinished_last_line_still_goes(self):
        client = self.client("--name", "John")
        client.type("one\ntwo")
        client.close_stdin()
        self.assertEqual(client.wait(), 0)
        self.assertEqual(self.other.line(), b"* a user joined (2 online)")
        self.assertEqual(self.other.line(), b"John: one")
        self.assertEqual(self.other.line(), b"John: two")

    def test_server_that_goes_away_is_reported_and_exit_1(self):
        client = self.client("--name", "John")
        self.joined(client)
        self.assertEqual(self.server.stop(), 0)
        self.assertEqual(client.wait(), 1)
        self.assertEqual(client.stderr(), "server closed the connection\n")

    def test_against_the_echo_server_you_see_your_own_line_twice(self):
        echo = Server(self, "echo_server.py")
        client = self.client("--name", "John", server=echo)
        client.type("Hi\n")
        client.expect("John: Hi\nJohn: Hi\n")
        client.type("quit\n")
        self.assertEqual(client.wait(), 0)

    def test_control_characters_from_the_network_are_shown_not_obeyed(self):
        client = self.client("--name", "John")
        self.joined(client)
        self.other.send(b"\x1b[2J\x1b]0;pwned\x07\n")     # clear screen, retitle window, bell
        self.other.send("\u009b31mC1 too\tand a tab\n".encode())  # CSI as one C1 character
        self.other.send(b"bad \xff utf-8\n")
        client.expect("utf-8\n")
        self.assertIn("\\x1b[2J\\x1b]0;pwned\\x07\n", client.output)
        self.assertIn("\\x9b31mC1 too\tand a tab\n", client.output)
        self.assertIn("bad \ufffd utf-8\n", client.output)
        for raw in (b"\x1b", b"\x07", b"\xc2\x9b"):
            self.assertNotIn(raw, client.raw)

    def test_a_line_the_server_would_refuse_is_not_sent_and_the_client_stays(self):
        client = self.client("--name", "John")
        self.joined(client)
        fits, too_long = "y" * (4096 - len("John: ")), "z" * (4097 - len("John: "))
        client.type(f"{fits}\n{too_long}\nstill here\n")
        self.assertEqual(self.other.line(), f"John: {fits}".encode())
        self.assertEqual(self.other.line(), b"John: still here")
        self.assertIn("not sent: line too long (4097 bytes", client.stderr())

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_memory_stays_bounded_whatever_comes_in_on_stdin(self):
        client = self.client("--name", "John")
        self.joined(client)
        chunk = b"w" * (1 << 20)
        for _ in range(20):  # a 20 MB line, with no newline in sight
            client.type(chunk)
        client.type(b"\nafter\n")
        self.assertEqual(self.other.line(), b"John: after")  # the long one was not sent
        self.assertLess(peak_rss_mb(client.pid), 40)
        self.assertIn("line too long", client.stderr())

    def test_characters_that_reorder_or_hide_text_are_shown_not_obeyed(self):
        # Bidi controls, line separators, zero-width and format characters, tags, fillers:
        # each can make one user's line read as if another user wrote it, or hide text.
        # The rule is Unicode's categories, so this list is a sample, not the rule.
        client = self.client("--name", "John")
        self.joined(client)
        tricks = ("\u202e\u202c\u2066\u2069\u200e\u200f\u061c\u2028\u2029\u200b\u200d\u2060\ufeff"
                  "\U000e0001\U000e0041\U000e007f\u206a\u206f\u180e\u00ad\u034f\u115f\u1160\u3164\uffa0")
        self.other.send(f"Jane: {tricks}|end\n".encode())
        client.expect("|end\n")
        for char in tricks:
            self.assertNotIn(char.encode(), client.raw)
            code = ord(char)
            self.assertIn(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                          else f"\\U{code:08x}", client.output)

    def test_the_windows_keyboard_skips_special_keys_and_ends_on_ctrl_z_then_enter(self):
        # Wine's console gives no Ctrl-Z and no function keys, so we feed WindowsKeyboard
        # what msvcrt.getwch() returns on Windows, here, on any system.
        spec = importlib.util.spec_from_file_location("chat_client", os.path.join(HERE, "chat_client.py"))
        chat_client = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(chat_client)

        class FakeMsvcrt:
            keys = []

            def kbhit(self):
                return bool(self.keys)

            def getwch(self):
                return self.keys.pop(0)

        chat_client.msvcrt = fake = FakeMsvcrt()
        chat_client.terminal_columns = lambda: 80
        keyboard = object.__new__(chat_client.WindowsKeyboard)
        keyboard.chars, keyboard.escape, keyboard.prompt = [], "", ""

        def typed(keys):
            fake.keys[:] = keys
            return keyboard.read_lines()

        # F1 is "\x00;", Left "\xe0K", Delete "\xe0S": skipped. Enter ends the read.
        self.assertEqual(typed(["\x00", ";", "a", "\xe0", "K", "b", "\xe0", "S", "\r", "c"]),
                         (["ab"], True))
        self.assertEqual(fake.keys, ["c"])  # the next line waits in the console
        self.assertEqual(typed(["\xe0", "\r"]), (["à"], True))  # "\xe0" alone is à
        self.assertEqual(typed(["x", "\x1a", "\r"]), (["x"], True))  # Ctrl-Z ends an empty line only
        self.assertEqual(typed(["\x1a"]), ([], True))
        self.assertEqual(keyboard.text(), "^Z")
        self.assertEqual(typed(["\r"]), ([], False))  # Ctrl-Z, then Enter: the end
        with self.assertRaises(KeyboardInterrupt):
            typed(["\x03"])

    def test_ordinary_text_of_every_script_arrives_intact(self):
        client = self.client("--name", "John")
        self.joined(client)
        texts = ["naïve café", "日本語", "한국어", "กี่", "में", "e\u0301", "👍", "❤\ufe0f", "👩\u200d💻",
                 "a\tb"]
        self.other.send(("Jane: " + " | ".join(texts) + " |end\n").encode())
        client.expect("|end\n")
        self.assertIn("Jane: " + " | ".join(texts) + " |end", client.output)

    def test_a_closed_stdout_ends_it_quietly(self):
        client = self.client("--name", "John")
        self.joined(client)
        client.popen.stdout.close()  # as | head -1 does once it has its line
        self.other.send(b"Jane: anyone?\n")
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.stderr())

    def test_a_closed_stdin_is_the_end_of_input(self):
        client = Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port", str(self.server.port),
                      "--name", "John", preexec_fn=lambda: os.close(0))
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.stderr())
        self.assertEqual(self.other.line(), b"* a user joined (2 online)")

    def test_a_terminal_that_cannot_show_a_character_shows_a_replacement(self):
        client = Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port", str(self.server.port),
                      "--name", "John", env={**os.environ, "PYTHONIOENCODING": "latin-1"})
        self.joined(client)
        self.other.send("Jane: \U0001f600 and caf\u00e9\n".encode())
        client.expect("and caf\ufffd\n")  # é in latin-1 is not UTF-8: the test reads it as \ufffd
        self.assertIn(b"Jane: ? and caf\xe9\n", client.raw)
        client.close_stdin()
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.stderr())

    def test_no_server_is_a_one_line_error_naming_host_and_port(self):
        port = free_port()
        client = Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port", str(port), "--name", "J")
        self.assertEqual(client.wait(), 1)
        self.assertEqual(client.stderr(), f"error: cannot connect to 127.0.0.1:{port}: "
                                          "connection refused (is the server running?)\n")



class ChatClientTerminalTest(ChatClientRoom, unittest.TestCase):
    """Step 3 in a terminal (a pseudo-terminal). CONTRACT.md, "chat_client.py": the typed
    line kept intact while messages arrive, the editing keys, and the terminal restored on
    every way out."""

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_it_chats_and_ctrl_c_ends_it_cleanly(self):
        client = self.client(tty=True)
        client.expect("name: ")
        client.type("John\r")
        self.joined(client)
        client.type("Hi\r")
        self.assertEqual(self.other.line(), b"John: Hi")
        self.other.send(b"Jane: hello John\n")
        client.expect("Jane: hello John\n")
        press_and_expect_a_clean_exit(self, client, "\x03")

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_ctrl_c_at_the_name_prompt_ends_it_cleanly(self):
        client = self.client(tty=True)
        client.expect("name: ")
        press_and_expect_a_clean_exit(self, client, "\x03")

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_a_message_appears_above_the_half_typed_line_which_is_redrawn(self):
        client = self.client("--name", "John", tty=True)
        self.joined(client)
        client.type("see you at ei")
        client.expect("see you at ei")
        self.other.send(b"Jane: lunch at noon?\n")
        # Wipe the line (CR, erase to end of line), print the message, draw the line again.
        client.expect("\r\x1b[JJane: lunch at noon?\nsee you at ei")
        client.type("ght\r")
        self.assertEqual(self.other.line(), b"John: see you at eight")
        client.expect("\r\x1b[JJohn: see you at eight\n")
        self.assertNotIn("see you at ei* a user", client.output)
        press_and_expect_a_clean_exit(self, client, "\x04")

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_a_line_too_long_to_send_is_refused_and_you_stay(self):
        client = self.client("--name", "John", tty=True)
        self.joined(client)
        client.type("x" * 4091 + "\r")
        client.expect("not sent: line too long (4097 bytes")
        client.type("short\r")
        self.assertEqual(self.other.line(), b"John: short")

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_what_you_typed_stays_when_the_server_goes_away(self):
        client = self.client("--name", "John", tty=True)
        self.joined(client)
        client.type("half a li")
        client.expect("half a li")
        self.assertEqual(self.server.stop(), 0)
        client.expect("server closed the connection")
        self.assertIn("half a li\nserver closed the connection", client.output)
        self.assertEqual(client.wait(), 1)

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_backspace_ctrl_u_and_arrow_keys_edit_the_line(self):
        client = self.client("--name", "John", tty=True)
        self.joined(client)
        client.type("thrown away\x15")                # Ctrl-U clears the line
        client.type(b"caf\xc3")                      # é arrives in two pieces
        client.type(b"\xa9 \xe2\x82\xac\x7f\x7f")       # then " €", and two Backspaces
        client.type("\x1b[A\x1b[D\x1bOB\x1b[1;5C\x1b1")  # up, left, down (SS3), Ctrl-right, Alt-1
        client.type("\x04")                           # Ctrl-D on a line that is not empty
        client.type("\x01\x7f\x7f\x7f\x7fna\u00efve\r")   # Ctrl-A ignored; "café" becomes "naïve"
        self.assertEqual(self.other.line(), "John: naïve".encode())
        client.type("\x7f\x7f\r")                     # Backspace on an empty line is harmless
        client.type("quit\r")
        self.assertEqual(client.wait(), 0)
        self.assertEqual(self.other.line(), b"* a user left (1 online)")

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_the_terminal_is_restored_on_every_way_out(self):
        ways = {"Ctrl-D": lambda client: client.type("\x15\x04"),  # Ctrl-U first: the line must be empty
                "Ctrl-C": lambda client: client.type("\x03"),
                "quit": lambda client: client.type("\x15quit\r"),
                "SIGTERM": lambda client: client.popen.send_signal(signal.SIGTERM),
                "SIGHUP": lambda client: client.popen.send_signal(signal.SIGHUP),
                "SIGQUIT": lambda client: client.popen.send_signal(signal.SIGQUIT),
                "server gone": lambda client: client.server.stop()}
        for way, leave in ways.items():
            with self.subTest(way=way):
                server = Server(self, "chat_server.py")
                client = self.client("--name", "John", tty=True, server=server)
                client.server = server
                client.expect("Welcome to the chatroom!\n")
                client.type("half a li")
                client.expect("half a li")
                lflag = client.tty_now()[3]
                self.assertFalse(lflag & termios.ECHO, "echo is off while the client edits")
                self.assertFalse(lflag & termios.ICANON, "line mode is off while the client edits")
                leave(client)
                self.assertEqual(client.wait(), 1 if way == "server gone" else 0)
                no_traceback(self, client.read_to_end())
                self.assertEqual(client.tty_now(), client.tty_at_start)

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_a_long_typed_line_shows_its_end_in_one_row_and_goes_whole(self):
        client = self.client("--name", "John", tty=True)
        self.joined(client)
        set_window_size(client, 20)
        client.type("a" * 40 + "end")
        client.expect("\r\x1b[J" + "a" * 16 + "end")  # the end that fits in 19 columns
        self.other.send(b"Jane: one\n")
        client.expect("\r\x1b[JJane: one\n" + "a" * 16 + "end")  # wiped without a row up
        client.type("\x15" + "\u65e5\u672c" * 6)  # Ctrl-U, then 12 wide characters: 24 columns
        client.expect("\r\x1b[J\u672c" + "\u65e5\u672c" * 4)  # 9 of them, in 18 columns
        set_window_size(client, 10)  # the width is read at each drawing
        self.other.send(b"Jane: two\n")
        client.expect("\r\x1b[JJane: two\n" + "\u65e5\u672c" * 2)
        client.type("\r")
        self.assertEqual(self.other.line(), ("John: " + "\u65e5\u672c" * 6).encode())

    @unittest.skipUnless(pty and sys.platform.startswith("linux"), "needs a pseudo-terminal and /proc")
    def test_in_a_terminal_ctrl_z_gives_the_shell_its_terminal_and_fg_takes_it_back(self):
        client = self.client("--name", "John", tty=True)
        self.joined(client)
        client.type("half")
        client.expect("half")

        def state():
            with open(f"/proc/{client.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        client.type("\x1a")  # Ctrl-Z
        wait_until(lambda: state() == "T", "the client to stop")
        self.assertEqual(client.tty_now(), client.tty_at_start)  # line mode and echo are back
        before = len(client.raw)
        os.kill(client.pid, signal.SIGCONT)  # fg
        wait_until(lambda: not client.tty_now()[3] & termios.ECHO, "the client to take the terminal")
        wait_until(lambda: client._read_some(0.05) and b"half" in client.raw[before:],
                   "the typed line to be drawn again")
        client.type("way\r")
        self.assertEqual(self.other.line(), b"John: halfway")

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_quit_ends_it(self):
        client = self.client("--name", "John", tty=True)
        self.joined(client)
        client.type("quit\r")
        self.assertEqual(client.wait(), 0)
        self.assertEqual(self.other.line(), b"* a user left (1 online)")


# ---------------------------------------------------------------------------------------
# Both clients: what they leave on a terminal's screen, and start-up, stdio and Ctrl-C
# ---------------------------------------------------------------------------------------

def terminal_width(char):
    """Columns a terminal gives a character, as wcwidth() says: combining marks, format
    characters and Hangul medial and final jamo none, wide and fullwidth ones two."""
    if unicodedata.category(char) in ("Mn", "Me", "Cf") or "\u1160" <= char <= "\u11ff":
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


class Screen:
    """Just enough of a terminal to tell what a program leaves on it: characters (wide
    ones take two cells), carriage return, line feed, cursor up (ESC [ n A) and erase (ESC
    [ J, ESC [ K). Like most terminals today it rewraps its lines when resized. It keeps
    every row it ever had: the history, then the 24 rows of the screen."""

    SEQUENCE = re.compile(r"\x1b\[(\d*)([AJK])|\x1b.?|[^\x1b]", re.S)

    def __init__(self, columns, height=24):
        self.columns, self.height = columns, height
        self.rows = [[]]       # each a list of cells: a character, with what joins it
        self.wraps = [False]   # whether the row runs on into the next (the text wrapped)
        self.row = self.col = self.top = 0  # the cursor; top: the screen's first row

    def feed(self, text):
        for match in self.SEQUENCE.finditer(text):
            number, command = match.groups()
            if command == "A":
                self.row = max(self.top, self.row - int(number or 1))
                self.col = min(self.col, self.columns - 1)
            elif command in ("J", "K"):  # erase to the end of the screen, or of the row
                del self.rows[self.row][self.col:]
                self.wraps[self.row] = False
                if command == "J":
                    for below in range(self.row + 1, len(self.rows)):
                        self.rows[below], self.wraps[below] = [], False
            elif match.group().startswith("\x1b"):
                raise AssertionError(f"an escape sequence this screen does not know: {match.group()!r}")
            elif match.group() == "\r":
                self.col = 0
            elif match.group() == "\n":
                self.down()
            else:
                self.put(match.group())

    def down(self):
        self.row += 1
        if self.row == len(self.rows):
            self.rows.append([])
            self.wraps.append(False)
        self.top = max(self.top, self.row - self.height + 1)

    def put(self, char):
        width = terminal_width(char)
        row = self.rows[self.row]
        if width == 0:  # it joins the character before it
            if self.col and len(row) >= self.col:
                row[self.col - 1] += char
            return
        if self.col + width > self.columns:  # past the last column: on to the next row
            self.wraps[self.row] = True
            self.down()
            self.col, row = 0, self.rows[self.row]
        row.extend(" " * (self.col + width - len(row)))
        row[self.col:self.col + width] = [char] + [""] * (width - 1)
        self.col += width

    def lines(self):
        """The text's lines, each row that wrapped joined to the next: [(first row, cells)]."""
        lines = []
        for i, row in enumerate(self.rows):
            if i == 0 or not self.wraps[i - 1]:
                lines.append((i, []))
            lines[-1][1].extend(row)
        return lines

    def resize(self, columns):
        """Rewrap every line at the new width; the cursor stays after the same character."""
        rows, wraps, cursor = [], [], None
        for first, cells in self.lines():
            if first <= self.row < first + self.rows_of(first):  # the cursor's line
                offset = sum(len(row) for row in self.rows[first:self.row]) + self.col
                cells.extend(" " * (offset - len(cells)))
                pending = 0 < offset == len(cells) and offset % columns == 0  # at its end
                cursor = (len(rows) + offset // columns - pending,
                          columns if pending else offset % columns)
            pieces = [cells[i:i + columns] for i in range(0, len(cells), columns)] or [[]]
            rows += pieces
            wraps += [True] * (len(pieces) - 1) + [False]
        self.rows, self.wraps, self.columns = rows, wraps, columns
        self.row, self.col = cursor
        while len(self.rows) > self.row + 1 and not self.rows[-1]:  # blank rows below
            self.rows.pop()
            self.wraps.pop()
        self.top = max(0, len(self.rows) - self.height)

    def rows_of(self, first):
        """How many rows the line that starts at row first fills."""
        count = 1
        while self.wraps[first + count - 1]:
            count += 1
        return count

    def text(self, cells):
        return "".join(cells).rstrip()

    def cursor_line(self):
        """The line the cursor is on, as text."""
        return next(self.text(cells) for first, cells in reversed(self.lines()) if first <= self.row)

    def history(self):
        return [self.text(cells) for _, cells in self.lines()]

    def on_the_screen(self):
        return "\n".join(self.text(row) for row in self.rows[self.top:])


def set_window_size(client, columns, rows=24):
    """Resize the client's terminal: the kernel tells it with SIGWINCH."""
    fcntl.ioctl(client.in_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


@unittest.skipUnless(pty, "needs a pseudo-terminal")
class ClientScreenTest(unittest.TestCase):
    """chat_client.py in a terminal, its output read by a small terminal emulator (Screen).
    CONTRACT.md, "chat_client.py": no message is ever erased, whatever is typed and however
    the window is resized, and the typed line stays intact."""

    def setUp(self):
        self.server = Server(self, "chat_server.py")
        self.other = Peer(self, self.server.port)  # someone already in the room
        self.assertEqual(self.other.line(), WELCOME)

    def client(self, columns):
        client = Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port", str(self.server.port),
                      "--name", "John", tty=True)
        set_window_size(client, columns)
        client.expect("Welcome to the chatroom!\n")
        self.assertEqual(self.other.line(), b"* a user joined (2 online)")
        return client

    def test_typed_text_of_every_script_stays_whole_while_five_messages_arrive_and_enter_sends_it(self):
        client, screen = self.client(40), Screen(40)
        decoder, fed = codecs.getincrementaldecoder("utf-8")("replace"), 0
        texts = ["naïve café", "日本語", "한국어", "กี่", "में", "e\u0301", "👍", "❤\ufe0f", "👩\u200d💻",
                 "taller than the screen " + "0123456789" * 150]  # 24 rows of 40: 960 cells
        for n, typed in enumerate(texts):
            with self.subTest(typed=typed[:30]):
                client.type(typed)
                shown = typed if len(typed) < 40 else typed[-39:]  # the end that fits in a row
                client.expect(shown)
                replies = [f"Jane: reply {k} to text {n}" for k in range(1, 6)]
                for reply in replies:
                    self.other.send(reply.encode() + b"\n")
                client.expect(f"{replies[-1]}\n{shown}")
                screen.feed(decoder.decode(client.raw[fed:]))
                fed = len(client.raw)
                for reply in replies:
                    self.assertIn(reply, screen.on_the_screen())
                self.assertEqual(screen.cursor_line(), shown)
                client.type("\r")
                self.assertEqual(self.other.line(), f"John: {typed}".encode())
                client.expect(f"John: {typed}\n")

    def test_a_storm_of_resizes_while_messages_arrive_erases_none_and_keeps_the_typed_line(self):
        # Forty resizes, one every 50 ms, between 30 and 100 columns. The screen rewraps at
        # once; the client learns each size 250 ms later, as a terminal multiplexer may tell it.
        typed = "typed before the storm, and it is 45 columns"
        client, screen = self.client(100), Screen(100)
        client.type(typed)
        client.expect(typed)
        widths = [30 + (37 * k) % 71 for k in range(39)] + [100]
        lag = 5
        resizes = []  # (how much output the screen had been given, its new width)
        start = time.monotonic()
        for k, columns in enumerate(widths):
            client._read_some(0)
            resizes.append((len(client.raw), columns))
            if k >= lag:
                set_window_size(client, widths[k - lag])
            if k % 2 == 0:
                self.other.send(f"Jane: message {k // 2 + 1:02} of 20\n".encode())
            tick = start + 0.05 * (k + 1)
            while time.monotonic() < tick:  # keeps the pace; the terminal is read meanwhile
                client._read_some(max(0, tick - time.monotonic()))
        set_window_size(client, widths[-1])  # now the client knows the last size too
        client.expect("Jane: message 20 of 20\n")
        client.type("!")  # drawn again, at the width it now knows
        client.expect(f"{typed}!")
        decoder, fed = codecs.getincrementaldecoder("utf-8")("replace"), 0
        for offset, columns in resizes + [(len(client.raw), widths[-1])]:
            screen.feed(decoder.decode(client.raw[fed:offset]))
            screen.resize(columns)
            fed = offset
        history = screen.history()
        for k in range(1, 21):
            self.assertTrue(any(f"Jane: message {k:02} of 20" in line for line in history),
                            f"message {k} is not on the screen or in its history:\n" + "\n".join(history))
        self.assertEqual(screen.cursor_line(), typed + "!")
        # What makes it so: the client never moves the cursor up, into rows it may not have drawn.
        self.assertIsNone(re.search(rb"\x1b\[\d*A", client.raw))
        client.type("\r")
        self.assertEqual(self.other.line(), f"John: {typed}!".encode())


def exit_status_and_cpu(popen, timeout=WAIT):
    """Wait for a process to exit: (its exit status, or minus the signal that killed it;
    the CPU seconds it used)."""
    end = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
        if pid:
            popen.returncode = os.waitstatus_to_exitcode(status)
            return popen.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > end:
            raise AssertionError(f"still running after {timeout} s")
        time.sleep(0.01)


def connecting_to(port):
    """The local ports of the sockets that are connecting to port on loopback (SYN_SENT)."""
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "02":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def accept_queue(port):
    """The listener on port: (how many connections wait to be accepted, how many may)."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    most, waiting = fields[4].split(":")
                    return int(waiting, 16), int(most, 16)
    raise AssertionError(f"nothing listens on port {port}")


def a_full_listener(test):
    """The port of a loopback listener whose accept queue is full: the kernel drops the
    SYN of a new connection, so its connect() waits."""
    listener = socket.socket()
    test.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    while accept_queue(port)[0] <= accept_queue(port)[1]:  # Linux: full once over the backlog
        waiting = accept_queue(port)[0]
        filler = socket.create_connection(("127.0.0.1", port), timeout=WAIT)  # never accepted
        test.addCleanup(filler.close)
        wait_until(lambda: accept_queue(port)[0] > waiting, "the connection to be queued")
    return port


def assert_a_clean_end(test, said, status, statuses=(0, 1)):
    """A client's exit: a status among statuses, one line at most of what it said on
    stderr (Python's "import time:" lines aside), no traceback, no "Exception ignored"."""
    said = "".join(line for line in said.splitlines(True) if not line.startswith("import time:"))
    test.assertIn(status, statuses, said)
    test.assertLessEqual(said.count("\n"), 1, said)
    test.assertNotIn("Traceback", said)
    test.assertNotIn("Exception ignored", said)


@unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
class ClientStartAndStdioTest(unittest.TestCase):
    """Both clients. CONTRACT.md, "All four scripts": a stdin that is closed or open for
    writing only, a full stdout, or Ctrl-C at any moment after the imports (while it
    connects to a server whose accept queue is full, say) ends it cleanly and soon: status
    0 or 1 (Ctrl-C may also end it as it ends any program), one line on stderr at most,
    no traceback and no "Exception ignored"."""

    CLIENTS = (("echo_client.py",), ("chat_client.py", "--name", "J"))

    def start(self, script, *args, port=None, env=None, **how):
        """A client with stdin, stdout and preexec_fn as given: (its Popen, its stderr file).
        Without a port, it talks to an echo server (which both clients can talk to)."""
        if not port:
            self.server = getattr(self, "server", None) or Server(self, "echo_server.py")
        fd, err = tempfile.mkstemp(prefix="test_chat.", suffix=".log")
        self.addCleanup(os.remove, err)
        how.setdefault("stdin", subprocess.DEVNULL)
        how.setdefault("stdout", subprocess.DEVNULL)
        popen = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--host", "127.0.0.1",
                                  "--port", str(port or self.server.port), *args], stderr=fd,
                                 preexec_fn=with_default_sigint(how.pop("preexec_fn", None)),
                                 env=env, cwd=HERE, **how)
        os.close(fd)
        self.addCleanup(lambda: popen.poll() is None and (popen.kill(), popen.wait()))
        return popen, err

    def said(self, err):
        with open(err) as f:
            return f.read()

    def assert_a_clean_end(self, err, status, statuses=(0, 1)):
        assert_a_clean_end(self, self.said(err), status, statuses)

    def test_a_stdin_that_is_closed_or_open_for_writing_only_ends_it_cleanly(self):
        write_only = os.open(os.devnull, os.O_WRONLY)  # as nohup leaves it
        self.addCleanup(os.close, write_only)
        for script, *args in self.CLIENTS:
            for stdin, how in (("closed", dict(preexec_fn=lambda: os.close(0))),
                               ("write-only", dict(stdin=write_only))):
                with self.subTest(script=script, stdin=stdin):
                    popen, err = self.start(script, *args, **how)
                    status, _ = exit_status_and_cpu(popen, timeout=5)
                    self.assertEqual(status, 0)  # the end of input
                    self.assert_a_clean_end(err, status)

    def test_a_full_stdout_ends_it_soon_in_one_line_without_spinning(self):
        for script, *args in self.CLIENTS:
            with self.subTest(script=script):
                with open("/dev/full", "wb") as full:
                    popen, err = self.start(script, *args, stdin=subprocess.PIPE, stdout=full)
                self.addCleanup(popen.stdin.close)
                popen.stdin.write(b"hello\n")  # and the input stays open
                popen.stdin.flush()
                status, cpu = exit_status_and_cpu(popen, timeout=5)
                self.assert_a_clean_end(err, status)
                self.assertLess(cpu, 1)
                self.assertEqual(self.said(err), "error: cannot write the output: no space left on device\n")

    def test_ctrl_c_while_it_connects_to_a_server_whose_queue_is_full_ends_it_cleanly(self):
        port = a_full_listener(self)
        for script, *args in self.CLIENTS:
            with self.subTest(script=script):
                before = connecting_to(port)
                popen, err = self.start(script, *args, port=port)
                wait_until(lambda: connecting_to(port) - before, "the client's SYN")
                popen.send_signal(signal.SIGINT)
                status, _ = exit_status_and_cpu(popen)
                self.assert_a_clean_end(err, status, (0, 1, 130, -signal.SIGINT))

    def test_ctrl_c_at_any_moment_after_the_imports_ends_it_cleanly(self):
        # Python says when each import is done; we press Ctrl-C as soon as we see the last
        # one, while the command line is read, the host resolved, or the connection made.
        port = a_full_listener(self)
        for script, *args in self.CLIENTS:
            for attempt in range(2):
                with self.subTest(script=script, attempt=attempt):
                    popen, err = self.start(script, *args, port=port,
                                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
                    wait_until(lambda: "| unicodedata\n" in self.said(err), "the imports")
                    popen.send_signal(signal.SIGINT)
                    status, _ = exit_status_and_cpu(popen)
                    self.assert_a_clean_end(err, status, (0, 1, 130, -signal.SIGINT))


# ---------------------------------------------------------------------------------------
# Step 4: chat_server.py
# ---------------------------------------------------------------------------------------



class ChatServerTest(unittest.TestCase):
    """Step 4. CONTRACT.md, "chat_server.py": the welcome, framing, fan-out never back to
    the sender, notices and counts, the line cap, slow consumers, floods, readers that hold
    the room back (the stall budget), leavers, a full server, and TCP_NODELAY."""

    def setUp(self):
        self.server = Server(self, "chat_server.py")

    def join(self, server=None):
        """Connect, read the welcome, and wait until everyone before us has seen us join."""
        peer = Peer(self, (server or self.server).port)
        self.assertEqual(peer.line(), WELCOME)
        return peer

    def room(self, n):
        """n clients in the room; each has read every notice up to the last arrival."""
        peers = []
        for i in range(n):
            newcomer = self.join()
            for peer in peers:
                self.assertEqual(peer.line(), f"* a user joined ({i + 1} online)".encode())
            peers.append(newcomer)
        return peers

    def test_every_client_is_welcomed(self):
        peer = Peer(self, self.server.port)
        self.assertEqual(peer.line(), WELCOME)

    def test_a_line_goes_to_every_other_client(self):
        alice, bob, carol = self.room(3)
        alice.send(b"Alice: hi all\n")
        self.assertEqual(bob.line(), b"Alice: hi all")
        self.assertEqual(carol.line(), b"Alice: hi all")

    def test_sender_does_not_get_its_own_line(self):
        alice, bob = self.room(2)
        alice.send(b"Alice: one\n")
        self.assertEqual(bob.line(), b"Alice: one")
        bob.send(b"Bob: two\n")  # queued for alice after her own line, had it come back
        self.assertEqual(alice.line(), b"Bob: two")

    def test_a_line_sent_one_byte_at_a_time_is_relayed_once_whole(self):
        alice, bob = self.room(2)
        alice.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one byte, one segment
        for byte in b"Alice: slowly, slowly\n":
            alice.send(bytes([byte]))
        self.assertEqual(bob.line(), b"Alice: slowly, slowly")
        alice.send(b"Alice: next\n")
        self.assertEqual(bob.line(), b"Alice: next")

    def test_a_hundred_lines_in_one_send_are_relayed_one_by_one(self):
        alice, bob = self.room(2)
        alice.send(b"".join(b"line %d\n" % i for i in range(100)))
        self.assertEqual([bob.line() for _ in range(100)], [b"line %d" % i for i in range(100)])

    def test_carriage_return_before_newline_is_dropped(self):
        alice, bob = self.room(2)
        alice.send(b"from telnet\r\n")
        self.assertEqual(bob.line(), b"from telnet")
        self.assertEqual(bob.buf, b"")

    def test_empty_lines_are_ignored(self):
        alice, bob = self.room(2)
        alice.send(b"\n\r\n\nsomething\n")
        self.assertEqual(bob.line(), b"something")

    def test_last_line_without_newline_is_delivered_when_the_sender_closes(self):
        alice, bob = self.room(2)
        alice.send(b"no newline")
        alice.sock.close()
        self.assertEqual(bob.line(), b"no newline")
        self.assertEqual(bob.line(), b"* a user left (1 online)")

    def test_last_line_without_newline_is_delivered_when_the_sender_half_closes(self):
        alice, bob = self.room(2)
        bob.send(b"for alice\n")
        alice.send(b"bye")
        alice.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(bob.line(), b"bye")
        self.assertEqual(bob.line(), b"* a user left (1 online)")
        # alice still gets what was queued for her, then the server closes
        self.assertEqual(alice.read_to_eof(), b"for alice\n")

    def test_join_and_leave_notices_go_to_everyone_else_with_the_count(self):
        alice, bob = self.room(2)  # alice saw "* a user joined (2 online)"
        carol = self.join()
        self.assertEqual(alice.line(), b"* a user joined (3 online)")
        self.assertEqual(bob.line(), b"* a user joined (3 online)")
        bob.sock.close()  # a clean close
        self.assertEqual(alice.line(), b"* a user left (2 online)")
        self.assertEqual(carol.line(), b"* a user left (2 online)")
        carol.reset()  # a reset
        self.assertEqual(alice.line(), b"* a user left (1 online)")
        self.assertEqual(alice.buf, b"")

    def test_no_line_is_lost_duplicated_or_reordered_with_20_clients_sending_at_once(self):
        clients, lines_each = 20, 200
        peers = self.room(clients)
        outbufs = {p.sock: b"".join(b"c%02d %04d\n" % (i, n) for n in range(lines_each))
                   for i, p in enumerate(peers)}
        received = {p.sock: [] for p in peers}
        expected_total = (clients - 1) * lines_each
        for peer in peers:
            peer.sock.setblocking(False)
        end = time.monotonic() + WAIT
        while any(len(got) < expected_total for got in received.values()):
            self.assertLess(time.monotonic(), end, "lines went missing")
            pending = [s for s, out in outbufs.items() if out]
            readable, writable, _ = select.select(list(received), pending, [], 1)
            for sock in writable:
                sent = sock.send(outbufs[sock])
                outbufs[sock] = outbufs[sock][sent:]
            for sock in readable:
                peer = next(p for p in peers if p.sock is sock)
                peer.buf += sock.recv(65536)
                *lines, rest = peer.buf.split(b"\n")
                peer.buf[:] = rest
                received[sock] += lines
        for i, peer in enumerate(peers):
            got = received[peer.sock]
            self.assertEqual(len(got), expected_total, f"client {i}")
            for j in range(clients):
                from_j = [line for line in got if line.startswith(b"c%02d " % j)]
                expected = [] if i == j else [b"c%02d %04d" % (j, n) for n in range(lines_each)]
                self.assertEqual(from_j, expected, f"lines from client {j} at client {i}")

    def test_line_over_the_limit_gets_an_error_and_a_disconnect(self):
        alice, bob = self.room(2)
        # In one send: two good lines, one byte too many, and a line that must not go.
        alice.send(b"before\n" + b"a" * 4096 + b"\n" + b"x" * 4097 + b"\nafter\n")
        self.assertEqual(alice.line(), b"error: line too long (limit 4096 bytes)")
        self.assertEqual(alice.read_to_eof(), b"")
        self.assertEqual([bob.line() for _ in range(3)],
                         [b"before", b"a" * 4096, b"* a user left (1 online)"])
        self.assertIsNone(self.server.popen.poll())

    def test_a_line_one_byte_over_the_limit_is_refused_however_it_ends(self):
        for ending in (b"\n", b"\r\n"):
            with self.subTest(ending=ending):
                self.server = Server(self, "chat_server.py")  # a new room each time
                alice, bob = self.room(2)
                alice.send(b"z" * 4097 + ending)
                self.assertEqual(alice.line(), b"error: line too long (limit 4096 bytes)")
                self.assertEqual(bob.line(), b"* a user left (1 online)")

    def test_line_over_the_limit_without_a_newline_gets_an_error_too(self):
        alice, bob = self.room(2)
        alice.send(b"y" * 100000)
        self.assertEqual(alice.line(), b"error: line too long (limit 4096 bytes)")
        self.assertEqual(bob.line(), b"* a user left (1 online)")

    def test_lines_up_to_the_limit_pass_intact(self):
        alice, bob = self.room(2)
        for size in (4000, 4096):
            line = bytes(ord("0") + i % 10 for i in range(size))
            alice.send(line + b"\r\n")
            self.assertEqual(bob.line(), line)

    def test_invalid_utf8_and_binary_are_relayed_as_they_are(self):
        alice, bob = self.room(2)
        garbage = bytes(range(256)).replace(b"\n", b"").replace(b"\r", b"") + b"\xff\xfe\xc3("
        alice.send(garbage + b"\n")
        self.assertEqual(bob.line(), garbage)
        alice.send(b"still fine\n")
        self.assertEqual(bob.line(), b"still fine")

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_client_that_never_reads_is_dropped_and_the_others_get_everything(self):
        self.server = Server(self, "chat_server.py", "--stall-budget", "0.5")  # (sooner)
        alice, bob = self.room(2)
        stuck = a_small_receive_buffer()  # it never reads: what is sent to it waits with us
        self.addCleanup(stuck.close)
        stuck.connect(("127.0.0.1", self.server.port))
        for peer in (alice, bob):
            self.assertEqual(peer.line(), b"* a user joined (3 online)")
        lines = 3000  # 3 MB in lines of 1000 bytes
        flood = b"".join(b"%06d " % n + b"z" * 992 + b"\n" for n in range(lines))
        alice.sock.setblocking(False)
        bob.sock.setblocking(False)
        sent, got, end = 0, [], time.monotonic() + 2 * WAIT
        while len(got) < lines + 1:
            self.assertLess(time.monotonic(), end, f"bob has only {len(got)} lines")
            want_write = [alice.sock] if sent < len(flood) else []
            readable, writable, _ = select.select([bob.sock], want_write, [], 1)
            if writable:
                sent += alice.sock.send(flood[sent:sent + 256 * 1024])
            if readable:
                bob.buf += bob.sock.recv(1 << 20)
                *new, rest = bob.buf.split(b"\n")
                bob.buf[:] = rest
                got += new
        self.assertIn(b"* a user left (2 online)", got)
        got.remove(b"* a user left (2 online)")
        self.assertEqual(got, flood.split(b"\n")[:-1])
        self.assertIn("dropped: too slow", self.server.stderr())
        self.assertLess(peak_rss_mb(self.server.pid), 80)

    def test_readers_that_drip_or_read_in_bursts_are_dropped_however_they_spread_their_reads(self):
        # Two readers that hold the room back while a sender sends flat out: one with a tiny
        # receive buffer takes 4 KiB every 0.3 s; one with a 1 MiB buffer takes 128 KiB from
        # it every 0.5 s. Each makes progress long before any deadline, but neither reads
        # 64 KiB per 0.1 s the room waits for it. Their stall budgets (1 s here) are spent
        # all the same, and the reader who reads gets every line.
        server = Server(self, "chat_server.py", "--stall-budget", "1")
        alice, bob = self.join(server), self.join(server)
        drip, burst = a_small_receive_buffer(), socket.socket()
        burst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for sock, online in ((drip, 3), (burst, 4)):
            self.addCleanup(sock.close)
            sock.connect(("127.0.0.1", server.port))
            sock.setblocking(False)
            self.assertEqual(bob.line(), b"* a user joined (%d online)" % online)
        lines = b"".join(b"%06d " % n + b"d" * 992 + b"\n" for n in range(8000))  # 8 MB
        alice.sock.setblocking(False)
        bob.sock.setblocking(False)
        sent, got, start = 0, bytearray(), time.monotonic()
        reads = {drip: (0.3, 4096), burst: (0.5, 128 * 1024)}  # every so often, this much
        next_read = {sock: start for sock in reads}
        while server.stderr().count("dropped: too slow") < 2:
            self.assertLess(time.monotonic() - start, 2 * WAIT, f"a reader that holds the room back stayed: sent {sent}, {server.stderr()}")
            readable, writable, _ = select.select([bob.sock], [alice.sock] if sent < len(lines) else [],
                                                  [], 0.05)
            if writable:
                sent += alice.sock.send(lines[sent:sent + 64 * 1024])
            if readable:
                got += bob.sock.recv(1 << 20)
            for sock, (every, size) in reads.items():
                if time.monotonic() >= next_read[sock]:
                    next_read[sock] += every
                    try:
                        while size > 0:
                            size -= len(sock.recv(size)) or size
                    except (BlockingIOError, ConnectionError):
                        pass
        self.assertEqual(server.stderr().count("dropped"), 2)  # the two, and no one else
        left = b"* a user left (3 online)\n* a user left (2 online)\n"
        end = time.monotonic() + 2 * WAIT
        while len(got) < len(lines) + len(left):  # the rest of the lines, as fast as bob reads
            self.assertLess(time.monotonic(), end, f"bob has {len(got)} of {len(lines)} bytes")
            readable, writable, _ = select.select([bob.sock], [alice.sock] if sent < len(lines) else [], [], 1)
            if writable:
                sent += alice.sock.send(lines[sent:sent + 64 * 1024])
            if readable:
                got += bob.sock.recv(1 << 20)
        for notice in left.splitlines(keepends=True):
            got = got.replace(notice, b"", 1)
        self.assertEqual(bytes(got), lines)  # every line, once, in order

    def test_several_senders_in_one_turn_get_no_reader_dropped(self):
        # Eight clients send 60 KB each at the same moment: one turn could read all of
        # them, 480 KB for a reader who cannot take it yet (a small receive buffer, and not
        # reading for 0.3 s). The turn stops reading before any reader can pass 256 KiB.
        reader = a_small_receive_buffer()
        self.addCleanup(reader.close)
        reader.connect(("127.0.0.1", self.server.port))
        senders = [self.join() for _ in range(8)]
        burst = b"".join(b"%06d " % n + b"z" * 48 + b"\n" for n in range(1100))  # 60.5 KB
        for sender in senders:
            sender.sock.setblocking(False)
            sender.sock.send(burst)
        reader.setblocking(False)
        got, start, end = bytearray(), time.monotonic(), time.monotonic() + 2 * WAIT
        while got.count(b"z\n") < 8 * 1100:
            self.assertLess(time.monotonic(), end, f"the reader has {len(got)} bytes")
            socks = [s.sock for s in senders] + ([reader] if time.monotonic() > start + 0.3 else [])
            for sock in select.select(socks, [], [], 0.05)[0]:
                data = sock.recv(1 << 20)  # the senders read what the others send, too
                self.assertTrue(data, "a connection was closed")
                if sock is reader:
                    got += data
        self.assertNotIn("dropped", self.server.stderr())

    def test_one_client_flooding_gets_no_reader_dropped_and_every_line_arrives(self):
        # One client sends lines as fast as TCP takes them, for 0.5 s. Four real chat
        # clients read them and print each one, at the pace a chat client reads.
        readers = [Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port",
                        str(self.server.port), "--name", f"reader{i}") for i in range(4)]
        for reader in readers:
            reader.expect("Welcome to the chatroom!\n")
        flooder = self.join()
        flooder.sock.setblocking(False)

        def line(n):
            return b"%09d " % n + b"f" * 44 + b"\n"
        unsent, lines_sent = bytearray(), 0
        by_fd = {reader.out_fd: reader for reader in readers}
        flood_ends = time.monotonic() + 0.5
        while time.monotonic() < flood_ends or unsent:
            self.assertLess(time.monotonic(), flood_ends + WAIT, "the flood did not get through")
            if not unsent and time.monotonic() < flood_ends:
                unsent += b"".join(line(lines_sent + i) for i in range(1000))
                lines_sent += 1000
            readable, writable, _ = select.select(list(by_fd), [flooder.sock] if unsent else [], [], 1)
            if writable:
                del unsent[:flooder.sock.send(unsent)]
            for fd in readable:  # the readers' output must be read, or they would stall
                by_fd[fd].raw += os.read(fd, 1 << 20)
        flooder.sock.setblocking(True)
        flooder.send(b"END\n")
        end = time.monotonic() + WAIT
        while not all(reader.raw.endswith(b"\nEND\n") for reader in readers):
            self.assertLess(time.monotonic(), end, "END did not reach every reader")
            for fd in select.select(list(by_fd), [], [], 1)[0]:
                by_fd[fd].raw += os.read(fd, 1 << 20)
        self.assertNotIn("dropped", self.server.stderr())
        expected = b"".join(line(n) for n in range(lines_sent))
        for reader in readers:  # every line, once, in order
            got = b"".join(row + b"\n" for row in reader.raw.split(b"\n") if row.endswith(b"f" * 44))
            self.assertEqual(len(got), len(expected))
            self.assertTrue(got == expected, "lines lost, duplicated or reordered")

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc/net/tcp")
    def test_a_client_that_has_left_and_takes_nothing_gives_up_its_seat(self):
        server = Server(self, "chat_server.py", "--max-clients", "2", "--drain-timeout", "1")
        leaver = a_small_receive_buffer()
        self.addCleanup(leaver.close)
        leaver.connect(("127.0.0.1", server.port))
        talker = self.join(server)
        queue_output_beyond_the_kernel(server.port, talker.sock, leaver, (b"z" * 99 + b"\n") * 80,
                                       32 * 1024)
        leaver.shutdown(socket.SHUT_WR)  # it leaves, and never reads what is queued for it
        self.assertEqual(talker.line(), b"* a user left (1 online)")
        # Closed after --drain-timeout; or, had more than 64 KiB been queued, dropped after
        # 2 s for holding the room back. Either way, its seat is free again.
        wait_until(lambda: re.search(r"closed: took nothing|dropped: too slow", server.stderr()),
                   "the leaver to be closed")
        self.assertEqual(self.join(server).buf, b"")  # welcomed: the seat is free again
        self.assertEqual(talker.line(), b"* a user joined (2 online)")

    def test_connections_beyond_max_clients_are_told_the_server_is_full(self):
        server = Server(self, "chat_server.py", "--max-clients", "2")
        alice, bob = self.join(server), self.join(server)
        extra = Peer(self, server.port)
        self.assertEqual(extra.read_to_eof(), b"error: server full, try again later\n")
        bob.send(b"still here\n")
        self.assertEqual(alice.line(), b"* a user joined (2 online)")
        self.assertEqual(alice.line(), b"still here")

    def test_lines_are_not_held_back_by_nagles_algorithm(self):
        # Nagle's algorithm holds a small write while an earlier one is unacknowledged, and a
        # client that also talks delays its acknowledgements (about 40 ms on Linux). Without
        # TCP_NODELAY on the server's sockets, "two" below waits for that acknowledgement.
        alice, bob = self.room(2)
        for peer in (alice, bob):
            peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        delays = []
        for _ in range(10):
            alice.send(b"one\n")
            self.assertEqual(bob.line(), b"one")
            start = time.perf_counter()
            alice.send(b"two\n")
            self.assertEqual(bob.line(), b"two")
            delays.append(time.perf_counter() - start)
            bob.send(b"reply\n")
            self.assertEqual(alice.line(), b"reply")
        delays.sort()
        self.assertLess(delays[len(delays) // 2], 0.02, f"median delay {delays[5] * 1000:.1f} ms")


# ---------------------------------------------------------------------------------------
# Step 5: chat servers linked through NATS. Against a real nats-server where one is
# installed (Debian's package: .ci/run installs it), and against a small fake one here.
# ---------------------------------------------------------------------------------------

NATS_SERVER = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
HOSTNAME = socket.gethostname()


def start_nats(test, port=None, args=()):
    """A real nats-server on 127.0.0.1 (on port, or a free one), with args; returns
    (Popen, port) once it takes connections."""
    port = port or free_port()
    nats = subprocess.Popen([NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    test.addCleanup(stop_nats, nats)

    def takes_connections():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
            return True
        except ConnectionRefusedError:
            return False
    wait_until(takes_connections, f"nats-server on port {port}")
    return nats, port


def stop_nats(nats):
    if nats.poll() is None:
        nats.kill()
    nats.wait()


class FakeNats:
    """Just enough of a NATS server to test the link: it greets with INFO, takes the
    CONNECT, SUB and PING, and answers PONG. Then the test plays NATS by hand."""

    def __init__(self, test, max_payload=1024 * 1024, info=None):
        self.listener, self.port = a_listener(test)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # fills soon
        self.info = info or b'INFO {"server_id":"fake","proto":1,"max_payload":%d}\r\n' % max_payload
        self.test = test

    def greet(self):
        """Accept the next link; returns (connection, what it sent before our PONG)."""
        conn, _ = self.listener.accept()
        self.test.addCleanup(conn.close)
        conn.settimeout(WAIT)
        conn.sendall(self.info)
        said = bytearray()
        while not said.endswith(b"PING\r\n"):
            data = conn.recv(65536)
            if not data:
                raise AssertionError(f"the link closed during its greeting: {bytes(said)!r}")
            said += data
        conn.sendall(b"PONG\r\n")
        return conn, bytes(said)

    def linked_server(self, *args):
        """A chat server linked to us: it greets us before it tells its port."""
        server = Proc(self.test, "chat_server.py", "--port", "0", "--nats", f"127.0.0.1:{self.port}", *args)
        conn, said = self.greet()
        server.expect("\n")
        server.port = int(LISTENING.fullmatch(server.output.split("\n")[0]).group(3))
        return server, conn, said


def read_until(conn, ending, limit=1 << 20):
    """What the link sends to a fake NATS, until it ends with ending, without the PINGs
    the link sends now and then (a payload holds no "\r\n": lines end in "\n")."""
    data = bytearray()
    while not data.endswith(ending):
        chunk = conn.recv(65536)
        if not chunk:
            raise AssertionError(f"closed; got {bytes(data[-200:])!r}")
        data += chunk
        data[:] = data.replace(b"\r\nPING\r\n", b"\r\n")
        if data.startswith(b"PING\r\n"):
            del data[:6]
        if len(data) > limit:
            raise AssertionError(f"no {ending!r} in {limit} bytes")
    return bytes(data)


class NatsLinkTest(unittest.TestCase):
    """Step 5. CONTRACT.md, "chat_server.py", the --nats items: linked servers share one
    room, each line once, in order, never back; NATS down at start, lost and back later;
    credentials; and NATS as a trust boundary: whole lines within the cap, our own payload
    cap, a checked INFO, its words logged harmlessly, a link that stops reading dropped."""

    def linked_room(self, nats_port):
        """Two linked servers: Ann on A; Bob and Cy on B. Returns (A, B, ann, bob, cy),
        once each has seen the others join."""
        a = Server(self, "chat_server.py", "--nats", f"127.0.0.1:{nats_port}")
        b = Server(self, "chat_server.py", "--nats", f"127.0.0.1:{nats_port}")
        ann = Peer(self, a.port)
        self.assertEqual(ann.line(), WELCOME)
        bob = Peer(self, b.port)
        self.assertEqual(bob.line(), WELCOME)
        self.assertEqual(ann.line(), f"* a user joined (1 online on {HOSTNAME}:{b.port})".encode())
        # Ann's join went out before Bob came: it may reach him or not, as he arrived
        # while it was on its way. Her next line comes after it, whichever.
        ann.send(b"Ann: hello\n")
        first = bob.line()
        if first == f"* a user joined (1 online on {HOSTNAME}:{a.port})".encode():
            first = bob.line()
        self.assertEqual(first, b"Ann: hello")
        cy = Peer(self, b.port)
        self.assertEqual(cy.line(), WELCOME)
        self.assertEqual(bob.line(), b"* a user joined (2 online)")  # his own server's count
        self.assertEqual(ann.line(), f"* a user joined (2 online on {HOSTNAME}:{b.port})".encode())
        return a, b, ann, bob, cy

    @unittest.skipUnless(NATS_SERVER, "needs nats-server (Debian: apt install nats-server)")
    def test_two_linked_servers_cross_each_line_once_in_order_and_never_back(self):
        _, port = start_nats(self)
        a, b, ann, bob, cy = self.linked_room(port)
        lines = b"".join(b"Ann: line %d\n" % k for k in range(300))
        ann.send(lines)
        for peer in (bob, cy):
            received = b"".join(peer.line() + b"\n" for _ in range(300))
            self.assertEqual(received, lines)  # all, once each, in order
        bob.send(b"Bob: done\n")
        self.assertEqual(ann.line(), b"Bob: done")  # not one of her own lines first
        self.assertEqual(cy.line(), b"Bob: done")
        cy.send(b"Cy: end\n")
        self.assertEqual(bob.line(), b"Cy: end")  # not "Bob: done" a second time
        self.assertEqual(ann.line(), b"Cy: end")
        cy.sock.close()
        self.assertEqual(bob.line(), b"* a user left (1 online)")
        self.assertEqual(ann.line(), f"* a user left (1 online on {HOSTNAME}:{b.port})".encode())

    @unittest.skipUnless(NATS_SERVER, "needs nats-server (Debian: apt install nats-server)")
    def test_when_nats_dies_each_server_keeps_its_own_room(self):
        nats, port = start_nats(self)
        a, b, ann, bob, cy = self.linked_room(port)
        stop_nats(nats)
        for server in (a, b):
            server.wait_for_log(f"NATS link to 127.0.0.1:{port} lost")
        bob.send(b"Bob: still here\n")
        self.assertEqual(cy.line(), b"Bob: still here")
        dee = Peer(self, a.port)  # a newcomer on A is welcomed as ever
        self.assertEqual(dee.line(), WELCOME)
        self.assertEqual(ann.line(), b"* a user joined (2 online)")
        dee.send(b"Dee: hi Ann\n")
        self.assertEqual(ann.line(), b"Dee: hi Ann")  # and not Bob's line: it could not cross

    @unittest.skipUnless(NATS_SERVER, "needs nats-server (Debian: apt install nats-server)")
    def test_when_nats_comes_back_lines_cross_again_and_none_sent_meanwhile(self):
        nats, port = start_nats(self)
        a, b, ann, bob, cy = self.linked_room(port)
        stop_nats(nats)
        for server in (a, b):
            server.wait_for_log(f"NATS link to 127.0.0.1:{port} lost")
        dee = Peer(self, a.port)
        self.assertEqual(dee.line(), WELCOME)
        ann.send(b"Ann: while it is down\n")  # at most once: this one is lost
        self.assertEqual(dee.line(), b"Ann: while it is down")  # A has dealt with it
        start_nats(self, port)
        for server in (a, b):
            server.wait_for_log(f"NATS link to 127.0.0.1:{port} is back")  # within WAIT
        ann.send(b"Ann: it is back\n")
        self.assertEqual(bob.line(), b"Ann: it is back")
        self.assertEqual(cy.line(), b"Ann: it is back")

    def test_chat_server_copied_alone_runs_step_4_and_says_what_step_5_needs(self):
        folder = tempfile.mkdtemp(prefix="test_chat.")
        self.addCleanup(shutil.rmtree, folder)
        shutil.copy(os.path.join(HERE, "chat_server.py"), folder)
        alone = os.path.join(folder, "chat_server.py")
        server = subprocess.Popen([sys.executable, alone, "--port", "0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, preexec_fn=with_default_sigint())
        self.addCleanup(lambda: server.poll() is None and server.kill() or server.wait())
        port = int(LISTENING.fullmatch(server.stdout.readline().decode().strip()).group(3))
        self.addCleanup(server.stdout.close)
        ann, bob = Peer(self, port), Peer(self, port)
        self.assertEqual((ann.line(), ann.line()), (WELCOME, b"* a user joined (2 online)"))
        ann.send(b"Ann: step 4, alone\n")
        self.assertEqual((bob.line(), bob.line()), (WELCOME, b"Ann: step 4, alone"))
        result = subprocess.run([sys.executable, alone, "--port", "0", "--nats", "127.0.0.1:4222"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("error: --nats needs nats_link.py beside chat_server.py", result.stderr)

    def test_unreachable_nats_at_start_is_a_one_line_error_and_status_1(self):
        port = free_port()
        server = Proc(self, "chat_server.py", "--port", "0", "--nats", f"127.0.0.1:{port}")
        self.assertEqual(server.wait(), 1)
        self.assertEqual(server.read_to_end(), "")
        self.assertEqual(server.stderr(), f"error: cannot link to NATS at 127.0.0.1:{port}: "
                                          "connection refused (is nats-server running?)\n")

    def test_the_link_speaks_nats_answers_ping_logs_err_and_relays_msg(self):
        fake = FakeNats(self)
        server, conn, said = fake.linked_server()
        self.assertRegex(said, rb'^CONNECT \{.*"echo": false.*\}\r\nSUB chatroom 1\r\nPING\r\n$')
        conn.sendall(b"PING\r\n")
        self.assertEqual(read_until(conn, b"PONG\r\n"), b"PONG\r\n")
        ann = Peer(self, server.port)
        self.assertEqual(ann.line(), WELCOME)
        joined = f"* a user joined (1 online on {HOSTNAME}:{server.port})\n".encode()
        self.assertEqual(read_until(conn, joined + b"\r\n"),
                         b"PUB chatroom %d\r\n%s\r\n" % (len(joined), joined))
        conn.sendall(b"MSG chatroom 1 15\r\nBob: hel")  # a payload may come in pieces
        conn.sendall(b"lo Ann\n\r\n")
        self.assertEqual(ann.line(), b"Bob: hello Ann")
        conn.sendall(b"-ERR 'Unknown Protocol Operation'\r\n")
        server.wait_for_log("NATS at 127.0.0.1:%d says: 'Unknown Protocol Operation'" % fake.port)
        ann.send(b"Ann: still linked\n")
        self.assertIn(b"PUB chatroom 18\r\nAnn: still linked\n\r\n", read_until(conn, b"linked\n\r\n"))

    def test_a_batch_over_max_payload_crosses_in_pieces_cut_at_line_ends(self):
        fake = FakeNats(self, max_payload=100)
        server, conn, _ = fake.linked_server()
        ann = Peer(self, server.port)
        self.assertEqual(ann.line(), WELCOME)
        lines = b"".join(b"Ann: line number %03d\n" % k for k in range(20))  # 20 x 21 bytes
        ann.send(lines)
        got = read_until(conn, b"Ann: line number 019\n\r\n")
        got = got[got.index(b"PUB chatroom", 1):]  # after the notice of her join
        payloads = re.findall(rb"PUB chatroom (\d+)\r\n", got)
        pieces = re.split(rb"PUB chatroom \d+\r\n", got)[1:]
        self.assertEqual(len(pieces), 5, got)  # 420 bytes: 4 lines (84 bytes) a message
        for size, piece in zip(payloads, pieces):
            self.assertLessEqual(int(size), 100)
            self.assertTrue(piece.endswith(b"\n\r\n"), piece)  # each ends at a line end
        self.assertEqual(b"".join(piece[:-2] for piece in pieces), lines)

    def test_a_message_bigger_than_nats_allows_drops_the_link_not_the_server(self):
        fake = FakeNats(self, max_payload=1000)
        server, conn, _ = fake.linked_server()
        ann, bob = Peer(self, server.port), Peer(self, server.port)
        self.assertEqual((ann.line(), ann.line()), (WELCOME, b"* a user joined (2 online)"))
        conn.sendall(b"MSG chatroom 1 999999999\r\n")  # we would wait for 1 GB: no
        server.wait_for_log(f"NATS link to 127.0.0.1:{fake.port} lost: NATS sent a bad MSG line")
        again, _ = fake.greet()  # it links again
        server.wait_for_log(f"NATS link to 127.0.0.1:{fake.port} is back")
        ann.send(b"Ann: the room is fine\n")
        self.assertEqual(bob.line(), WELCOME)
        self.assertEqual(bob.line(), b"Ann: the room is fine")
        read_until(again, b"PUB chatroom 22\r\nAnn: the room is fine\n\r\n")

    @needs_linux_limits
    def test_a_link_that_stops_reading_is_dropped_and_made_again_and_memory_stays_bounded(self):
        fake = FakeNats(self)
        server, conn, _ = fake.linked_server("--stall-budget", "0.5")  # conn: never read again
        ann, bob = Peer(self, server.port), Peer(self, server.port)
        for peer in (ann, bob):
            self.assertEqual(peer.line(), WELCOME)
        self.assertEqual(ann.line(), b"* a user joined (2 online)")
        # Ann talks on and on: 8 MB, far past what the kernel buffers for the link. The
        # room waits for the link; once its stall budget (0.5 s here) is spent, the link is
        # dropped, and the room goes on. Bob gets every line; the server's memory stays small.
        line = b"Ann: " + b"x" * 95 + b"\n"
        chunk = line * 10000  # 1 MB
        bob.sock.setblocking(False)
        ann.sock.setblocking(False)
        received, sent, view = 0, 0, memoryview(chunk * 8)
        end = time.monotonic() + 6 * WAIT
        while received < len(view):
            self.assertLess(time.monotonic(), end, f"stalled: sent {sent}, Bob got {received}")
            readable, writable, _ = select.select([bob.sock], [ann.sock] if sent < len(view) else [], [], WAIT)
            if writable:
                sent += ann.sock.send(view[sent:sent + 256 * 1024])
            if readable:
                received += len(bob.sock.recv(1 << 20))
        self.assertEqual(received, len(view))
        server.wait_for_log(f"NATS link to 127.0.0.1:{fake.port} lost: it held the room back for 0.5 s")
        fake.greet()  # it links again
        server.wait_for_log(f"NATS link to 127.0.0.1:{fake.port} is back")
        self.assertLess(peak_rss_mb(server.pid), 60)

    @needs_linux_limits
    def test_the_link_comes_back_on_a_descriptor_select_can_watch_with_every_seat_taken(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < 2500:
            if hard != resource.RLIM_INFINITY and hard < 2500:
                self.skipTest("needs 2500 open files")
            resource.setrlimit(resource.RLIMIT_NOFILE, (2500, hard))  # (this process only)
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        fake = FakeNats(self)
        server, conn, _ = fake.linked_server("--max-clients", "1100")
        peers = [Peer(self, server.port) for _ in range(1000)]
        self.assertEqual(peers[-1].line(), WELCOME)
        conn.close()  # NATS goes away; meanwhile more clients come, for every descriptor
        server.wait_for_log(f"NATS link to 127.0.0.1:{fake.port} lost")
        peers += [Peer(self, server.port) for _ in range(100)]
        peers[-1].sock.recv(1)  # (a welcome, or "server full": either way it was seen)
        fake.greet()  # the link is made again: on a descriptor below FD_SETSIZE, or select()
        server.wait_for_log(f"NATS link to 127.0.0.1:{fake.port} is back")  # would fail
        late = Peer(self, server.port)
        self.assertEqual(late.line(), b"error: server full, try again later")
        self.assertIsNone(server.popen.poll())
        no_traceback(self, server.stderr())

    # NATS is a trust boundary: anyone who can publish on the subject is a peer, and what
    # arrives gets a client's rules.

    def test_what_arrives_from_nats_is_whole_lines_within_the_line_limit_never_glued(self):
        fake = FakeNats(self)
        server, conn, _ = fake.linked_server()
        ann = Peer(self, server.port)
        self.assertEqual(ann.line(), WELCOME)
        longest = b"B" * 4096
        payload = (b"Bob: one\n" + b"x" * 4097 + b"\n" + longest + b"\n"
                   + b"* a user left (0 online)\x1b[2J without its end")
        conn.sendall(b"MSG chatroom 1 %d\r\n%s\r\n" % (len(payload), payload))
        conn.sendall(b"MSG chatroom 1 9\r\nBob: two\n\r\n")
        self.assertEqual(ann.line(), b"Bob: one")
        self.assertEqual(ann.line(), longest)  # 4096 bytes pass intact
        self.assertEqual(ann.line(), b"Bob: two")  # the tail was dropped, not glued to this
        server.wait_for_log(f"NATS at 127.0.0.1:{fake.port}: dropped a line over 4096 bytes")
        server.wait_for_log(f"NATS at 127.0.0.1:{fake.port}: dropped a line without its end")

    def test_a_msg_over_our_own_cap_is_refused_before_its_bytes_whatever_info_claims(self):
        fake = FakeNats(self, max_payload=10 ** 12)  # a broker that claims a terabyte
        server, conn, _ = fake.linked_server()
        ann = Peer(self, server.port)
        self.assertEqual(ann.line(), WELCOME)
        conn.sendall(b"MSG chatroom 1 1048576\r\n" + b"Mallory: flood\n" * 1000)
        server.wait_for_log(f"NATS link to 127.0.0.1:{fake.port} lost: NATS sent a bad MSG line")
        fake.greet()  # it links again, and the room is as it was
        ann.send(b"Ann: still here\n")
        bob = Peer(self, server.port)
        self.assertEqual(bob.line(), WELCOME)
        self.assertLess(peak_rss_mb(server.pid), 60) if resource else None

    def test_a_hostile_info_is_refused_in_one_clean_line(self):
        for info in (b'INFO {"max_payload": 1e999}\r\n', b"INFO [1]\r\n",
                     b"INFO " + b"[" * 8000 + b"]" * 8000 + b"\r\n",
                     b'INFO {"max_payload": "x\x1b[2J"}\r\n'):
            with self.subTest(info=info[:30]):
                fake = FakeNats(self, info=info)
                server = Proc(self, "chat_server.py", "--port", "0", "--nats", f"127.0.0.1:{fake.port}")
                conn, _ = fake.listener.accept()
                self.addCleanup(conn.close)
                conn.sendall(fake.info)
                self.assertEqual(server.wait(), 1)
                error = server.stderr()
                self.assertEqual(error.count("\n"), 1, error)
                self.assertIn(f"error: cannot link to NATS at 127.0.0.1:{fake.port}: NATS sent a bad INFO", error)
                self.assertNotIn("\x1b", error)
                no_traceback(self, error)

    def test_clients_and_the_link_read_in_one_turn_get_no_reader_dropped(self):
        # The server is stopped (SIGSTOP) while four clients send 60 KB each and NATS sends
        # 60 KB of messages; let go, one select() finds them all readable. The turn reads no
        # one more, the link included, once a reader is one read from 256 KiB unsent.
        fake = FakeNats(self)
        server, conn, _ = fake.linked_server()
        reader = a_small_receive_buffer()
        self.addCleanup(reader.close)
        reader.connect(("127.0.0.1", server.port))
        senders = [Peer(self, server.port) for _ in range(4)]
        for sender in senders:
            self.assertEqual(sender.line(), WELCOME)
        while senders[0].line() != b"* a user joined (5 online)":  # everyone is in
            pass
        # First the reader's kernel buffers fill up (it does not read), then 30 KB more wait
        # for it in the server: under 64 KiB, so the room does not wait for it yet.
        path = (server.port, reader.getsockname()[1])

        def relay(lines, mark):  # sender 0 sends lines; the others see them all relayed
            senders[0].send(lines)
            for other in senders[1:]:
                while not other.line().startswith(mark):
                    pass
        step = b"".join(b"%06d " % n + b"f" * 48 + b"\n" for n in range(150))  # 8 KB
        for _ in range(100):
            before = send_queue(*path)
            relay(step, b"000149 ")
            if send_queue(*path) == before:  # full: what the reader is sent waits in outbuf
                break
        relay(step * 4, b"000149 ")  # (the last of four)
        burst = b"".join(b"%06d " % n + b"z" * 48 + b"\n" for n in range(1100))  # 60.5 KB
        piece = b"".join(b"Bob: %05d " % n + b"m" * 43 + b"\n" for n in range(100))  # 5.5 KB
        server.popen.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: server.popen.poll() is None and server.popen.send_signal(signal.SIGCONT))
        for sender in senders:
            sender.sock.setblocking(False)
            self.assertEqual(sender.sock.send(burst), len(burst))
        for _ in range(11):
            conn.sendall(b"MSG chatroom 1 %d\r\n%s\r\n" % (len(piece), piece))
        server.popen.send_signal(signal.SIGCONT)
        reader.setblocking(False)
        got, start, end = bytearray(), time.monotonic(), time.monotonic() + 2 * WAIT
        while got.count(b"z\n") < 4 * 1100 or got.count(b"m\n") < 11 * 100:
            self.assertLess(time.monotonic(), end, f"the reader has {len(got)} bytes")
            socks = [s.sock for s in senders] + ([reader] if time.monotonic() > start + 0.3 else [])
            for sock in select.select(socks, [], [], 0.05)[0]:
                data = sock.recv(1 << 20)  # the senders read what the others send, too
                self.assertTrue(data, "a connection was closed")
                if sock is reader:
                    got += data
        self.assertNotIn("dropped", server.stderr())

    def test_ctrl_c_while_it_waits_for_the_greeting_ends_it_cleanly(self):
        fake = FakeNats(self)
        server = Proc(self, "chat_server.py", "--port", "0", "--nats", f"127.0.0.1:{fake.port}")
        conn, _ = fake.listener.accept()  # the link is in; we never greet it
        self.addCleanup(conn.close)
        server.popen.send_signal(signal.SIGINT)
        self.assertIn(server.wait(), (0, 130, -signal.SIGINT))
        said = server.stderr()
        no_traceback(self, said)
        self.assertNotIn("Exception ignored", said)
        self.assertLessEqual(said.count("\n"), 1, said)

    def test_a_greeting_that_drips_in_byte_by_byte_still_has_one_deadline(self):
        fake = FakeNats(self)
        started = time.monotonic()
        server = Proc(self, "chat_server.py", "--port", "0", "--nats", f"127.0.0.1:{fake.port}",
                      "--handshake-timeout", "1")
        conn, _ = fake.listener.accept()
        self.addCleanup(conn.close)
        for byte in fake.info:  # one byte every 0.2 s: each recv() gets something, in time
            if server.popen.poll() is not None:
                break
            conn.sendall(bytes([byte]))
            time.sleep(0.2)  # the pace of this hostile broker, not a wait for an event
        self.assertEqual(server.wait(), 1)
        self.assertLess(time.monotonic() - started, 1 + 2)  # the deadline is 1 s in all
        self.assertEqual(server.stderr(), f"error: cannot link to NATS at 127.0.0.1:{fake.port}: "
                                          "no greeting in 1 s (is it a NATS server?)\n")

    def test_err_text_from_nats_reaches_the_log_harmlessly(self):
        fake = FakeNats(self)
        server, conn, _ = fake.linked_server()
        conn.sendall(b"-ERR 'bad\x1b[2J\x07\xe2\x80\xae text'\r\n")
        server.wait_for_log("says: 'bad\\x1b[2J\\x07\\u202e text'")
        self.assertNotIn("\x1b", server.stderr())

    @unittest.skipUnless(NATS_SERVER, "needs nats-server (Debian: apt install nats-server)")
    def test_credentials_in_the_url_or_the_environment_and_a_refusal_that_says_so(self):
        for auth, address, env in (
                (["--user", "ann", "--pass", "s3cret-pw"], "nats://ann:s3cret-pw@127.0.0.1:{port}", {}),
                (["--auth", "t0ken-xyz"], "nats://t0ken-xyz@127.0.0.1:{port}", {}),
                (["--auth", "t0ken-xyz"], "127.0.0.1:{port}", {"NATS_TOKEN": "t0ken-xyz"})):
            with self.subTest(auth=auth[0], address=address, env=sorted(env)):
                _, port = start_nats(self, args=auth)
                server = Server(self, "chat_server.py", "--nats", address.format(port=port), env=env)
                server.wait_for_log(f"linked to NATS at 127.0.0.1:{port}")
                self.assertNotIn("s3cret", server.stderr() + server.output)
                self.assertNotIn("t0ken", server.stderr() + server.output)
        _, port = start_nats(self, args=["--user", "ann", "--pass", "s3cret-pw"])
        refused = Proc(self, "chat_server.py", "--port", "0", "--nats",
                       f"nats://ann:wrong-pw@127.0.0.1:{port}")
        self.assertEqual(refused.wait(), 1)
        error = refused.stderr()
        self.assertEqual(error.count("\n"), 1, error)
        self.assertIn(f"error: cannot link to NATS at 127.0.0.1:{port}: authorization failed", error)
        self.assertNotIn("wrong-pw", error)


# ---------------------------------------------------------------------------------------
# Step 6: tls_layer.py (chat_server.py --tls CERT KEY, chat_client.py --tls CAFILE)
# ---------------------------------------------------------------------------------------

OPENSSL = shutil.which("openssl")


def make_certificate(folder, name, names):
    """A self-signed certificate and key, name.pem and name.key in folder, for names (the
    subjectAltName), made as the README says (but with an EC key: quicker to make), so
    that Python 3.13's strict checks take it as well as 3.9's."""
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=" + names.split(",")[0].split(":")[1],
                    "-keyout", os.path.join(folder, name + ".key"), "-out", os.path.join(folder, name + ".pem"),
                    "-addext", "subjectAltName=" + names, "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True, timeout=WAIT)
    return os.path.join(folder, name + ".pem"), os.path.join(folder, name + ".key")


class TlsPeer(Peer):
    """A test client over TLS that trusts cafile: Peer's lines, through ssl's own socket."""

    def __init__(self, test, port, cafile, host="127.0.0.1"):
        context = ssl.create_default_context(cafile=cafile)
        raw = socket.create_connection((host, port), timeout=WAIT)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        test.addCleanup(self.sock.close)
        self.buf = bytearray()


@unittest.skipUnless(OPENSSL, "needs openssl, to make certificates (Debian: apt install openssl)")
class TlsTest(unittest.TestCase):
    """Step 6. CONTRACT.md, chat_server.py's and chat_client.py's --tls: over TLS the room
    keeps every rule it has in plain mode; a client joins once its handshake is done; a
    plain client gets no clear text and the room goes on; the client trusts only the
    certificate it is given, host name included."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix="test_chat.")
        cls.cert, cls.key = make_certificate(cls.folder, "server", "DNS:localhost,IP:127.0.0.1")
        cls.other, _ = make_certificate(cls.folder, "other", "DNS:other.example")
        cls.named, cls.named_key = make_certificate(cls.folder, "named", "DNS:localhost")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder)

    def start(self, *args, cert=None, key=None):
        return Server(self, "chat_server.py", "--tls", cert or self.cert, key or self.key, *args)

    def join(self, server):
        peer = TlsPeer(self, server.port, self.cert)
        self.assertEqual(peer.line(), WELCOME)
        return peer

    def test_lines_cross_over_tls_and_a_client_joins_only_once_its_handshake_is_done(self):
        server = self.start()
        ann = self.join(server)
        waiting = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)  # no hello yet
        self.addCleanup(waiting.close)
        bob = self.join(server)
        self.assertEqual(ann.line(), b"* a user joined (2 online)")  # bob's; the waiting one: none
        ann.send(b"Ann: hello over TLS\nAnn: and a sec")
        ann.send(b"ond line\n")
        self.assertEqual((bob.line(), bob.line()), (b"Ann: hello over TLS", b"Ann: and a second line"))
        bob.send(b"Bob: " + "h\u00e9llo".encode() + b"\r\n")
        self.assertEqual(ann.line(), "Bob: h\u00e9llo".encode())
        waiting.setblocking(False)
        self.assertRaises(BlockingIOError, waiting.recv, 100)  # no clear text, not even a welcome
        self.assertIn("connected (2 online)", server.stderr())

    def test_a_plain_client_gets_no_clear_text_and_is_dropped_while_the_room_goes_on(self):
        server = self.start("--handshake-timeout", "1")
        ann, bob = self.join(server), self.join(server)
        self.assertEqual(ann.line(), b"* a user joined (2 online)")
        plain = Peer(self, server.port)
        plain.send(b"Plain: hello?\n")
        self.assertEqual(plain.read_to_eof(), b"")  # closed, and not a byte of clear text
        server.wait_for_log("dropped: not TLS")
        ann.send(b"Ann: still here\n")
        self.assertEqual(bob.line(), b"Ann: still here")
        silent = Peer(self, server.port)  # says nothing: dropped once its time is up
        self.assertEqual(silent.read_to_eof(), b"")
        server.wait_for_log("dropped: no TLS handshake in 1 s")

    def test_a_handshake_that_drips_in_byte_by_byte_still_has_one_deadline(self):
        server = self.start("--handshake-timeout", "1")
        dripper = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        self.addCleanup(dripper.close)
        hello = b"\x16\x03\x01\x40\x00" + b"\x01" * 0x4000  # a 16 KiB record, never whole
        started = time.monotonic()
        for byte in hello[:25]:  # one byte every 0.2 s: each recv() gets something, in time
            try:
                dripper.sendall(bytes([byte]))
            except OSError:  # (reset: dropped)
                break
            if select.select([dripper], [], [], 0.2)[0]:  # closed by the server
                break
        try:
            self.assertEqual(dripper.recv(100), b"")  # closed, not a byte of clear text
        except ConnectionResetError:  # (closed with our bytes unread: a reset)
            pass
        self.assertLess(time.monotonic() - started, 1 + 2)  # the deadline is 1 s in all
        server.wait_for_log("dropped: no TLS handshake in 1 s")

    def test_a_leavers_last_line_arrives_with_its_goodbye(self):
        server = self.start()
        ann, cy = self.join(server), self.join(server)
        self.assertEqual(ann.line(), b"* a user joined (2 online)")
        cy.send(b"Cy: bye for n")
        cy.send(b"ow")  # no "\n": the close_notify that follows ends the line
        cy.sock.unwrap()
        self.assertEqual((ann.line(), ann.line()), (b"Cy: bye for now", b"* a user left (1 online)"))

    def test_a_tls_client_that_does_not_read_is_dropped_as_too_slow_and_the_room_goes_on(self):
        server = self.start("--stall-budget", "0.5")
        alice, bob = self.join(server), self.join(server)
        stuck = TlsPeer(self, server.port, self.cert)  # joins, then never reads again
        self.assertEqual((alice.line(), alice.line()), (b"* a user joined (2 online)",
                                                        b"* a user joined (3 online)"))
        self.assertEqual(bob.line(), b"* a user joined (3 online)")
        sent, got = [b"%06d " % n + b"x" * 992 for n in range(3000)], []  # 3 MB
        for n in range(0, len(sent), 300):  # far more than the stuck one's buffers hold
            alice.send(b"".join(line + b"\n" for line in sent[n:n + 300]))
            while len(got) < n + 300:  # bob reads all the while
                got.append(bob.line())
        got.append(bob.line())
        self.assertIn(b"* a user left (2 online)", got)  # the stuck one, dropped
        got.remove(b"* a user left (2 online)")
        self.assertEqual(got, sent)  # and bob got every line, in order
        self.assertIn("dropped: too slow", server.stderr())
        self.assertLess(peak_rss_mb(server.pid), 80)

    def test_a_flooder_over_tls_gets_no_reader_dropped_and_every_line_arrives(self):
        server = self.start()
        reader = Proc(self, "chat_client.py", "--host", "127.0.0.1", "--port", str(server.port),
                      "--name", "reader", "--tls", self.cert)
        reader.expect("Welcome to the chatroom!\n")
        flooder = self.join(server)
        lines = [b"%07d " % n + b"f" * 60 + b"\n" for n in range(20000)]  # 1.3 MB, flat out
        flooder.send(b"".join(lines))
        flooder.send(b"END\n")
        reader.expect("\nEND\n", timeout=3 * WAIT)
        got = [row for row in reader.output.split("\n") if row.endswith("f" * 60)]
        self.assertEqual(got, [line.decode().rstrip("\n") for line in lines])
        self.assertNotIn("dropped", server.stderr())

    def test_the_client_chats_over_tls_and_refuses_a_server_it_does_not_trust(self):
        server = self.start()
        ann = self.join(server)
        client = Proc(self, "chat_client.py", "--host", "localhost", "--port", str(server.port),
                      "--name", "John", "--tls", self.cert)
        client.expect("Welcome to the chatroom!\n")
        self.assertEqual(ann.line(), b"* a user joined (2 online)")
        client.type("Hi over TLS\n")
        self.assertEqual(ann.line(), b"John: Hi over TLS")
        ann.send(b"Ann: hello John\n")
        client.expect("Ann: hello John\n")
        client.close_stdin()
        self.assertEqual(client.wait(), 0)
        self.assertEqual(ann.line(), b"* a user left (1 online)")
        named = self.start(cert=self.named, key=self.named_key)  # its name: localhost only
        for cafile, host, port, words in (
                (self.other, "127.0.0.1", server.port, "its certificate is not trusted: self-signed"),
                (self.named, "127.0.0.1", named.port, "its certificate is not trusted: IP address mismatch"),
                (os.path.join(self.folder, "none.pem"), "127.0.0.1", server.port, "none.pem: no such file")):
            with self.subTest(cafile=os.path.basename(cafile), host=host):
                result = subprocess.run(
                    [sys.executable, os.path.join(HERE, "chat_client.py"), "--host", host,
                     "--port", str(port), "--name", "J", "--tls", cafile],
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
                self.assertIn(words, result.stderr)
                self.assertEqual(result.stdout, "")

    def test_openssl_s_client_that_verifies_the_server_chats_with_it(self):
        server = self.start()
        ann = self.join(server)
        tool = subprocess.Popen([OPENSSL, "s_client", "-quiet", "-no_ign_eof", "-verify_return_error",
                                 "-CAfile", self.cert, "-connect", f"127.0.0.1:{server.port}"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: tool.poll() is None and tool.kill() or tool.wait())
        self.addCleanup(tool.stdout.close)
        self.assertEqual(tool.stdout.readline(), WELCOME + b"\n")
        self.assertEqual(ann.line(), b"* a user joined (2 online)")
        tool.stdin.write(b"Tool: hello from s_client\n")
        tool.stdin.close()  # and it leaves
        self.assertEqual((ann.line(), ann.line()), (b"Tool: hello from s_client",
                                                    b"* a user left (1 online)"))

    def test_server_copied_alone_says_what_step_6_needs_and_bad_files_are_one_line(self):
        folder = tempfile.mkdtemp(prefix="test_chat.")
        self.addCleanup(shutil.rmtree, folder)
        shutil.copy(os.path.join(HERE, "chat_server.py"), folder)
        for script, args, words in (
                (os.path.join(folder, "chat_server.py"), [self.cert, self.key],
                 "error: --tls needs tls_layer.py beside chat_server.py"),
                (os.path.join(HERE, "chat_server.py"), [self.cert, self.named_key],
                 "key values mismatch"),
                (os.path.join(HERE, "chat_server.py"), [self.cert, os.path.join(folder, "no.key")],
                 "no.key: no such file or directory")):
            with self.subTest(words=words):
                result = subprocess.run([sys.executable, script, "--port", "0", "--tls", *args],
                                        stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                        timeout=WAIT)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
                self.assertIn(words, result.stderr)


# ---------------------------------------------------------------------------------------
# What all the scripts share: both servers alike, the command line, the load generator,
# and the Windows build of Python
# ---------------------------------------------------------------------------------------

class EveryServerTests:
    """Both servers alike. CONTRACT.md, "All four scripts" and "Servers": start and the
    listening line, stop on SIGINT/SIGTERM/SIGHUP, a log that cannot take a server down,
    port in use, hosts that do not resolve, IPv6, an idle loop that sleeps, and capacity
    (FD_SETSIZE, --max-clients, running out of descriptors). Mixed into one test class per
    server, which names the script and says how to tell a served connection from a refused one."""

    script = None

    @classmethod
    def setUpClass(cls):
        # The capacity tests below open 1100 connections, so we need more than 1024 files.
        if resource:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != resource.RLIM_INFINITY and soft < 2500 and (
                    hard == resource.RLIM_INFINITY or hard >= 2500):
                resource.setrlimit(resource.RLIMIT_NOFILE, (2500, hard))

    def connect_1100(self, port):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < 2500:
            self.skipTest("needs 2500 open files")
        return self.connect_many(port, 1100)

    def is_refused(self, peer):
        raise NotImplementedError

    def refused(self, peers):
        """is_refused() for each peer, in order."""
        return [self.is_refused(peer) for peer in peers]

    def test_first_line_names_the_real_port(self):
        server = Server(self, self.script)
        self.assertEqual(server.host, "127.0.0.1")
        self.assertNotEqual(server.port, 0)
        self.assertFalse(self.is_refused(Peer(self, server.port)))

    def test_sigint_sigterm_and_sighup_exit_0_without_a_traceback(self):
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
            with self.subTest(signal=sig.name):
                server = Server(self, self.script)
                peer = Peer(self, server.port)
                self.assertFalse(self.is_refused(peer))
                self.assertEqual(server.stop(sig), 0)
                self.assertEqual(peer.read_to_eof(), b"")  # its socket was closed
                no_traceback(self, server.stderr())

    def test_a_full_stdout_and_a_write_only_stdin_cost_nothing_and_ctrl_c_still_ends_it(self):
        # As nohup can leave them: stdin open for writing only, stdout a full disk (so the
        # listening line is lost: we give the port).
        port = free_port()
        with open(os.devnull, "w") as stdin, open("/dev/full", "w") as stdout:
            server = subprocess.Popen(
                [sys.executable, os.path.join(HERE, self.script), "--port", str(port)],
                stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, preexec_fn=with_default_sigint())
        self.addCleanup(lambda: server.poll() is None and server.kill() or server.wait())
        self.addCleanup(server.stderr.close)
        first = server.stderr.readline().decode()  # the log's first line, once it listens
        self.assertIn("serving up to", first)
        self.assertFalse(self.is_refused(Peer(self, port)))
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.wait(timeout=WAIT), 0)
        said = first + server.stderr.read().decode()
        no_traceback(self, said)
        self.assertNotIn("Exception ignored", said)

    # The log never takes a server down. A line that stderr cannot take now is dropped
    # and counted; the server goes on serving, and stops at once when asked.

    def churn(self, server, n):
        """n clients in a row connect, are served and leave: two log lines each."""
        for _ in range(n):
            peer = Peer(self, server.port)
            self.assertFalse(self.is_refused(peer))
            peer.sock.close()

    def serves_and_stops_at_once(self, server):
        self.assertFalse(self.is_refused(Peer(self, server.port)))
        server.popen.send_signal(signal.SIGTERM)
        self.assertEqual(server.wait(timeout=2), 0)

    def test_a_log_pipe_whose_reader_has_gone_costs_log_lines_not_the_server(self):
        read_end, write_end = os.pipe()
        os.close(read_end)  # as with 2>&1 | head -1, once head has its line and exits
        try:
            server = Server(self, self.script, stderr=write_end)
        finally:
            os.close(write_end)
        self.churn(server, 5)
        self.serves_and_stops_at_once(server)

    @needs_linux_limits
    def test_a_log_file_at_its_size_limit_costs_log_lines_not_the_server(self):
        def limit_file_size():  # as a full disk would, without filling one
            os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
            resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
        with tempfile.TemporaryFile() as log_file:
            server = Server(self, self.script, stderr=log_file, preexec_fn=limit_file_size)
            self.churn(server, 10)
            self.serves_and_stops_at_once(server)
            self.assertEqual(os.fstat(log_file.fileno()).st_size, 300)

    @unittest.skipUnless(fcntl and sys.platform.startswith("linux"), "sets a pipe's size (Linux)")
    def test_a_log_pipe_nobody_reads_costs_log_lines_and_later_says_how_many(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # full in a few dozen lines
        try:
            server = Server(self, self.script, stderr=write_end)
        finally:
            os.close(write_end)
        self.churn(server, 100)  # 200 log lines: twice what the pipe holds, and nobody reads
        os.set_blocking(read_end, False)
        self.assertNotIn(b"lost", os.read(read_end, 65536))  # now someone reads it all
        self.churn(server, 1)
        later = bytearray()

        def read_later():
            if select.select([read_end], [], [], 0)[0]:
                later.extend(os.read(read_end, 65536))
            return b"log lines lost)\n" in later
        wait_until(read_later, "the count of lost log lines")
        self.serves_and_stops_at_once(server)

    def test_the_first_log_line_says_how_many_clients_it_serves_in_plain_english(self):
        for seats, words in (("1", "serving up to 1 client at once"),
                             ("2", "serving up to 2 clients at once")):
            with self.subTest(seats=seats):
                Server(self, self.script, "--max-clients", seats).wait_for_log(words)

    def test_port_in_use_is_a_one_line_error_and_exit_1(self):
        server = Server(self, self.script)
        second = Proc(self, self.script, "--port", str(server.port))
        self.assertEqual(second.wait(), 1)
        error = second.stderr()
        self.assertEqual(error.count("\n"), 1, error)
        self.assertIn(f"error: cannot listen on 127.0.0.1:{server.port}: address already in use", error)

    def test_restart_right_after_a_stop_gets_the_same_port(self):
        server = Server(self, self.script)
        self.assertFalse(self.is_refused(Peer(self, server.port)))
        self.assertEqual(server.stop(), 0)  # the server closes first: its side is in TIME_WAIT
        again = Proc(self, self.script, "--port", str(server.port))
        again.expect(f"listening on 127.0.0.1:{server.port}\n")

    def test_host_that_does_not_resolve_is_a_clear_error(self):
        proc = Proc(self, self.script, "--host", "no-such-host.invalid")
        self.assertEqual(proc.wait(), 1)
        self.assertIn("error: cannot resolve host 'no-such-host.invalid'", proc.stderr())
        no_traceback(self, proc.stderr())

    def test_listens_on_ipv6(self):
        try:  # only a machine without IPv6 on loopback skips: a server that fails, fails
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except (OSError, AttributeError):
            self.skipTest("this machine has no IPv6 on loopback (::1)")
        server = Server(self, self.script, "--host", "::1")
        self.assertEqual(server.host, "[::1]")
        self.assertFalse(self.is_refused(Peer(self, server.port, host="::1")))

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_idle_server_uses_no_cpu(self):
        # After a burst of traffic, every output buffer is empty: the loop must then wait in
        # select() for the next event, not wake again and again because sockets are writable.
        server = Server(self, self.script)
        peers = [Peer(self, server.port) for _ in range(5)]
        for peer in peers:
            self.assertFalse(self.is_refused(peer))
        before = cpu_seconds(server.pid)
        time.sleep(0.3)  # a measuring window, not a wait for an event
        self.assertLess(cpu_seconds(server.pid) - before, 0.05, "the idle loop spins")

    # select() cannot watch descriptors of FD_SETSIZE (1024) or more, and a process may run
    # out of descriptors before that. A server must survive both.

    def connect_many(self, port, n):
        return [Peer(self, port) for _ in range(n)]

    def served_limit(self, server):
        server.wait_for_log("serving up to")
        return int(re.search(r"serving up to (\d+) clients", server.stderr()).group(1))

    @needs_linux_limits
    def test_1100_connections_in_a_row_fill_the_default_limit_and_the_rest_are_refused(self):
        server = Server(self, self.script)
        limit = self.served_limit(server)
        self.assertTrue(900 <= limit <= 1024 - 4, f"default --max-clients is {limit}")
        peers = self.connect_1100(server.port)
        refused = self.refused(peers)
        self.assertEqual(refused.count(False), limit)
        self.assertEqual(refused[:limit], [False] * limit)  # first come, first served
        for peer in peers:
            peer.sock.close()
        server.wait_for_log("(0 online)")  # every client has left
        self.assertFalse(self.is_refused(Peer(self, server.port)))
        self.assertIsNone(server.popen.poll())

    @needs_linux_limits
    def test_a_max_clients_above_fd_setsize_cannot_crash_select(self):
        server = Server(self, self.script, "--max-clients", "5000")
        peers = self.connect_1100(server.port)
        refused = self.refused(peers)
        self.assertGreater(refused.count(True), 0)
        self.assertLess(refused.count(False), 1024)
        self.assertIsNone(server.popen.poll(), "the server died")

    @needs_linux_limits
    def test_default_limit_stays_under_the_descriptor_limit(self):
        server = Server(self, self.script, preexec_fn=limit_open_files(100))
        limit = self.served_limit(server)
        self.assertLess(limit, 100)
        refused = self.refused(self.connect_many(server.port, limit + 20))
        self.assertEqual(refused.count(False), limit)
        self.assertNotIn("cannot accept", server.stderr())

    @needs_linux_limits
    def test_running_out_of_descriptors_is_logged_and_survived_without_spinning(self):
        server = Server(self, self.script, "--max-clients", "500", preexec_fn=limit_open_files(40))
        peers = self.connect_many(server.port, 60)
        server.wait_for_log("cannot accept: Too many open files")
        before = cpu_seconds(server.pid)
        time.sleep(0.3)  # a measuring window, not a wait for an event
        self.assertLess(cpu_seconds(server.pid) - before, 0.1, "the loop spins on EMFILE")
        for peer in peers[:30]:  # free some descriptors: the queued connections get in
            peer.sock.close()
        for peer in peers[30:]:
            self.assertFalse(self.is_refused(peer))


class EchoServerCommonTest(EveryServerTests, unittest.TestCase):
    """What both servers must do alike, for echo_server.py."""
    script = "echo_server.py"

    def is_refused(self, peer):
        """True if the server closed this connection, False if it echoes a byte back."""
        return self.refused([peer])[0]

    def refused(self, peers):
        for peer in peers:  # ask them all first, then read the answers: one round trip
            try:
                peer.send(b"?")
            except (ConnectionResetError, BrokenPipeError):
                pass
        answers = []
        for peer in peers:
            try:
                answers.append(peer.sock.recv(1) == b"")
            except ConnectionResetError:
                answers.append(True)
        return answers


class ChatServerCommonTest(EveryServerTests, unittest.TestCase):
    """What both servers must do alike, for chat_server.py."""
    script = "chat_server.py"

    def is_refused(self, peer):
        """True if the server says it is full, False if it welcomes us."""
        line = peer.line()
        self.assertIn(line, (WELCOME, b"error: server full, try again later"))
        return line != WELCOME



class CommandLineTest(unittest.TestCase):
    """All four scripts. CONTRACT.md, "All four scripts": -h explains every option, bad
    hosts are clear errors, and the clients reach a server on localhost however it resolves."""

    def run_script(self, script, *args):
        return subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=WAIT)

    def test_help_explains_every_option(self):
        options = {"echo_server.py": ["--host", "--port", "--max-clients", "--drain-timeout"],
                   "chat_server.py": ["--host", "--port", "--max-clients", "--drain-timeout",
                                      "--stall-budget", "--handshake-timeout", "--nats", "--tls"],
                   "echo_client.py": ["--host", "--port"],
                   "chat_client.py": ["--host", "--port", "--name", "--linger", "--tls"]}
        for script, names in options.items():
            with self.subTest(script=script):
                result = self.run_script(script, "-h")
                self.assertEqual(result.returncode, 0)
                usage = result.stdout.split("\n\n")[0]
                self.assertEqual(sorted(set(re.findall(r"--[a-z-]+", usage))), sorted(names))
                for name in names:
                    self.assertRegex(result.stdout, rf"{name} \S+\s+\w")  # the option, then words
                self.assertIn("7007", result.stdout)
        self.assertRegex(self.run_script("chat_client.py", "-h").stdout,
                         r"--linger SECONDS\s+from a pipe[^-]*\(default: 5\.0\)")

    def test_odd_values_on_a_servers_command_line_are_one_clear_line_never_a_traceback(self):
        for script, args, status, words in (
                ("echo_server.py", ["--host", "a..b"], 1, "error: cannot resolve host 'a..b'"),
                ("chat_server.py", ["--host", "a..b"], 1, "error: cannot resolve host 'a..b'"),
                ("echo_server.py", ["--drain-timeout", "nan"], 2, "--drain-timeout: must be a number"),
                ("chat_server.py", ["--drain-timeout", "inf"], 2, "--drain-timeout: must be a number"),
                ("chat_server.py", ["--stall-budget", "-1"], 2, "--stall-budget: must be a number"),
                ("chat_server.py", ["--nats", "x:\u00b2"], 1, "error: --nats x:\u00b2: must be HOST:PORT"),
                ("chat_server.py", ["--nats", "nats://ann:s3cret@:0"], 1, "error: --nats nats://...@:0")):
            with self.subTest(script=script, args=args):
                result = self.run_script(script, "--port", "0", *args)
                self.assertEqual(result.returncode, status, result.stderr)
                self.assertIn(words, result.stderr)
                self.assertNotIn("s3cret", result.stderr)
                no_traceback(self, result.stderr)
                if status == 1:
                    self.assertEqual(result.stderr.count("\n"), 1, result.stderr)

    def test_clients_say_when_the_host_does_not_resolve(self):
        for script, *args in (("echo_client.py",), ("chat_client.py", "--name", "J")):
            for host in ("no-such-host.invalid", "a..b"):  # a..b: not even a host name
                with self.subTest(script=script, host=host):
                    result = self.run_script(script, "--host", host, *args)
                    self.assertEqual(result.returncode, 1)
                    self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
                    self.assertIn(f"error: cannot resolve host '{host}'", result.stderr)

    def test_clients_reach_a_server_on_localhost_whichever_address_it_means_first(self):
        server = Server(self, "echo_server.py")
        client = Proc(self, "echo_client.py", "--host", "localhost", "--port", str(server.port))
        client.type("over localhost\nquit\n")
        self.assertIn("recv: over localhost\n", client.read_to_end())
        self.assertEqual(client.wait(), 0)


# ---------------------------------------------------------------------------------------
# bench/loadtest.py: not part of the tests' job, but run at a tiny size so it cannot rot
# ---------------------------------------------------------------------------------------

LOADTEST = os.path.join(HERE, "bench", "loadtest.py")


def table_rows(report, test):
    """{"row name": "value"} for one test's table in loadtest's report (one server column)."""
    section = report.split(f"\n{test}: ", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^  (\S.*?)  +(\S+)$", section, re.MULTILINE))


class LoadTestTest(unittest.TestCase):
    """bench/loadtest.py, at a tiny size, so that it cannot rot: it measures every test,
    counts what goes wrong, and drives linked servers (CONTRACT.md's figures are its job)."""

    def test_at_a_tiny_size_it_measures_every_test_and_finds_nothing_wrong(self):
        def command(script, *args):
            return " ".join(shlex.quote(word) for word in
                            (sys.executable, os.path.join(HERE, script), *args, "--port")) + " {port}"
        result = subprocess.run(
            [sys.executable, LOADTEST, "--seconds", "0.1", "--clients", "5", "--senders", "2",
             "--rate", "200", "--hold", "8", "--hold-extra", "2", "--rtt-connections", "3", "--idle", "2",
             "--chat", command("chat_server.py", "--max-clients", "8"),
             "--echo", command("echo_server.py")],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        headline = {"fanout": "deliveries/s", "latency": "p50 ms", "bulk": "MB/s",
                    "rtt1": "round trips/s", "rtt50": "round trips/s"}
        for test, row in headline.items():
            with self.subTest(test=test):
                rows = table_rows(result.stdout, test)
                self.assertGreater(float(rows[row].replace(",", "")), 0, rows)
                self.assertEqual(rows["errors"], "none")
        rows = table_rows(result.stdout, "hold")
        self.assertEqual((rows["clients held"], rows["refused politely"], rows["one line reached"]),
                         ("8", "2", "7"), rows)

    @unittest.skipUnless(OPENSSL, "needs openssl, to make a certificate")
    def test_its_tls_column_measures_fanout_and_latency_over_tls_and_finds_nothing_wrong(self):
        result = subprocess.run(
            [sys.executable, LOADTEST, "--seconds", "0.1", "--clients", "5", "--senders", "2",
             "--rate", "200", "--only", "fanout,latency", "--tls", "--chat",
             " ".join(shlex.quote(word) for word in
                      (sys.executable, os.path.join(HERE, "chat_server.py"), "--port")) + " {port}"],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for test, row in (("fanout", "deliveries/s"), ("latency", "p50 ms")):
            section = result.stdout.split(f"\n{test}: ", 1)[1].split("\n\n", 1)[0]
            self.assertIn("chat_server.py --tls", section)
            cells = dict((line.split()[0] if not line.startswith("  ") else line[:26].strip(),
                          line[26:].split()) for line in section.splitlines()[1:])
            self.assertGreater(float(cells[row][-1].replace(",", "")), 0, section)
            self.assertEqual(cells["errors"], ["none", "none"], section)

    @unittest.skipUnless(NATS_SERVER,
                         "needs nats-server (Debian: apt install nats-server)")
    def test_its_cluster_of_linked_servers_holds_and_checks_every_line(self):
        result = subprocess.run(
            [sys.executable, LOADTEST, "--seconds", "0.1", "--clients", "6", "--senders", "2",
             "--rate", "200", "--hold", "12", "--hold-extra", "2", "--only", "fanout,latency,hold",
             "--chat", " ".join(shlex.quote(word) for word in
                                (sys.executable, os.path.join(HERE, "chat_server.py"), "--port")) + " {port}",
             "--cluster", "3"],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        def cluster(test):  # the rows of one test's table, the last column: the cluster's
            section = result.stdout.split(f"\n{test}: ", 1)[1].split("\n\n", 1)[0]
            return {cells[0]: cells[-1] for cells in
                    (re.split(r"  +", line.strip()) for line in section.split("\n")[2:])}
        self.assertGreater(float(cluster("fanout")["deliveries/s"].replace(",", "")), 0)
        self.assertGreater(float(cluster("latency")["p50 ms, across servers"]), 0)
        hold = cluster("hold")
        self.assertEqual((hold["clients held"], hold["one line reached"]), ("14", "13"), hold)
        for test in ("fanout", "latency", "hold"):
            self.assertEqual(cluster(test)["errors"], "none", result.stdout)

    def test_it_counts_lost_duplicated_reordered_sent_back_and_garbled_lines(self):
        spec = importlib.util.spec_from_file_location("loadtest", LOADTEST)
        loadtest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loadtest)
        ledger, streams = loadtest.Ledger(2, 3), loadtest.Streams(2)  # senders 0, 1; receiver 2

        def line(sender, k):
            return streams.get(sender, k + 1)[loadtest.WIDTH * k:loadtest.WIDTH * (k + 1)]

        def receive(receiver, *lines):
            loadtest.check_fanout_chunk(b"".join(lines), receiver, ledger, streams, 2)

        receive(2, line(0, 0), line(0, 1), line(1, 0))  # all well
        receive(2, line(0, 3), line(0, 2), line(0, 2))  # 3 before 2, then 2 again
        receive(0, line(0, 0))                          # back to its own sender
        receive(1, b"* a user joined (3 online)\n", b"no such line\n")
        ledger.count_lost([5, 1])  # sent: 5 lines by sender 0, 1 by sender 1
        # Lost: receiver 2 misses line 4 of sender 0; receiver 1 misses all 5; receiver 0
        # misses sender 1's line.
        self.assertEqual(ledger.counts, {"delivered": 7, "lost": 7, "duplicated": 1, "reordered": 1,
                                         "sent back": 1, "garbled": 1})


# ---------------------------------------------------------------------------------------
# Windows: the scripts under the Windows build of CPython, run by Wine. The harness stays
# here in Linux Python (it selects on pipes, which Windows cannot do); it talks to the
# scripts over sockets, pipes and a terminal (tmux). .ci/setup-wine installs Wine and the
# Windows Python into WINPY_HOME.
# ---------------------------------------------------------------------------------------

WINPY_HOME = os.environ.get("WINPY_HOME", "/var/tmp/winpy")
WINE_PYTHON = os.path.join(WINPY_HOME, "py", "cp313", "python.exe")
WINE_ENV = {**{name: value for name, value in os.environ.items() if not name.startswith("PYTHON")},
            "WINEPREFIX": os.path.join(WINPY_HOME, "prefix"), "WINEDEBUG": "-all",
            "WINEDLLOVERRIDES": "mscoree=;mshtml="}  # no Mono or Gecko install prompts


def why_no_windows():
    """Why the Windows tests cannot run here, or "" if they can."""
    if not WINPY_HOME:
        return "WINPY_HOME is empty: the Windows tests are turned off"
    missing = [tool for tool in ("wine", "wineserver", "tmux") if not shutil.which(tool)]
    if missing or not os.path.exists(WINE_PYTHON):
        return (f"needs Wine, tmux and the Windows build of Python in {WINPY_HOME} "
                f"(missing: {', '.join(missing) or WINE_PYTHON}); .ci/setup-wine installs them")
    return ""


# Run before the script in a console. Wine copies the terminal's keys into its console
# only once a process has waited on the console's input handle, so until then kbhit()
# sees nothing. Real Windows needs no such thing.
CONSOLE_SHIM = """
import ctypes, runpy, sys
kernel32 = ctypes.windll.kernel32
kernel32.WaitForSingleObject(kernel32.GetStdHandle(-10), 0)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Run before a script to feed it through a pipe made by Windows (as cmd.exe's "a | b"
# does), line by line from ours. Wine's pipes from Linux cannot be peeked into
# (PeekNamedPipe fails), so a script polling one would wait in read().
PIPE_SHIM = """
import subprocess, sys
child = subprocess.Popen([sys.executable, *sys.argv[1:]], stdin=subprocess.PIPE)
for line in iter(sys.stdin.buffer.readline, b""):
    child.stdin.write(line)
    child.stdin.flush()
child.stdin.close()
sys.exit(child.wait())
"""


class Console:
    """A script under Windows Python in a console: Wine draws the console in a tmux
    pane, we type into it and read the screen."""

    def __init__(self, test, shim, script, *args, columns=80):
        self.tmux = ["tmux", "-L", f"chat-test-{os.getpid()}-{id(self)}", "-f", "/dev/null"]
        command = shlex.join(["wine", WINE_PYTHON, shim, script, *args])
        subprocess.run([*self.tmux, "new-session", "-d", "-x", str(columns), "-y", "24", "-c", HERE,
                        f"{command}; echo EXIT=$?; sleep {3 * WAIT}"],
                       env=WINE_ENV, check=True, timeout=WAIT)
        test.addCleanup(self.close)
        self.shell = int(self.run("display-message", "-p", "#{pane_pid}"))

    def run(self, *args):
        return subprocess.run([*self.tmux, *args], capture_output=True, text=True,
                              timeout=WAIT).stdout

    def screen(self):
        """The screen as text: its rows, without trailing blank rows."""
        return self.run("capture-pane", "-p").rstrip("\n")

    def expect(self, text):
        screens = []
        wait_until(lambda: screens.append(self.screen()) or text in screens[-1],
                   f"{text!r} on the screen; last seen:\n{screens[-1] if screens else ''}")

    def type(self, text):
        self.run("send-keys", "-l", text)

    def press(self, *keys):
        self.run("send-keys", *keys)

    def exit_status(self):
        self.expect("EXIT=")
        return int(re.search(r"EXIT=(\d+)", self.screen()).group(1))

    def close(self):
        """Stop what runs in the pane (wine, if still there), then tmux."""
        try:
            with open(f"/proc/{self.shell}/task/{self.shell}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.run("kill-server")


class UnderWine:
    """The four scripts with Windows semantics: select() on sockets only, msvcrt, WinError
    codes, cp1252 pipes. Wine runs them over Linux's TCP stack, so this is not Windows,
    but it is the real Windows build of Python. Mixed into two test classes, the servers
    and the clients, which run side by side."""

    @classmethod
    def setUpClass(cls):
        quiet = dict(env=WINE_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        # One Wine server for all the tests, not one start (3 s) each. It ends by itself
        # 5 s after the last Windows process.
        subprocess.run(["wineserver", "-p5"], timeout=WAIT, **quiet)
        subprocess.run(["wine", "wineboot"], timeout=6 * WAIT, **quiet)
        cls.folder = tempfile.mkdtemp(prefix="test_chat.")
        cls.shim = os.path.join(cls.folder, "console_shim.py")
        cls.pipe_shim = os.path.join(cls.folder, "pipe_shim.py")
        for path, code in ((cls.shim, CONSOLE_SHIM), (cls.pipe_shim, PIPE_SHIM)):
            with open(path, "w") as f:
                f.write(code)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder)

    def chat_room(self):
        """A Linux chat server with someone in the room."""
        server = Server(self, "chat_server.py")
        other = Peer(self, server.port)
        self.assertEqual(other.line(), WELCOME)
        return server, other



@unittest.skipIf(why_no_windows(), why_no_windows())
class WindowsServerTest(UnderWine, unittest.TestCase):
    """CONTRACT.md, "Servers", under Windows Python: both servers serve, stop on Ctrl-C, say
    "address already in use" as on Linux, stay within the 512 sockets select() can watch,
    and link through NATS."""

    def test_chat_server_relays_between_linux_clients_and_ctrl_c_stops_it(self):
        server = Server(self, "chat_server.py", windows=True)
        ann, bob = Peer(self, server.port), Peer(self, server.port)
        self.assertEqual((ann.line(), ann.line()), (WELCOME, b"* a user joined (2 online)"))
        self.assertEqual(bob.line(), WELCOME)
        ann.send(b"Ann: hi\r\n")
        self.assertEqual(bob.line(), b"Ann: hi")
        bob.send(b"Bob: hel")
        bob.send(b"lo\n")
        self.assertEqual(ann.line(), b"Bob: hello")  # not her own line first: never sent back
        bob.sock.close()
        self.assertEqual(ann.line(), b"* a user left (1 online)")
        self.assertEqual(server.stop(signal.SIGINT), 0)  # Wine delivers it as Ctrl-C
        output = server.read_to_end()
        self.assertTrue(output.endswith("shutting down\n"), output)
        no_traceback(self, output)

    def test_echo_server_echoes_a_megabyte_and_ctrl_c_stops_it(self):
        server = Server(self, "echo_server.py", windows=True)
        peer = Peer(self, server.port)
        payload = os.urandom(1 << 20)
        self.assertEqual(transfer(peer.sock, payload), payload)
        peer.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(peer.read_to_eof(), b"")  # half-close: all sent, then it closes
        self.assertEqual(server.stop(signal.SIGINT), 0)
        no_traceback(self, server.read_to_end())

    def test_a_port_in_use_is_reported_in_the_same_words_as_on_linux(self):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = str(holder.getsockname()[1])
            for script in ("echo_server.py", "chat_server.py"):
                with self.subTest(script=script):
                    linux = Proc(self, script, "--port", port)
                    self.assertEqual(linux.wait(), 1)
                    windows = Proc(self, script, "--port", port, windows=True)
                    self.assertEqual(windows.wait(), 1)
                    self.assertIn("address already in use", linux.stderr())
                    self.assertEqual(windows.read_to_end(), linux.stderr())
        # Two servers under Windows Python: the second is refused. (Wine binds by Linux's
        # rules, so what SO_REUSEADDR would do on Windows, where we leave it off, is not
        # tested here.)
        first = Server(self, "echo_server.py", windows=True)
        second = Proc(self, "chat_server.py", "--port", str(first.port), windows=True)
        self.assertEqual(second.wait(), 1)
        self.assertIn("address already in use (is another server running?)", second.read_to_end())

    def test_servers_stay_within_the_512_sockets_that_select_can_watch_on_windows(self):
        server = Server(self, "chat_server.py", windows=True)
        server.expect("serving up to 488 clients at once")  # 512, less some to spare
        server = Server(self, "chat_server.py", "--max-clients", "1000", windows=True)
        peers = [Peer(self, server.port) for _ in range(530)]
        first_lines = [peer.line() for peer in peers]
        self.assertEqual(first_lines.count(WELCOME), 511)  # and the listener: 512
        self.assertEqual(first_lines.count(b"error: server full, try again later"), 19)
        peers[0].send(b"still here\n")
        self.assertEqual(peers[510].line(), b"still here")  # the last one seated

    @unittest.skipUnless(NATS_SERVER, "needs nats-server (Debian: apt install nats-server)")
    def test_chat_server_links_through_nats_and_links_again_after_it_restarts(self):
        nats, port = start_nats(self)
        windows = Server(self, "chat_server.py", "--nats", f"127.0.0.1:{port}", windows=True)
        linux = Server(self, "chat_server.py", "--nats", f"127.0.0.1:{port}")
        ann, bob = Peer(self, windows.port), Peer(self, linux.port)
        self.assertEqual((ann.line(), bob.line()), (WELCOME, WELCOME))
        self.assertEqual(ann.line(), f"* a user joined (1 online on {HOSTNAME}:{linux.port})".encode())
        stop_nats(nats)
        windows.expect(f"NATS link to 127.0.0.1:{port} lost")
        start_nats(self, port)
        windows.expect(f"NATS link to 127.0.0.1:{port} is back")
        linux.wait_for_log(f"NATS link to 127.0.0.1:{port} is back")
        bob.send(b"Bob: hello Windows\n")
        self.assertEqual(ann.line(), b"Bob: hello Windows")



@unittest.skipIf(why_no_windows(), why_no_windows())
class WindowsClientTest(UnderWine, unittest.TestCase):
    """CONTRACT.md, "Clients", the Windows item: the clients under Windows Python, from a
    pipe and in a console (select() on the socket, keys from msvcrt)."""

    def test_echo_client_from_a_pipe(self):
        server = Server(self, "echo_server.py")
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1", "--port", str(server.port),
                      windows=True)
        client.type("hello\n")
        client.expect("recv: hello\n")
        client.type("quit\n")
        self.assertEqual(client.read_to_end(), "send: recv: hello\nsend: ")
        self.assertEqual(client.wait(), 0)

    def test_chat_client_from_a_pipe_reads_each_line_as_it_comes(self):
        server, other = self.chat_room()
        client = Proc(self, self.pipe_shim, "chat_client.py", "--host", "127.0.0.1",
                      "--port", str(server.port), windows=True)
        client.type("Ann\n")
        client.expect("Welcome to the chatroom!\n")
        self.assertEqual(other.line(), b"* a user joined (2 online)")
        client.type("hi from a pipe\n")  # select() cannot see the pipe: it is polled
        self.assertEqual(other.line(), b"Ann: hi from a pipe")
        other.send(b"Bob: hello Ann\n")
        client.expect("Bob: hello Ann\n")
        client.type("quit\n")
        self.assertEqual(other.line(), b"* a user left (1 online)")  # quit, not the end of input
        client.close_stdin()  # which the pipe's feeder waits for
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.read_to_end())

    @unittest.skipUnless(OPENSSL, "needs openssl, to make a certificate")
    def test_chat_client_over_tls_checks_the_certificate_and_chats(self):
        cert, key = make_certificate(self.folder, "server", "DNS:localhost,IP:127.0.0.1")
        other_cert, _ = make_certificate(self.folder, "other", "DNS:other.example")
        server = Server(self, "chat_server.py", "--tls", cert, key)
        other = TlsPeer(self, server.port, cert)
        self.assertEqual(other.line(), WELCOME)
        client = Proc(self, self.pipe_shim, "chat_client.py", "--host", "127.0.0.1", "--port",
                      str(server.port), "--name", "Ann", "--tls", cert, windows=True)
        client.expect("Welcome to the chatroom!\n")
        self.assertEqual(other.line(), b"* a user joined (2 online)")
        client.type("hi over TLS\n")
        self.assertEqual(other.line(), b"Ann: hi over TLS")
        other.send(b"Bob: hello Ann\n")
        client.expect("Bob: hello Ann\n")
        client.close_stdin()
        self.assertEqual(other.line(), b"* a user left (1 online)")
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.read_to_end())
        refused = Proc(self, self.pipe_shim, "chat_client.py", "--host", "127.0.0.1", "--port",
                       str(server.port), "--name", "Ann", "--tls", other_cert, windows=True)
        refused.close_stdin()
        self.assertEqual(refused.wait(), 1)
        said = refused.read_to_end()
        self.assertIn("its certificate is not trusted", said)
        no_traceback(self, said)

    def test_chat_client_in_a_console_keeps_the_typed_line_and_edits_it(self):
        server, other = self.chat_room()
        console = Console(self, self.shim, "chat_client.py", "--host", "127.0.0.1",
                          "--port", str(server.port))
        console.expect("name:")  # (tmux drops the space at the end of a row)
        console.type("Ann")
        console.expect("name: Ann")
        console.press("Enter")
        console.expect("Welcome to the chatroom!")
        self.assertEqual(other.line(), b"* a user joined (2 online)")
        console.type("half a l")
        console.press("Left", "Up", "Delete")  # arrows and the like are skipped
        console.type("ine")
        console.expect("half a line")
        other.send(b"Bob: a line arrives\n")
        console.expect("Bob: a line arrives\nhalf a line")  # above what we type, intact
        console.type("junk")
        console.press("BSpace", "BSpace", "BSpace", "BSpace")
        console.type("!")
        console.expect("half a line!")
        console.press("Enter")
        self.assertEqual(other.line(), b"Ann: half a line!")
        console.type("all of this goes")
        console.expect("all of this goes")
        console.press("C-u")
        console.type("quit")
        console.press("Enter")
        self.assertEqual(console.exit_status(), 0)
        self.assertEqual(other.line(), b"* a user left (1 online)")
        self.assertNotIn("Traceback", console.screen())
        self.assertEqual(console.screen().split("\n")[:5],
                         ["name: Ann", "Welcome to the chatroom!", "Bob: a line arrives",
                          "Ann: half a line!", "EXIT=0"])

    def test_chat_client_in_a_console_keeps_a_long_typed_line_on_one_row(self):
        server, other = self.chat_room()
        console = Console(self, self.shim, "chat_client.py", "--host", "127.0.0.1",
                          "--port", str(server.port), "--name", "Ann", columns=30)
        console.expect("Welcome to the chatroom!")
        self.assertEqual(other.line(), b"* a user joined (2 online)")
        console.type("a line too long for thirty")
        console.expect("a line too long for thirty")
        console.type(" columns")  # now 34 characters: we show the end, in 29 columns
        console.expect("too long for thirty columns")
        other.send(b"Bob: one\n")
        console.expect("Bob: one")
        other.send(b"Bob: two\n")
        console.expect("Bob: two\ne too long for thirty columns")
        self.assertEqual(console.screen().split("\n"),
                         ["Welcome to the chatroom!", "Bob: one", "Bob: two",
                          "e too long for thirty columns"])  # nothing above it was wiped
        console.press("Enter")
        self.assertEqual(other.line(), b"Ann: a line too long for thirty columns")
        console.press("C-c")
        self.assertEqual(console.exit_status(), 0)
        self.assertNotIn("Traceback", console.screen())

    def test_chat_client_in_a_console_says_at_once_when_the_server_refuses_it(self):
        server = Server(self, "chat_server.py", "--max-clients", "1")
        seated = Peer(self, server.port)
        self.assertEqual(seated.line(), WELCOME)
        console = Console(self, self.shim, "chat_client.py", "--host", "127.0.0.1",
                          "--port", str(server.port))
        self.assertEqual(console.exit_status(), 1)  # while it asks the name
        self.assertEqual(console.screen().split("\n")[:4],
                         ["name:", "error: server full, try again later",
                          "server closed the connection", "EXIT=1"])


    def test_clients_end_cleanly_on_ctrl_c_while_connecting_a_full_stdout_or_a_write_only_stdin(self):
        full_port, echo = a_full_listener(self), Server(self, "echo_server.py")
        write_only = os.open(os.devnull, os.O_WRONLY)
        self.addCleanup(os.close, write_only)
        before = connecting_to(full_port)
        # All at once (Wine takes a second to start each): (what, the client, its status, its words)
        cases = [(f"Ctrl-C while {script} connects", full_port, [script, *args], {},
                  (0, 1, 130, 58), None)  # 58: Windows' "ended by Ctrl-C" (0xC000013A)
                 for script, *args in (("echo_client.py",), ("chat_client.py", "--name", "J"))]
        with open("/dev/full", "wb") as full:
            cases += [("a full stdout", echo.port, ["chat_client.py", "--name", "J"],
                       dict(stdout=full), (1,), "error: cannot write the output: no space left on device"),
                      ("a write-only stdin", echo.port, ["chat_client.py", "--name", "J"],
                       dict(stdin=write_only), (1,), "error: cannot read the input: bad file descriptor")]
            clients = []
            for what, port, (script, *args), how, _, _ in cases:
                how = {"stdin": subprocess.PIPE, "stdout": subprocess.DEVNULL, **how}
                client = subprocess.Popen(["wine", WINE_PYTHON, script, "--host", "127.0.0.1",
                                           "--port", str(port), *args], stderr=subprocess.PIPE,
                                          env=WINE_ENV, cwd=HERE, preexec_fn=with_default_sigint(), **how)
                self.addCleanup(lambda client=client: client.poll() is None and (client.kill(), client.wait()))
                if client.stdin:
                    client.stdin.write(b"hello\n")  # and the input stays open
                    client.stdin.flush()
                clients.append(client)
        wait_until(lambda: len(connecting_to(full_port) - before) == 2, "both clients' SYN", timeout=3 * WAIT)
        for client in clients[:2]:
            client.send_signal(signal.SIGINT)  # Wine delivers it as Ctrl-C
        for (what, _, _, _, statuses, words), client in zip(cases, clients):
            with self.subTest(what):
                _, said = client.communicate(timeout=3 * WAIT)
                said = said.decode("utf-8", errors="replace").replace("\r\n", "\n")
                assert_a_clean_end(self, said, client.returncode, statuses)
                if words:
                    self.assertEqual(said, words + "\n")


if __name__ == "__main__":
    unittest.main()


# ---------------------------------------------------------------------------------------
# Running the suite: `python -m unittest` runs the test classes in a few processes at
# once, so that one class waiting on a timer or on Wine does not hold up the others. Each
# class runs whole in a child process (fork), which reports every outcome to us; we hand
# them on to unittest's own result, so the output reads as in a plain run. One class
# (python -m unittest test_chat.ChatServerTest) runs as usual, in this process.
# TEST_CHAT_PROCESSES=1 runs everything here, one test after another; TEST_CHAT_TIMES=1
# says how long each class took.
# ---------------------------------------------------------------------------------------

PROCESSES = int(os.environ.get("TEST_CHAT_PROCESSES", "4"))


def load_tests(loader, tests, pattern):
    if PROCESSES <= 1 or not hasattr(os, "fork"):
        return tests
    return ClassesSideBySide(tests, PROCESSES)


class ClassesSideBySide(unittest.TestSuite):
    """The module's tests, each class run whole in a forked child, PROCESSES at a time."""

    def __init__(self, tests, processes):
        super().__init__()
        self.processes = processes
        self.classes = {}  # class -> its tests, in the order the loader found them
        for test in self.flatten(tests):
            self.classes.setdefault(type(test), []).append(test)

    def flatten(self, suite):
        for test in suite:
            if isinstance(test, unittest.TestSuite):
                yield from self.flatten(test)
            else:
                yield test

    def countTestCases(self):
        return sum(len(tests) for tests in self.classes.values())

    def run(self, result, debug=False):
        # The slowest classes first (TEST_CHAT_TIMES=1 tells), so that none starts last.
        slow = ["ChatServerTest", "NatsLinkTest", "WindowsServerTest", "WindowsClientTest",
                "ChatClientTest", "ChatClientTerminalTest", "EchoClientTest"]
        waiting = sorted(self.classes.items(), key=lambda item: (
            slow.index(item[0].__name__) if item[0].__name__ in slow else len(slow), -len(item[1])))
        children = {}  # read end of a child's pipe -> (pid, its tests by id, unread bytes, events)
        began = {}  # read end -> (class name, when it began)
        while waiting or children:
            while waiting and len(children) < self.processes:
                cls, tests = waiting.pop(0)
                read_end, pid = self.fork(tests)
                children[read_end] = (pid, {test.id(): test for test in tests}, bytearray(), [])
                began[read_end] = (cls.__name__, time.monotonic())
            for fd in select.select(list(children), [], [])[0]:
                pid, by_id, unread, events = children[fd]
                data = os.read(fd, 1 << 16)
                unread += data
                *lines, rest = unread.split(b"\n")
                unread[:] = rest
                for line in lines:
                    events.append(eval(line.decode()))  # a tuple the child wrote with repr()
                    if events[-1][0] == "stop":  # one test's events, told together
                        self.replay(result, by_id, events)
                        events.clear()
                if not data:
                    name, start = began.pop(fd)
                    if os.environ.get("TEST_CHAT_TIMES"):  # where the time goes, class by class
                        print(f"\n{name}: {time.monotonic() - start:.1f} s", file=sys.stderr)
                    if events:
                        self.replay(result, by_id, events + [("stop",) + events[-1][1:]])
                    os.close(fd)
                    os.waitpid(pid, 0)
                    del children[fd]
        return result

    def fork(self, tests):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the class, report, and leave without running our exit
            status = 1
            try:
                os.close(read_end)
                unittest.TestSuite(tests).run(Reporter(write_end))
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        return read_end, pid

    @staticmethod
    def replay(result, by_id, events):
        """Hand one test's outcomes to unittest's result, as if it had run here."""
        test_id = events[0][1]
        test = by_id.get(test_id) or Described(test_id, events[0][2])
        if test_id in by_id:  # (a class fixture's error is no test run)
            result.startTest(test)
        for outcome, _, description, text in events:
            if outcome in ("failure", "error", "subtest"):
                try:
                    raise ChildFailure(text)
                except ChildFailure:
                    err = sys.exc_info()
                if outcome == "subtest":
                    result.addSubTest(test, Described(test_id, description), err)
                else:
                    (result.addFailure if outcome == "failure" else result.addError)(test, err)
                listed = result.errors if outcome == "error" else result.failures
                listed[-1] = (listed[-1][0], text)  # the child's own traceback, as a plain run shows it
            elif outcome == "success":
                result.addSuccess(test)
            elif outcome == "skip":
                result.addSkip(test, text)
        if test_id in by_id:
            result.stopTest(test)


class ChildFailure(AssertionError):
    """A failure or an error in a child process; its text is the child's traceback."""


class Described:
    """Stands for a test (a class fixture, a subtest) that only the child had."""

    failureException = AssertionError

    def __init__(self, test_id, description):
        self._id, self.description = test_id, description

    def id(self):
        return self._id

    def __str__(self):
        return self.description

    def shortDescription(self):
        return None


class Reporter(unittest.TestResult):
    """In a child: each outcome, one line a test, to the parent through a pipe."""

    def __init__(self, fd):
        super().__init__()
        self.fd = fd

    def stopTest(self, test):
        self.tell("stop", test)

    def tell(self, outcome, test, text="", description=None):
        line = repr((outcome, test.id(), description or str(test), text)) + "\n"
        data = line.encode()
        while data:
            data = data[os.write(self.fd, data):]

    def addSuccess(self, test):
        self.tell("success", test)

    def addSkip(self, test, reason):
        self.tell("skip", test, reason)

    def addFailure(self, test, err):
        self.tell("failure", test, self._exc_info_to_string(err, test))

    def addError(self, test, err):
        self.tell("error", test, self._exc_info_to_string(err, test))
        if isinstance(test, unittest.suite._ErrorHolder):  # a class fixture: no test to stop
            self.tell("stop", test)

    def addSubTest(self, test, subtest, err):
        if err is not None:
            self.tell("subtest", test, self._exc_info_to_string(err, subtest), str(subtest))
        super().addSubTest(test, subtest, err)

    def addExpectedFailure(self, test, err):
        self.tell("success", test)

    def addUnexpectedSuccess(self, test):
        self.tell("failure", test, "unexpected success")
