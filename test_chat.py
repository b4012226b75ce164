"""Tests for the four scripts: the real scripts, run as subprocesses, over real sockets.

Run them all:   python -m unittest
One class:      python -m unittest -v test_chat.ChatServerTest

Every server starts on --port 0 and tells us its port in its first line. Every wait has a
timeout, and every process a test starts is stopped when the test ends, pass or fail.
"""
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
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


class Proc:
    """One of the scripts, running as a subprocess.

    With tty=True it runs in a pseudo-terminal, as a person runs it: we type into the
    terminal and read the screen (stdout and stderr together). Otherwise stdin and
    stdout are pipes and stderr goes to a file."""

    def __init__(self, test, script, *args, tty=False, preexec_fn=None):
        cmd = [sys.executable, os.path.join(HERE, script), *args]
        self.raw = bytearray()
        self.err = None
        if tty:
            master, slave = pty.openpty()
            self.popen = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave,
                                          preexec_fn=take_controlling_tty)
            os.close(slave)
            self.in_fd = self.out_fd = master
            test.addCleanup(os.close, master)
        else:
            # stderr goes to a file of its own. (A file object shared with the child would
            # share its offset too: our reads would move where the child writes.)
            fd, self.err = tempfile.mkstemp(prefix="test_chat.", suffix=".log")
            os.close(fd)
            test.addCleanup(os.remove, self.err)
            with open(self.err, "ab") as err:
                self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=err, preexec_fn=preexec_fn)
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

    def type(self, text):
        os.write(self.in_fd, text.encode("utf-8") if isinstance(text, str) else text)

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

    def expect(self, text, timeout=WAIT):
        """Wait until text appears in the output."""
        end = time.monotonic() + timeout
        while text not in self.output:
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

    def __init__(self, test, script, *args, preexec_fn=None):
        super().__init__(test, script, "--port", "0", *args, preexec_fn=preexec_fn)
        self.expect("\n")
        match = LISTENING.fullmatch(self.output.strip())
        test.assertTrue(match, f"unexpected first line: {self.output!r}")
        self.host, self.port = match.group(2), int(match.group(3))

    def wait_for_log(self, text):
        wait_until(lambda: text in self.stderr(), f"{text!r} in the server's log")


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

    def is_refused(self):
        """True if the server closed this connection, False if it echoes a byte back."""
        try:
            self.sock.sendall(b"?")
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

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


def no_traceback(test, text):
    test.assertNotIn("Traceback", text)


# ---------------------------------------------------------------------------------------
# Step 1: echo_server.py
# ---------------------------------------------------------------------------------------

