#!/usr/bin/env python3
"""Step 3: a chat client that waits on the keyboard and the server at once with select().

Run it:      python chat_client.py             (with chat_server.py, or echo_server.py, running)

It asks your name, then sends each line you type as "John: Hi" and prints each line from
the server as soon as it is whole, even while you type. (Against step 1's echo server you
see your lines twice.) Text from the network is untrusted: we show control characters as
escapes, so no one can clear your screen. What a real client needs besides the lesson
comes after the line "The fine print": a terminal's line editor, and Windows, where
select() watches sockets only, so there it gets a stand-in that polls the keyboard.
"""
import argparse
import codecs
import errno
import os
import select
import signal
import socket
import sys
import time
import unicodedata

# Until main() is ready for it, Ctrl-C ends us at once, as it ends any program: no traceback.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not if it is ignored)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

DEFAULT_PORT = 7007       # the port of chat_server.py and echo_server.py
RECV_SIZE = 64 * 1024     # read what is there, up to this much, per recv() or read()
BUFFER_LIMIT = 64 * 1024  # longer lines, in or out, are cut: our memory stays bounded
QUIT_WORDS = ("quit", "exit")


def chat(sock, name, keyboard, inbuf, linger):
    """The select loop; returns the exit status. inbuf: what came while we asked your name."""
    outbuf = bytearray()     # our lines that the kernel has not taken yet
    last = bytearray()       # the last line the server sent: finish() asks if it refused us
    typing = True            # False after quit or end of input: send what is queued, then go
    show_lines(inbuf, last)  # the welcome, if it came while we asked your name
    while typing or outbuf:
        # One wait for both: a line from the server can arrive while we type. (The keyboard
        # waits while our output piles up: a server that stops reading cannot grow us.)
        want_read = [sock, keyboard] if typing and len(outbuf) < BUFFER_LIMIT else [sock]
        want_write = [sock] if outbuf else []
        readable, writable, _ = select.select(want_read, want_write, [])
        keyboard.hide()  # in a terminal, the half-typed line steps aside while we print
        if sock in readable and not show_received(sock, inbuf, last):
            return server_closed(keyboard)
        if keyboard in readable:
            typing = read_keyboard(keyboard, name, outbuf)
        keyboard.show()  # and comes back below what we printed
        if sock in writable:
            try:
                sent = sock.send(outbuf)
            except BlockingIOError:
                sent = 0
            except OSError:  # EPIPE, ECONNRESET
                return server_closed(keyboard)
            del outbuf[:sent]  # send() may take only part of it
    return finish(sock, inbuf, keyboard, last, linger)


def show_received(sock, inbuf, last):
    """Read what the server sent and print every complete line. False once it has closed."""
    try:
        data = sock.recv(RECV_SIZE)
    except BlockingIOError:
        return True  # select() said readable, but the data was gone
    except OSError:  # ECONNRESET: the server vanished
        data = b""
    if not data:  # b"": the server closed the connection
        if inbuf:  # an unfinished last line
            show(inbuf)
        return False
    inbuf += data
    show_lines(inbuf, last)
    if len(inbuf) > BUFFER_LIMIT:  # no "\n" in sight: print it in pieces, memory stays bounded
        show(inbuf)
        inbuf.clear()
    return True


def show_lines(inbuf, last):
    """Take the complete lines out of inbuf and print them; keep the last one in last."""
    for line in split_lines(inbuf):
        show(line)
        last[:] = line


def show(line):
    """Print a line from the server, made harmless(): ESC [2J in it must not clear your
    screen, nor U+202E reorder what you read so that one user passes for another."""
    print(harmless(line.decode("utf-8", errors="replace")), flush=True)


def split_lines(buf):
    """Remove the complete lines from buf (a bytearray); return them without line endings."""
    *lines, rest = buf.split(b"\n")
    buf[:] = rest
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def read_keyboard(keyboard, name, outbuf):
    """Queue each typed line as "name: line". False after quit, exit or end of input."""
    lines, still_open = keyboard.read_lines()
    for text in lines:
        if text.strip().lower() in QUIT_WORDS:
            return False
        message = f"{name}: {text}"
        if text and not too_long_to_send(message):  # empty lines are not sent
            print(message, flush=True)
            outbuf += message.encode("utf-8") + b"\n"
    return still_open


