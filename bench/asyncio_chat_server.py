#!/usr/bin/env python3
"""What would asyncio do? The chat server of step 4, written the usual asyncio way.

Run it:      python bench/asyncio_chat_server.py [--port 7007]

Same protocol as chat_server.py: a welcome line, each line relayed to everyone else
(a "\\r" before the "\\n" dropped, empty lines ignored, lines over 4096 bytes refused),
and "* a user joined/left (N online)" notices. It is here so bench/loadtest.py can
measure both servers in one run. It is the plain version people write from the asyncio
docs: one task per client, readline() per line, write() to every other client per line.

What it leaves out: a bound on memory. write() queues without limit, and we do not await
drain() for the other clients (one slow reader would stall the sender), so a client that
stops reading makes the server's memory grow. chat_server.py drops such a client instead.
"""
import argparse
import asyncio
import sys

LINE_LIMIT = 4096
WELCOME = b"Welcome to the chatroom!\n"
LINE_TOO_LONG = f"error: line too long (limit {LINE_LIMIT} bytes)\n".encode()

writers = set()  # one StreamWriter per client in the room


def broadcast(data, sender=None):
    for writer in writers:
        if writer is not sender:
            writer.write(data)


async def handle_client(reader, writer):
    writer.write(WELCOME)
    writers.add(writer)
    broadcast(f"* a user joined ({len(writers)} online)\n".encode(), writer)
    try:
        while True:
            try:
                line = await reader.readline()  # a last line without "\n" comes back as is
            except ValueError:  # longer than the reader's limit
                writer.write(LINE_TOO_LONG)
                break
            if not line:
                break
            line = line.rstrip(b"\n")
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > LINE_LIMIT:
                writer.write(LINE_TOO_LONG)
                break
            if line:
                broadcast(line + b"\n", writer)
    except ConnectionError:
        pass
    finally:
        writers.discard(writer)
        broadcast(f"* a user left ({len(writers)} online)\n".encode())
        writer.close()


async def serve(host, port):
    server = await asyncio.start_server(handle_client, host, port, limit=LINE_LIMIT + 2)
    print(f"chat server listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None):
    parser = argparse.ArgumentParser(description="The step 4 chat server, written with asyncio.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7007)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