class EchoServerTest(unittest.TestCase):

    def setUp(self):
        self.server = Server(self, "echo_server.py")

    def echo(self, peer, data):
        peer.send(data)
        return peer.recv_exactly(len(data))

    def test_first_line_names_the_real_port(self):
        self.assertEqual(self.server.host, "127.0.0.1")
        self.assertNotEqual(self.server.port, 0)

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

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_idle_server_uses_no_cpu(self):
        peers = [Peer(self, self.server.port) for _ in range(5)]
        for peer in peers:
            self.assertEqual(self.echo(peer, b"x" * 100000), b"x" * 100000)
        before = cpu_seconds(self.server.pid)
        time.sleep(0.5)  # a measuring window, not a wait for an event
        self.assertLess(cpu_seconds(self.server.pid) - before, 0.05, "the idle loop spins")

    def test_half_close_sends_everything_pending_then_closes(self):
        peer = Peer(self, self.server.port)
        data = os.urandom(2 * 1024 * 1024)
        peer.send(data[:1024 * 1024])
        peer.sock.shutdown(socket.SHUT_WR)  # we stop sending; we keep reading
        self.assertEqual(peer.read_to_eof(), data[:1024 * 1024])
        self.server.wait_for_log("disconnected")

    def test_client_that_resets_mid_transfer_is_dropped_and_others_do_not_notice(self):
        other = Peer(self, self.server.port)
        rude = Peer(self, self.server.port)
        rude.send(os.urandom(4 * 1024 * 1024))  # the server has echo pending for it...
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
        self.server.wait_for_log("(2 clients)")
        writer.kill()
        wait_until(lambda: self.server.stderr().count("dropped") + self.server.stderr().count(
            "disconnected") >= 1, "the killed client to be dropped")
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

    def test_sigint_and_sigterm_exit_0_without_a_traceback(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with self.subTest(signal=sig.name):
                server = Server(self, "echo_server.py")
                peer = Peer(self, server.port)
                self.assertEqual(self.echo(peer, b"hi"), b"hi")
                self.assertEqual(server.stop(sig), 0)
                self.assertEqual(peer.read_to_eof(), b"")  # its socket was closed
                no_traceback(self, server.stderr())

    def test_port_in_use_is_a_one_line_error_and_exit_1(self):
        second = Proc(self, "echo_server.py", "--port", str(self.server.port))
        self.assertEqual(second.wait(), 1)
        error = second.stderr()
        self.assertEqual(error.count("\n"), 1, error)
        self.assertIn(f"error: cannot listen on 127.0.0.1:{self.server.port}: address already in use", error)

    def test_restart_right_after_a_stop_gets_the_same_port(self):
        peer = Peer(self, self.server.port)
        self.assertEqual(self.echo(peer, b"hi"), b"hi")
        self.assertEqual(self.server.stop(), 0)  # the server closes first: its side is in TIME_WAIT
        again = Proc(self, "echo_server.py", "--port", str(self.server.port))
        again.expect(f"listening on 127.0.0.1:{self.server.port}\n")

    def test_host_that_does_not_resolve_is_a_clear_error(self):
        proc = Proc(self, "echo_server.py", "--host", "no-such-host.invalid")
        self.assertEqual(proc.wait(), 1)
        self.assertIn("error: cannot resolve host 'no-such-host.invalid'", proc.stderr())
        no_traceback(self, proc.stderr())

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_listens_on_ipv6(self):
        try:
            socket.socket(socket.AF_INET6).close()
            server = Server(self, "echo_server.py", "--host", "::1")
        except (OSError, AssertionError):
            self.skipTest("no IPv6 loopback here")
        self.assertEqual(server.host, "[::1]")
        self.assertEqual(self.echo(Peer(self, server.port, host="::1"), b"v6"), b"v6")


@unittest.skipUnless(resource and sys.platform.startswith("linux"), "needs descriptor limits and /proc")
class EchoServerCapacityTest(unittest.TestCase):
    """select() cannot watch descriptors of FD_SETSIZE (1024) or more, and a process may
    run out of descriptors before that. The server must survive both."""

    @classmethod
    def setUpClass(cls):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < 2500:
            if hard != resource.RLIM_INFINITY and hard < 2500:
                raise unittest.SkipTest("this test needs 2500 open files")
            resource.setrlimit(resource.RLIMIT_NOFILE, (2500, hard))

    def connect_many(self, port, n):
        return [Peer(self, port) for _ in range(n)]

    def served_limit(self, server):
        server.wait_for_log("serving up to")
        return int(re.search(r"serving up to (\d+) clients", server.stderr()).group(1))

    def test_1100_connections_in_a_row_fill_the_default_limit_and_the_rest_are_refused(self):
        server = Server(self, "echo_server.py")
        limit = self.served_limit(server)
        self.assertTrue(900 <= limit <= 1024 - 4, f"default --max-clients is {limit}")
        peers = self.connect_many(server.port, 1100)
        refused = [peer.is_refused() for peer in peers]
        self.assertEqual(refused.count(False), limit)
        self.assertEqual(refused[:limit], [False] * limit)  # first come, first served
        for peer in peers:
            peer.sock.close()
        wait_until(lambda: server.stderr().count("disconnected") == limit, "every client to leave")
        self.assertFalse(Peer(self, server.port).is_refused())
        self.assertIsNone(server.popen.poll())

    def test_a_max_clients_above_fd_setsize_cannot_crash_select(self):
        server = Server(self, "echo_server.py", "--max-clients", "5000")
        peers = self.connect_many(server.port, 1100)
        refused = [peer.is_refused() for peer in peers]
        self.assertGreater(refused.count(True), 0)
        self.assertLess(refused.count(False), 1024)
        self.assertIsNone(server.popen.poll(), "the server died")
        self.assertFalse(peers[0].is_refused())

    def test_default_limit_stays_under_the_descriptor_limit(self):
        server = Server(self, "echo_server.py", preexec_fn=limit_open_files(100))
        limit = self.served_limit(server)
        self.assertLess(limit, 100)
        refused = [peer.is_refused() for peer in self.connect_many(server.port, limit + 20)]
        self.assertEqual(refused.count(False), limit)
        self.assertNotIn("cannot accept", server.stderr())

    def test_running_out_of_descriptors_is_logged_and_survived_without_spinning(self):
        server = Server(self, "echo_server.py", "--max-clients", "500",
                        preexec_fn=limit_open_files(40))
        peers = self.connect_many(server.port, 60)
        server.wait_for_log("cannot accept: Too many open files")
        before = cpu_seconds(server.pid)
        time.sleep(0.5)  # a measuring window, not a wait for an event
        self.assertLess(cpu_seconds(server.pid) - before, 0.1, "the loop spins on EMFILE")
        for peer in peers[:30]:  # free some descriptors: the queued connections get in
            peer.sock.close()
        for peer in peers[30:]:
            self.assertFalse(peer.is_refused())


# ---------------------------------------------------------------------------------------
# Step 2: echo_client.py
# ---------------------------------------------------------------------------------------

class EchoClientTest(unittest.TestCase):

    def setUp(self):
        self.server = Server(self, "echo_server.py")

    def client(self, *args, tty=False):
        return Proc(self, "echo_client.py", "--host", "127.0.0.1",
                    "--port", str(self.server.port), *args, tty=tty)

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
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(WAIT)
        client = Proc(self, "echo_client.py", "--host", "127.0.0.1",
                      "--port", str(listener.getsockname()[1]))
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

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_ctrl_c_ends_it_cleanly(self):
        client = self.client(tty=True)
        client.expect("send: ")
        client.type("typed in a terminal\r")  # Enter sends "\r"; the terminal makes it "\n"
        client.expect("recv: typed in a terminal\n")
        client.expect("send: ")
        client.type("\x03")  # Ctrl-C
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.read_to_end())

    @unittest.skipUnless(pty, "needs a pseudo-terminal")
    def test_in_a_terminal_ctrl_d_ends_it(self):
        client = self.client(tty=True)
        client.expect("send: ")
        client.type("\x04")  # Ctrl-D
        self.assertEqual(client.wait(), 0)
        no_traceback(self, client.read_to_end())


if __name__ == "__main__":
    unittest.main()
