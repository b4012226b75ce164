#!/usr/bin/env python3
"""What would asyncio do? The echo server of step 1, written the usual asyncio way.

Run it:      python bench/asyncio_echo_server.py [--port 7007]

Same job as echo_server.py (RFC 862: every byte comes back). It is here so
bench/loadtest.py can measure both in one run. It awaits drain() after each write, so
a client that does not read stops being read from: the same backpressure as ours.
"""
import argparse
import asyncio
import sys

RECV_SIZE = 64 * 1024


async def echo(reader, writer):
    try:
        while data := await reader.read(RECV_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host, port):
    server = await asyncio.start_server(echo, host, port)
    print(f"echo server listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None):
    parser = argparse.ArgumentParser(description="The step 1 echo server, written with asyncio.")
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