class Keyboard:
    """Standard input, read the select() way: with os.read() on its file descriptor, not
    input() or sys.stdin, which read ahead into a buffer that select() cannot see."""
    interactive = False  # a pipe or a file; a terminal's keyboard is in the fine print

    def __init__(self, fd):
        self.fd = fd
        self.typed = bytearray()  # bytes whose "\n" has not arrived yet

    def fileno(self):  # select() can watch any object that has this method
        return self.fd

    def read_lines(self):
        """The lines that are complete now, and False at end of input."""
        data = os.read(self.fd, RECV_SIZE)
        self.typed += data
        lines = split_lines(self.typed)
        if not data:  # end of input (Ctrl-D): an unfinished last line still counts
            lines.append(bytes(self.typed))
        if len(self.typed) > BUFFER_LIMIT:  # no "\n" in sight: keep just the start (it is
            del self.typed[BUFFER_LIMIT:]   # far too long to send anyway), memory stays bounded
        return [line.decode("utf-8", errors="replace") for line in lines], bool(data)

    def hide(self):
        """A terminal wipes the half-typed line here (TerminalKeyboard, in the fine print)."""

    def show(self):
        """... and draws it again here. From a pipe or a file there is nothing to do."""

    def keep(self):
        """A terminal leaves the half-typed line on the screen for good, as we go."""


def finish(sock, inbuf, keyboard, last, linger):
    """The exit status: 0 at once in a terminal. From a pipe we half-close, show what the
    server still says (--linger s at most), and return 1 if its last line was "error: ..."."""
    if keyboard.interactive:
        return 0
    show_the_rest(sock, inbuf, last, linger)
    return 1 if last.startswith(b"error:") else 0


def server_closed(keyboard):
    """Say that the server has gone; returns the exit status, 1."""
    keyboard.keep()  # what you had typed stays on the screen, above the message
    print("server closed the connection", file=sys.stderr)
    return 1


# The fine print ------------------------------------------------------------------------
# What a real client needs besides the lesson: a keyboard that keeps the typed line
# intact in a terminal, the same in a Windows console (where select() cannot watch the
# keyboard), asking your name, connecting with clear errors, the command line.

CONNECT_TIMEOUT = 10      # seconds to wait for the server to answer the connection
SEND_LIMIT = 4096         # chat_server.py refuses a longer line (and drops its sender)
# Keys as they arrive. Enter may come as "\r" or "\n", Backspace as DEL or BS: either will do.
ENTER, BACKSPACE, CTRL_D, CTRL_U, CTRL_Z, ESC = "\r\n", "\x7f\b", "\x04", "\x15", "\x1a", "\x1b"
POLL_EVERY = 0.05         # Windows: seconds a key may wait to be seen (see select_windows)
# After "\xe0", the codes of the Windows keys that send it: arrows, Home, End, Page Up
# and Down, Insert, Delete, alone and with Ctrl. After any other character, "\xe0" was a
# typed "à". (So "à" and then one of these, typed within POLL_EVERY seconds, is lost.)
EXTENDED_KEYS = "GHIKMOPQRSstuvw\x84\x85\x86\x8d\x91\x92\x93\x94"
FILE_TYPE_PIPE = 3        # what GetFileType() says of a pipe

try:
    import termios  # POSIX terminals only
    import tty
except ImportError:
    termios = tty = None
if os.name == "nt":
    import ctypes
    import msvcrt
    import types
    from ctypes import wintypes


