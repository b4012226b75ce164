#!/usr/bin/env python3
"""Step 2: an echo client. Type a line, it goes to the server, and the echo comes back.

Run it:      python echo_client.py             (with echo_server.py running)

    send: hello
    recv: hello
    send: quit

What to notice: TCP delivers a byte stream, not messages, so the echo of one line may
arrive in several pieces. We collect pieces until the newline is back, and only then print.
While we wait, we keep sending what the kernel has not taken yet: a long line sent all at
once, before reading, could fill both directions of the connection and hang us both.

Left out on purpose: between lines it waits on the keyboard alone, so it notices that the
server went away only when it next sends a line. Step 3 waits on both at once.
What a real client needs besides the lesson comes after the line "The fine print".
"""
import argparse
import errno
import os
import select
import signal
import socket
import sys
import unicodedata

# Until main() is ready for it, Ctrl-C ends us at once, as it ends any program: no traceback.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not if it is ignored)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

DEFAULT_PORT = 7007       # the port of echo_server.py
RECV_SIZE = 64 * 1024     # read what is there, up to this much, per recv()
BUFFER_LIMIT = 64 * 1024  # beyond our own line, the most we keep while no newline comes back
QUIT_WORDS = (b"quit", b"exit")


class ServerClosed(Exception):
    """The server closed or reset the connection."""


def echo_line(sock, line, inbuf):
    """Send one line (bytes, ending in "\n"); return the next line that comes back, once
    all of it is back. A byte stream makes no promise about where one recv() ends, so
    inbuf keeps what arrived after that line for the next call."""
    outbuf = bytearray(line)
    limit = len(line) + BUFFER_LIMIT  # the most we keep without a newline: memory stays bounded
    # We wait for the echo until its "\n" is in, or until we hold all we keep without one.
    waiting = b"\n" not in inbuf and len(inbuf) < limit
    while outbuf or waiting:
        # Watch for writability only while we still have bytes to send; stop reading while
        # what came back piles up (a server that never reads cannot grow us).
        want_read = [sock] if len(inbuf) < limit else []
        readable, writable, _ = select.select(want_read, [sock] if outbuf else [], [])
        if writable:
            try:
                sent = sock.send(outbuf)
            except BlockingIOError:
                sent = 0
            except OSError as err:  # EPIPE, ECONNRESET
                raise ServerClosed from err
            del outbuf[:sent]  # send() may take only part of it
        if readable:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as err:
                raise ServerClosed from err
            if not data:  # b"": the server closed the connection
                raise ServerClosed
            inbuf += data
            waiting = waiting and b"\n" not in data and len(inbuf) < limit  # new piece only
    echoed, _, rest = inbuf.partition(b"\n")  # no "\n" in sight: all we hold is the echo
    inbuf[:] = rest
    return bytes(echoed)


def talk(sock):
    """The send/recv loop of the challenge. Returns the exit status."""
    inbuf = bytearray()
    while True:
        print("send: ", end="", flush=True)
        line = sys.stdin.buffer.readline(INPUT_LIMIT)  # bytes as typed: nothing to fail
        if not line:  # Ctrl-D, or the end of piped input
            print()
            return 0
        if line.strip().lower() in QUIT_WORDS:
            return 0
        try:
            echoed = echo_line(sock, end_line(line), inbuf)
        except ServerClosed:
            print("server closed the connection", file=sys.stderr)
            return 1
        print(f"recv: {harmless(echoed.decode('utf-8', errors='replace'))}", flush=True)


# The fine print ------------------------------------------------------------------------
# What a real client needs besides the lesson: connecting with clear errors, and the
# command line.

CONNECT_TIMEOUT = 10      # seconds to wait for the server to answer the connection
INPUT_LIMIT = 32 * 1024 * 1024  # a longer typed line goes out in pieces: memory stays bounded
# What comes back is shown harmlessly, as in step 3 (chat_client.py says why): control
# characters (but tab), format characters (bidi controls, zero-width ones, the BOM, tags,
# the soft hyphen), line and paragraph separators, by their Unicode category; and these,
# which are invisible whatever their category says.
INVISIBLE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")
INVISIBLE = "\u034f\u115f\u1160\u3164\uffa0"  # combining grapheme joiner, Hangul fillers
ZWJ, VS16 = "\u200d", "\ufe0f"  # a zero-width joiner glues emoji: 👩 ZWJ 💻 is one picture


