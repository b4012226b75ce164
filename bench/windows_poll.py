#!/usr/bin/env python3
"""What polling the keyboard costs the chat client on Windows, next to select() on Linux.

Run it:      python bench/windows_poll.py           (needs tmux; Wine for the Windows half)
Options:     python bench/windows_poll.py --help

On Windows, select() cannot watch the keyboard, so chat_client.py waits on the socket
for POLL_EVERY (50 ms) at most and then asks msvcrt for keys. This runs the client in a
terminal (tmux) against chat_server.py on 127.0.0.1, once with this Python and once with
the Windows build of Python under Wine (set up by .ci/setup-wine), and reports:
- CPU used while idle, as a share of one core (from /proc: the client's process only);
- how long a typed key takes to reach the screen (tmux send-keys until capture-pane
  shows it), the median and the slowest of --keys keys.
Under Wine, both figures include Wine's own costs: they bound what the polling costs,
they do not measure Windows.
"""
import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
WINPY_HOME = os.environ.get("WINPY_HOME", "/var/tmp/winpy")
WINE_PYTHON = os.path.join(WINPY_HOME, "py", "cp313", "python.exe")
WINE_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
            "WINEPREFIX": os.path.join(WINPY_HOME, "prefix"), "WINEDEBUG": "-all",
            "WINEDLLOVERRIDES": "mscoree=;mshtml="}
# Wine copies the terminal's keys into its console only once a process has waited on
# the console's input handle (real Windows needs nothing of the kind): see test_chat.py.
CONSOLE_SHIM = """
import ctypes, runpy, sys
kernel32 = ctypes.windll.kernel32
kernel32.WaitForSingleObject(kernel32.GetStdHandle(-10), 0)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate, timeout=10.0, step=0.005):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise SystemExit("timed out: is tmux working?")
        time.sleep(step)


def measure(label, command, env, idle, keys):
    tmux = ["tmux", "-L", f"windows-poll-{os.getpid()}", "-f", "/dev/null"]

    def run(*args):
        return subprocess.run([*tmux, *args], capture_output=True, text=True, timeout=10).stdout

    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "20", "-c", ROOT,
                    shlex.join(command) + "; sleep 60"], env=env, check=True, timeout=10)
    try:
        wait_for(lambda: "Welcome to the chatroom!" in run("capture-pane", "-p"))
        shell = int(run("display-message", "-p", "#{pane_pid}"))
        with open(f"/proc/{shell}/task/{shell}/children") as f:
            client = int(f.read().split()[0])
        before, start = cpu_seconds(client), time.monotonic()
        time.sleep(idle)
        cpu = (cpu_seconds(client) - before) / (time.monotonic() - start)
        waits = []
        for k in range(1, keys + 1):
            start = time.monotonic()
            run("send-keys", "-l", "x")
            wait_for(lambda: "x" * k in run("capture-pane", "-p"))
            waits.append(time.monotonic() - start)
        run("send-keys", "C-u")
        print(f"| {label} | {100 * cpu:.2f}% | {1000 * statistics.median(waits):.0f} ms "
              f"| {1000 * max(waits):.0f} ms |", flush=True)
    finally:
        run("kill-server")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=float, default=10, help="seconds idle (default: 10)")
    parser.add_argument("--keys", type=int, default=20, help="keys typed (default: 20)")
    args = parser.parse_args()
    if not shutil.which("tmux"):
        return "needs tmux"
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat_server.py"), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    folder = tempfile.mkdtemp()
    try:
        port = re.search(r":(\d+)$", server.stdout.readline().strip()).group(1)
        client = ["chat_client.py", "--host", "127.0.0.1", "--port", port, "--name", "Ann"]
        print("| client | idle CPU (one core) | key to screen, median | slowest |")
        print("| --- | ---: | ---: | ---: |")
        measure(f"Linux, Python {sys.version.split()[0]}", [sys.executable, *client],
                os.environ, args.idle, args.keys)
        if shutil.which("wine") and os.path.exists(WINE_PYTHON):
            shim = os.path.join(folder, "console_shim.py")
            with open(shim, "w") as f:
                f.write(CONSOLE_SHIM)
            quiet = dict(env=WINE_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
            subprocess.run(["wineserver", "-p5"], timeout=10, **quiet)
            subprocess.run(["wine", "wineboot"], timeout=60, **quiet)
            measure("Windows Python 3.13 under Wine", ["wine", WINE_PYTHON, shim, *client],
                    WINE_ENV, args.idle, args.keys)
        else:
            print(f"(no Wine, or no Windows Python in {WINPY_HOME}: run .ci/setup-wine)")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