class TerminalKeyboard(Keyboard):
    """A terminal's keyboard, with the line being typed kept and edited by us.

    A terminal normally runs in line mode: it echoes your keys itself and hands us a line
    only when you press Enter, so a message printed meanwhile lands in the middle of what
    you are typing. So we turn line mode and echo off (cbreak mode: Ctrl-C still
    interrupts), keep the typed line here, and around everything the loop prints we wipe
    it off the screen, then draw it again below. The editor knows Backspace, Ctrl-U,
    Enter and Ctrl-D, and skips arrow keys (readline does far more).

    The typed line is kept to one row, showing its end if it is longer, so wiping it never
    moves the cursor up into rows that may hold messages. Counting rows would need the
    terminal's width, and a resize makes that a guess: the terminal rewraps its rows at
    once, but a terminal multiplexer may tell us the new width a quarter of a second
    later. Whatever the width, the row the cursor is on holds the end of our line, so we
    wipe that row and nothing above it. After a resize, a piece of an old copy of the
    line may stay on the screen; a message is never erased."""
    interactive = True
    prompt = ""  # shown before the typed line (Windows asks the name in the editor too)

    def __init__(self, fd):
        super().__init__(fd)
        self.saved = termios.tcgetattr(fd)  # put back by restore(), on every way out
        tty.setcbreak(fd, termios.TCSANOW)  # each key at once, no echo; keep what was typed
        signal.signal(signal.SIGTSTP, self.suspend)  # Ctrl-Z
        self.chars = []  # one entry per character, so Backspace removes a character
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # é may come in 2 reads
        self.escape = ""  # the start of an escape sequence we are skipping (arrows: ESC [ A)

    def restore(self):
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def keep(self):
        if self.chars:  # hide() wiped it: draw it again, and end its row
            self.show()
            print()

    def suspend(self, signum, frame):
        """Ctrl-Z: the shell gets its terminal back, as it was, while we are stopped; on
        fg we take it again and draw the typed line anew. (We stop with SIGSTOP, which
        works even where a second SIGTSTP would be ignored.)"""
        self.restore()
        os.kill(os.getpid(), signal.SIGSTOP)  # here we wait, stopped, until fg (SIGCONT)
        tty.setcbreak(self.fd, termios.TCSANOW)
        self.hide()
        self.show()

    def hide(self):
        """Wipe the typed line: carriage return, then erase to the end of the screen (ANSI).
        Never a row up: see the class's docstring."""
        sys.stdout.write("\r\x1b[J")

    def show(self):
        sys.stdout.write(self.text())
        sys.stdout.flush()

    def text(self):
        """The end of the typed line that fits in one row, short of its last column (a
        character there could move the cursor to the next row)."""
        text = self.prompt + "".join(self.chars).replace(CTRL_Z, "^Z")
        room, start = (terminal_columns() or 80) - 1, len(text)  # (0: the size is not known)
        while start and width(text[start - 1]) <= room:
            start -= 1
            room -= width(text[start])
        return text[start:]

    def read_lines(self):
        """Apply the keys that are there. Returns the lines finished with Enter, and False
        once Ctrl-D is pressed on an empty line."""
        data = os.read(self.fd, RECV_SIZE)
        lines, still_open = self.edit(self.decoder.decode(data))
        return lines, still_open and bool(data)

    def edit(self, keys):
        """Apply keys to the typed line: the lines finished with Enter, and False at the
        end of input (Ctrl-D on an empty line; on Windows, Ctrl-Z then Enter)."""
        lines = []
        for char in keys:
            if self.escape:  # skip ESC [ or ESC O, then everything up to a final "@".."~"
                if self.escape == ESC and char in "[O":
                    self.escape += char
                elif self.escape == ESC or "@" <= char <= "~":
                    self.escape = ""  # the sequence ends here (Alt+key sends just ESC key)
            elif char == ESC:
                self.escape = ESC
            elif char in ENTER:
                if self.chars == [CTRL_Z]:
                    return lines, False
                lines.append("".join(self.chars))
                self.chars.clear()
            elif char in BACKSPACE:
                del self.chars[-1:]
            elif char == CTRL_U:
                self.chars.clear()
            elif char == CTRL_D and not self.chars:
                return lines, False
            elif char == CTRL_Z and not self.chars:  # (a terminal stops us on Ctrl-Z instead)
                self.chars.append(char)  # shown as ^Z
            elif (char.isprintable() or char == ZWJ) and len(self.chars) < BUFFER_LIMIT:
                self.chars.append(char)  # (ZWJ, to type 👩‍💻); other keys are ignored
        return lines, True


def width(char):
    """Columns a character takes on the screen: wide and fullwidth ones two; combining
    marks, format characters and the Hangul jamo that join a syllable none."""
    if unicodedata.category(char) in ("Mn", "Me", "Cf") or "\u1160" <= char <= "\u11ff":
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


