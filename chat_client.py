#!/usr/bin/env python3
"""Step 3: a chat client that waits on the keyboard and the server at once with select().

Run it:      python chat_client.py             (with chat_server.py, or echo_server.py, running)
Options:     python chat_client.py --help

    name: John
    Welcome to the chatroom!
    John: Hi
    Jane: hello John

It asks for your name, then sends each line you type as "John: Hi". Lines from the
server are printed as soon as each one is whole. Against step 1's echo server you see
your own line twice: once as we print it, once as the server sends it back.

What to notice: one select() call waits on two things, standard input and the socket,
so a message can arrive while you are typing. Both are byte streams that we cut into
lines ourselves. And text from the network is untrusted: we make control characters
visible, so no one can clear your screen or retitle your terminal.

In a terminal, a message that arrives while you type is printed above your half-typed
line, and that line is drawn again below it, unchanged. For that we edit the line
ourselves (the LineEditor part, which you can skip on a first read). From a pipe or a
file, lines are read as they come.

What it leaves out on purpose: the line editor knows only Backspace, Ctrl-U, Enter and
Ctrl-D (readline does far more), and select() cannot watch standard input on Windows,
so there it points you to WSL.
"""
import argparse
import codecs
import os
import select
import signal
import socket
import sys

try:
    import termios  # POSIX terminals only
except ImportError:
    termios = None

DEFAULT_PORT = 7007       # the port of chat_server.py and echo_server.py
RECV_SIZE = 64 * 1024     # read what is there, up to this much, per recv() or read()
LINE_LIMIT = 64 * 1024    # a longer incoming line is printed in pieces, so our memory stays bounded
CONNECT_TIMEOUT = 10      # seconds to wait for the server to answer the connection
QUIT_WORDS = ("quit", "exit")

# Text from the network may carry terminal control sequences: ESC [2J clears the screen,
# ESC ]0; sets the window title. We show every C0 control but tab, DEL and the C1 controls
# as a visible \xNN escape instead of writing it raw.
CONTROLS = [*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f, *range(0x80, 0xa0)]
MAKE_VISIBLE = {code: f"\\x{code:02x}" for code in CONTROLS}


def format_addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def harmless(raw):
    """Decode bytes from the network and make them safe to print."""
    return raw.decode("utf-8", errors="replace").translate(MAKE_VISIBLE)


def split_lines(buf):
    """Remove the complete lines from buf (a bytearray); return them without line endings."""
    *lines, rest = buf.split(b"\n")
    buf[:] = rest
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def ask_name(stdin):
    """Ask for a name until we get one. Returns None at end of input.

    We read one byte at a time, so nothing typed after the name is read ahead and
    hidden from select() in a buffer (the trap of mixing input() with select())."""
    while True:
        print("name: ", end="", flush=True)
        line = bytearray()
        while not line.endswith(b"\n"):
            byte = os.read(stdin, 1)
            if not byte:
                return None
            line += byte
        name = line.decode("utf-8", errors="replace").strip()
        if name:
            return name


# ---------------------------------------------------------------------------------------
# LineEditor: keeping the typed line intact in a terminal. Skip this part on a first read.
#
# A terminal normally runs in line mode: it echoes your keys itself and hands us a line
# only when you press Enter. A message printed meanwhile lands in the middle of what you
# are typing. So, when stdin and stdout are a terminal, we turn line mode and echo off,
# keep the line being typed here, and around everything we print we first wipe that line
# off the screen, then draw it again below. Ctrl-C still interrupts, as usual.
# Kept simple: a typed line wider than the terminal wraps, and we wipe only its last row.
# ---------------------------------------------------------------------------------------
CLEAR_LINE = "\r\x1b[K"   # to column 0, then erase to the end of the line (ANSI)
# Keys as they arrive. Enter may come as "\r" or "\n", Backspace as DEL or BS: either will do.
ENTER, BACKSPACE, CTRL_D, CTRL_U, ESC = "\r\n", "\x7f\b", "\x04", "\x15", "\x1b"


class LineEditor:
    """The line being typed, kept and edited by us instead of by the terminal."""

    def __init__(self, fd):
        self.fd = fd
        self.saved = termios.tcgetattr(fd)  # put back by restore(), on every way out
        mode = termios.tcgetattr(fd)
        mode[3] &= ~(termios.ICANON | termios.ECHO)  # lflag: each key at once, no echo
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0  # read() waits for one byte
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        self.chars = []  # one entry per character, so Backspace removes a character
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # é may come in 2 reads
        self.escape = ""  # the start of an escape sequence we are skipping (arrows: ESC [ A)

    def restore(self):
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def hide(self):
        sys.stdout.write(CLEAR_LINE)

    def show(self):
        sys.stdout.write("".join(self.chars))
        sys.stdout.flush()

    def feed(self, data):
        """Apply the keys in data. Returns the lines finished with Enter, and False once
        Ctrl-D is pressed on an empty line."""
        lines = []
        for char in self.decoder.decode(data):
            if self.escape:  # skip ESC [ or ESC O, then everything up to a final "@".."~"
                if self.escape == ESC and char in "[O":
                    self.escape += char
                elif self.escape == ESC or "@" <= char <= "~":
                    self.escape = ""  # the sequence ends here (Alt+key sends just ESC key)
            elif char == ESC:
                self.escape = ESC
            elif char in ENTER:
                lines.append("".join(self.chars))
                self.chars.clear()
            elif char in BACKSPACE:
                del self.chars[-1:]
            elif char == CTRL_U:
                self.chars.clear()
            elif char == CTRL_D and not self.chars:
                return lines, False
            elif char.isprintable():  # other control keys are ignored
                self.chars.append(char)
        return lines, bool(data)