def harmless(text):
    """text with every character that can hide or reorder text shown as an escape
    (\\x1b, \\u202e, \\U000e0041). Ordinary text of every script stays as it is."""
    if text.isprintable() and not any(char in text for char in INVISIBLE):
        return text  # the common case, checked in C
    shown = []
    for i, char in enumerate(text):
        before = text[max(0, i - 2):i].rstrip(VS16)[-1:]  # (an emoji may end in VS16)
        if char == ZWJ and is_emoji(before) and is_emoji(text[i + 1:i + 2]):
            shown.append(char)
        elif char != "\t" and (unicodedata.category(char) in INVISIBLE_CATEGORIES
                                or char in INVISIBLE):
            code = ord(char)
            shown.append(f"\\x{code:02x}" if code < 0x100 else
                         f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            shown.append(char)
    return "".join(shown)


def is_emoji(char):
    """True for a pictograph or a skin tone; False for anything else, or no character."""
    skin_tone = "\U0001f3fb" <= char <= "\U0001f3ff"
    return char != "" and (unicodedata.category(char) == "So" or skin_tone)


def take_ctrl_c():
    """From here on Ctrl-C raises KeyboardInterrupt, for main() to end us cleanly. Until
    now it ended us at once. (If it is ignored, it stays so.)"""
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stdio_failed(err):
    """Our input cannot be read (it is open for writing only, say) or our output cannot
    be written (> /dev/full): say which in one line, and return the exit status, 1. A
    reader that has gone (| head -1) is no error: status 0. What is still buffered for
    stdout then goes to /dev/null, so Python's exit has nothing left to fail on."""
    try:
        os.write(sys.stdout.fileno(), b"")  # fails if stdout is what failed (but a pipe)
        writing = isinstance(err, BrokenPipeError) or err.errno in (errno.ENOSPC, errno.EFBIG)
    except OSError as stdout_err:
        writing, err = True, stdout_err
    if writing:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if isinstance(err, BrokenPipeError):
        return 0
    try:
        what = "write the output" if writing else "read the input"
        print(f"error: cannot {what}: {describe(err)}", file=sys.stderr, flush=True)
    except OSError:  # stderr fails too: there is nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    return 1


def describe(err):
    """An OSError in a few lower-case words: "connection refused"."""
    return (err.strerror or str(err)).lower()


def end_line(line):
    """The last line of a file may lack its "\n": we add it. A piece of a line longer than
    INPUT_LIMIT goes as it is; the rest of the line follows."""
    return line if line.endswith(b"\n") or len(line) == INPUT_LIMIT else line + b"\n"


def keep_stdio_usable():
    """No traceback, whatever stdin, stdout and stderr are. A closed one gets /dev/null in
    its place (or our socket could take its number), and a terminal that cannot show a
    character shows a replacement instead of failing."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            if fd == 0:
                os.read(fd, 0)  # fails if stdin is open for writing only (as nohup may leave it)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd, if it was closed
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # Python found it closed at start
            setattr(sys, name, open(fd, mode, closefd=False))
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="replace")


def format_addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(host, port):
    """A connected socket, or None after saying on stderr why there is none."""
    where = format_addr(host, port)
    try:
        # create_connection tries every address the name resolves to (IPv6 and IPv4).
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except (socket.gaierror, UnicodeError) as err:  # UnicodeError: "a..b" is no host name
        why = err.strerror if isinstance(err, socket.gaierror) else "not a valid host name"
        print(f"error: cannot resolve host {host!r}: {why}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: cannot connect to {where}: connection refused (is the server running?)",
              file=sys.stderr)
    except OSError as err:
        print(f"error: cannot connect to {where}: {describe(err)}",
              file=sys.stderr)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 2: send lines to an echo server and print what comes back. "
                    "Type quit or exit (or press Ctrl-D) to leave.")
    parser.add_argument("--host", default="localhost",
                        help="server to connect to (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="server's TCP port (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.port <= 65535:
        parser.error("--port must be from 1 to 65535")

    keep_stdio_usable()
    sock = connect(args.host, args.port)
    if not sock:
        return 1
    sock.setblocking(False)
    try:
        take_ctrl_c()
        return talk(sock)
    except KeyboardInterrupt:  # Ctrl-C
        print()
        return 0
    except OSError as err:  # stdin cannot be read, or stdout written (closed, or full)
        return stdio_failed(err)
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