# Characters that can hide or reorder text, shown as escapes by harmless(): control
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


def terminal_columns():
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except OSError:
        return 0


class WindowsKeyboard(TerminalKeyboard):
    """The keyboard of a Windows console, without threads. select() on Windows watches
    sockets only, so select_windows() asks it about the socket for POLL_EVERY seconds at
    most, and we take the keys that msvcrt has meanwhile: a key may wait that long.
    msvcrt.getwch() gives one character a call: Enter is "\r", Ctrl-C "\x03", and an
    arrow or function key is two, "\x00" or "\xe0" then a code, which we skip.
    We wipe and draw the typed line without escape sequences, so a console without VT
    processing (before Windows 10, or with it off) works as well as one with it: a
    carriage return, spaces and a carriage return wipe the one row it is kept to."""

    def __init__(self, fd):
        Keyboard.__init__(self, fd)
        self.chars, self.escape, self.prompt = [], "", ""

    def restore(self):
        """The console's modes are as we found them: there is nothing to put back."""

    def read_lines(self):
        """Apply the keys waiting in the console, up to the first Enter: what was typed
        after it stays there for the next turn."""
        keys = []
        while msvcrt.kbhit() and "\r" not in keys[-1:]:
            key = msvcrt.getwch()
            if key in ("\x00", "\xe0") and msvcrt.kbhit():
                code = msvcrt.getwch()
                if key == "\xe0" and code not in EXTENDED_KEYS:  # that was "à", then a key
                    keys += [key, code]
            elif key == "\x03":  # Ctrl-C, in a console that gives it to us as a key
                raise KeyboardInterrupt
            elif key != ESC:  # Windows sends no escape sequences: Esc alone is ignored
                keys.append(key)
        return self.edit("".join(keys))

    def hide(self):
        sys.stdout.write("\r" + " " * (terminal_columns() - 1) + "\r")


def select_windows(want_read, want_write, want_error=(), timeout=None):
    """select.select() for Windows, where it watches sockets only (anything else fails
    with WinError 10038). We ask it about the sockets, and look at the keyboard (or the
    pipe) ourselves, before and after a wait of POLL_EVERY seconds at most. No threads,
    and select() is still where we wait; the cost is a key that waits up to POLL_EVERY
    seconds to be seen, and a loop that wakes 20 times a second while you are idle."""
    sockets = [s for s in want_read if hasattr(s, "recv")]  # (step 6's TlsSocket too)
    inputs = [i for i in want_read if not hasattr(i, "recv")]
    ready = [i for i in inputs if input_waiting(i)]
    if inputs:
        timeout = 0 if ready else POLL_EVERY if timeout is None else min(timeout, POLL_EVERY)
    if sockets or want_write:
        readable, writable, _ = windows_select.select(sockets, want_write, [], timeout)
    else:  # select() on Windows refuses to wait on nothing
        readable, writable = [], []
        time.sleep(timeout or 0)
    return readable + (ready or [i for i in inputs if input_waiting(i)]), writable, []


# On Windows, where select.select() watches sockets only, the name select means from here
# on a stand-in whose select() is select_windows() (the real module is kept as windows_select),
# so the lesson's one wait, and every other, works unchanged.
if os.name == "nt":
    windows_select, select = select, types.SimpleNamespace(select=select_windows)


def input_waiting(stdin):
    """Windows: True if reading stdin (a keyboard object or a file descriptor) now would
    not wait. A console has keys waiting; a pipe has bytes, or its writer has closed it;
    a file or NUL never makes us wait."""
    fd = stdin if isinstance(stdin, int) else stdin.fileno()
    if windows_console(fd):
        return msvcrt.kbhit()
    handle, waiting = wintypes.HANDLE(msvcrt.get_osfhandle(fd)), wintypes.DWORD()
    if ctypes.windll.kernel32.GetFileType(handle) != FILE_TYPE_PIPE:
        return True
    if not ctypes.windll.kernel32.PeekNamedPipe(handle, None, 0, None,
                                                ctypes.byref(waiting), None):
        # The pipe is closed (read() returns b"", the end of input), or it cannot be
        # peeked into (Wine's pipes from Linux): then a read may wait for the next line.
        return True
    return waiting.value > 0