# ---------------------------------------------------------------------------------------


def show_received(sock, inbuf):
    """Read what the server sent and print every complete line. False once it has closed."""
    try:
        data = sock.recv(RECV_SIZE)
    except BlockingIOError:
        return True  # select() said readable, but the data was gone
    except OSError:  # ECONNRESET: the server vanished
        data = b""
    if not data:  # b"": the server closed the connection
        if inbuf:  # an unfinished last line
            print(harmless(inbuf), flush=True)
        return False
    inbuf += data
    for line in split_lines(inbuf):
        print(harmless(line), flush=True)
    if len(inbuf) > LINE_LIMIT:  # no newline in sight: print it in pieces, keep memory bounded
        print(harmless(inbuf), flush=True)
        inbuf.clear()
    return True


def read_keyboard(stdin, typed, name, outbuf, editor):
    """Queue each typed line as "name: line". False after quit, exit or end of input."""
    # os.read(), not sys.stdin: sys.stdin reads ahead into a buffer that select() cannot see.
    data = os.read(stdin, RECV_SIZE)
    if editor:  # a terminal: the keys edit the line we keep
        texts, typing = editor.feed(data)
    else:
        typed += data
        lines = split_lines(typed)
        if not data:  # end of input (Ctrl-D): an unfinished last line still counts
            lines.append(bytes(typed))
        texts, typing = [line.decode("utf-8", errors="replace") for line in lines], bool(data)
    for text in texts:
        if text.strip().lower() in QUIT_WORDS:
            return False
        if text:  # empty lines are not sent
            message = f"{name}: {text}"
            print(message, flush=True)
            outbuf += message.encode("utf-8") + b"\n"
    return typing


def chat(sock, name, stdin, editor=None):
    """The select loop. Returns the exit status. editor is a LineEditor in a terminal."""
    typed = bytearray()      # keyboard bytes whose "\n" has not arrived yet
    inbuf = bytearray()      # server bytes whose "\n" has not arrived yet
    outbuf = bytearray()     # our lines that the kernel has not taken yet
    typing = True            # False after quit or end of input: send what is queued, then leave
    while typing or outbuf:
        # One wait for both: a line from the server can arrive while we type.
        want_read = [sock, stdin] if typing else [sock]
        readable, writable, _ = select.select(want_read, [sock] if outbuf else [], [])
        if editor and readable:
            editor.hide()  # wipe the typed line before we print anything
        if sock in readable and not show_received(sock, inbuf):
            print("server closed the connection", file=sys.stderr)
            return 1
        if stdin in readable:
            typing = read_keyboard(stdin, typed, name, outbuf, editor)
        if editor and readable:
            editor.show()  # and draw it again, below what we printed
        if sock in writable:
            try:
                sent = sock.send(outbuf)
            except BlockingIOError:
                sent = 0
            except OSError:  # EPIPE, ECONNRESET
                print("server closed the connection", file=sys.stderr)
                return 1
            del outbuf[:sent]  # send() may take only part of it
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 3: a chat client. Type a line to send it; quit, exit or Ctrl-D leaves.")
    parser.add_argument("--host", default="localhost",
                        help="server to connect to (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="server's TCP port (default: %(default)s)")
    parser.add_argument("--name", help="the name put before your lines (asked if not given)")
    args = parser.parse_args(argv)
    if not 0 < args.port <= 65535:
        parser.error("--port must be from 1 to 65535")

    if os.name == "nt":
        print("error: on Windows, select() cannot watch the keyboard; "
              "run this client under WSL (Windows Subsystem for Linux)", file=sys.stderr)
        return 1

    where = format_addr(args.host, args.port)
    try:
        # create_connection tries every address the name resolves to (IPv6 and IPv4).
        sock = socket.create_connection((args.host, args.port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as err:
        print(f"error: cannot resolve host {args.host!r}: {err.strerror}", file=sys.stderr)
        return 1
    except ConnectionRefusedError:
        print(f"error: cannot connect to {where}: connection refused (is the server running?)",
              file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot connect to {where}: {(err.strerror or str(err)).lower()}",
              file=sys.stderr)
        return 1

    sock.setblocking(False)
    stdin = sys.stdin.fileno()
    editor = None
    try:
        name = args.name.strip() if args.name and args.name.strip() else ask_name(stdin)
        if not name:
            return 0
        if os.isatty(stdin) and sys.stdout.isatty():
            # SIGTERM becomes KeyboardInterrupt too, so the finally below restores the terminal.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            editor = LineEditor(stdin)
        return chat(sock, name, stdin, editor)
    except KeyboardInterrupt:  # Ctrl-C
        print()
        return 0
    finally:
        if editor:
            editor.restore()  # the shell needs its line mode and echo back
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