def windows_console(fd):
    """True if fd is a Windows console (os.isatty() is True for the NUL device too)."""
    handle = wintypes.HANDLE(msvcrt.get_osfhandle(fd))
    return bool(ctypes.windll.kernel32.GetConsoleMode(handle, ctypes.byref(wintypes.DWORD())))


def receive(sock):
    """What one recv() brings: b"" once the server has closed (or reset) the connection,
    None if select() said readable but the data was gone."""
    try:
        return sock.recv(RECV_SIZE)
    except BlockingIOError:
        return None
    except OSError:  # ECONNRESET
        return b""


def ask_name(fd, sock, inbuf):
    """Ask for a name until we get one. Returns None at end of input, and "" if the server
    closes the connection first (full, say): what it said is shown at once. From a pipe we
    read one byte at a time, so nothing typed after the name is read ahead and hidden from
    select(); a terminal gives us one line a read anyway. What the server sends meanwhile
    (the welcome) waits in inbuf, to be shown after."""
    while True:
        print("name: ", end="", flush=True)
        line = bytearray()
        while not line.endswith(b"\n"):
            watched = [fd, sock] if len(inbuf) < BUFFER_LIMIT else [fd]
            readable, _, _ = select.select(watched, [], [])
            if sock in readable and not server_says(sock, inbuf):
                return ""
            if fd not in readable:
                continue
            data = os.read(fd, RECV_SIZE if os.isatty(fd) else 1)
            if not data or data.startswith(b"\x1a") and os.isatty(fd):
                return None  # the end of input (in a Windows console: Ctrl-Z, then Enter)
            line += data
        name = line.decode("utf-8", errors="replace").strip()
        if name:
            return name


def ask_name_in_console(keyboard, sock, inbuf):
    """ask_name() for a Windows console, where select() cannot wait for a line: the name
    is typed in our editor, with "name: " before it, as chat lines are."""
    keyboard.prompt = "name: "
    keyboard.show()
    while True:
        watched = [sock, keyboard] if len(inbuf) < BUFFER_LIMIT else [keyboard]
        readable, _, _ = select.select(watched, [], [])
        if sock in readable and not server_says(sock, inbuf):
            return ""
        if keyboard in readable:
            keyboard.hide()
            lines, still_open = keyboard.read_lines()
            for line in lines:  # one at most
                print(f"name: {line}", flush=True)  # the name stays on the screen
                if line.strip():
                    keyboard.prompt = ""
                    return line.strip()
            if not still_open:
                return None
            keyboard.show()


def server_says(sock, inbuf):
    """While we ask the name: keep what the server sends in inbuf. If it closes the
    connection instead, end the prompt's line, show what it said and return False."""
    data = receive(sock)
    if data:
        inbuf += data
    elif data == b"":
        print()
        for said in inbuf.splitlines():
            show(said)
        return False
    return True


def show_the_rest(sock, inbuf, last, linger):
    """finish() from a pipe: shut down our side, then show what the server still sends
    until it closes, linger seconds at most, keeping its last line in last."""
    end = time.monotonic() + linger
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the server has reset the connection already
        end = 0
    while select.select([sock], [], [], max(0, end - time.monotonic()))[0]:
        data = receive(sock)
        if data is None:
            continue
        if not data and inbuf:  # closed: an unfinished last line still counts
            inbuf += b"\n"
        inbuf += data
        show_lines(inbuf, last)
        if not data:
            break
        if len(inbuf) > BUFFER_LIMIT:  # no newline in sight: keep memory bounded
            inbuf.clear()


def too_long_to_send(message):
    """True, after saying so, if the server would refuse message as too long. We do not
    send it, and you stay connected."""
    size = len(message.encode("utf-8"))
    if size <= SEND_LIMIT:
        return False
    print(f"not sent: line too long ({size} bytes with your name; the server takes at most "
          f"{SEND_LIMIT})", file=sys.stderr, flush=True)
    return True


def seconds(text):
    """An argparse type: a number of seconds, 0 or more and finite."""
    value = float(text)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, not {text!r}")
    return value


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


def take_ctrl_c():
    """From here on Ctrl-C raises KeyboardInterrupt, for main() to end us cleanly (the
    terminal put back). Until now it ended us at once. (If it is ignored, it stays so.)"""
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
    """An OSError in a few words, lower case first: "connection refused"."""
    words = err.strerror or str(err)
    return words[:1].lower() + words[1:]


def format_addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(host, port, tls=None):
    """A connected socket, or None after saying on stderr why there is none. With tls (a
    context from tls_context()), a TLS connection to a server it trusts (step 6)."""
    where = format_addr(host, port)
    try:
        # create_connection tries every address the name resolves to (IPv6 and IPv4).
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        return tls_layer.connect(sock, tls, host, CONNECT_TIMEOUT) if tls else sock
    except (socket.gaierror, UnicodeError) as err:  # UnicodeError: "a..b" is no host name
        why = err.strerror if isinstance(err, socket.gaierror) else "not a valid host name"
        print(f"error: cannot resolve host {host!r}: {why}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: cannot connect to {where}: connection refused (is the server running?)",
              file=sys.stderr)
    except OSError as err:
        print(f"error: cannot connect to {where}: {describe(err)}", file=sys.stderr)
    return None


def tls_context(cafile):
    """Step 6, loaded only for --tls: tls_layer.py, beside this file, and what it needs to
    check the server: the certificates in cafile, and no others. None after saying why."""
    global tls_layer
    try:
        import tls_layer
    except ImportError as err:
        print(f"error: --tls needs tls_layer.py beside chat_client.py ({err})", file=sys.stderr)
        return None
    try:
        return tls_layer.client_context(cafile)
    except OSError as err:  # no such file, or no certificate in it
        print(f"error: --tls {cafile}: {describe(err)}", file=sys.stderr)
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 3: a chat client. Type a line to send it; quit, exit or Ctrl-D "
                    "(on Windows: Ctrl-Z, then Enter) leaves.")
    parser.add_argument("--host", default="localhost",
                        help="server to connect to (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="server's TCP port (default: %(default)s)")
    parser.add_argument("--name", help="the name put before your lines (asked if not given)")
    parser.add_argument("--linger", type=seconds, default=5.0, metavar="SECONDS",
                        help="from a pipe, after the last line: how long to wait for what "
                             "the server still says (default: %(default)s)")
    parser.add_argument("--tls", metavar="CAFILE",
                        help="step 6: talk TLS, to a server whose certificate CAFILE holds "
                             "or vouches for (tls_layer.py; default: plain TCP)")
    args = parser.parse_args(argv)
    if not 0 < args.port <= 65535:
        parser.error("--port must be from 1 to 65535")

    keep_stdio_usable()
    tls = args.tls and tls_context(args.tls)
    if args.tls and not tls:
        return 1
    sock = connect(args.host, args.port, tls)
    if not sock:
        return 1
    sock.setblocking(False)
    stdin = sys.stdin.fileno()
    keyboard = None
    try:
        take_ctrl_c()
        inbuf = bytearray()  # what the server sends while we ask the name
        if os.name == "nt" and windows_console(stdin) and windows_console(sys.stdout.fileno()):
            keyboard = WindowsKeyboard(stdin)
            name = (args.name or "").strip() or ask_name_in_console(keyboard, sock, inbuf)
        else:
            name = (args.name or "").strip() or ask_name(stdin, sock, inbuf)
        if name == "":  # (what you typed of your name is on the screen already)
            return server_closed(Keyboard(stdin))
        if not name:
            return 0
        if not keyboard and termios and os.isatty(stdin) and sys.stdout.isatty():
            # SIGTERM, SIGHUP (the terminal went away) and SIGQUIT (Ctrl-\) become
            # KeyboardInterrupt too, so the finally below restores the terminal.
            for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(signum, signal.default_int_handler)
            keyboard = TerminalKeyboard(stdin)
        keyboard = keyboard or Keyboard(stdin)  # a pipe or a file
        return chat(sock, name, keyboard, inbuf, args.linger)
    except KeyboardInterrupt:  # Ctrl-C
        print()
        return 0
    except OSError as err:  # stdin cannot be read, or stdout written (closed, or full)
        return stdio_failed(err)
    finally:
        if isinstance(keyboard, TerminalKeyboard):
            keyboard.restore()  # the shell needs its line mode and echo back
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
