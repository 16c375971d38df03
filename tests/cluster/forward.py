"""A byte pump between TCP and unix sockets: how the cluster harness crosses network namespaces.

Run by tests/cluster/kubelet.py, twice per pod: once inside the pod's network namespace
(`nsenter --net=/proc/<pause pid>/ns/net python forward.py ...`) and once on the host. Unix
socket files live in the file system, which both namespaces share, so a pair of these links a
loopback port in the pod to a loopback port on the host without a bridge, a veth or iptables:

    pod 127.0.0.1:REG  --tcp-->  [in pod]  unix:reg.sock  [on host]  --tcp-->  127.0.0.1:REG
    host 127.0.0.1:X   --tcp-->  [on host] unix:http.sock [in pod]   --tcp-->  pod 127.0.0.1:5000

Usage: forward.py LISTEN=TARGET ...   with each end tcp:HOST:PORT or unix:PATH.
Prints "ready" once every listener is open.
"""

from __future__ import annotations

import asyncio
import sys


async def _open(end: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, _, where = end.partition(":")
    if kind == "unix":
        return await asyncio.open_unix_connection(where)
    host, _, port = where.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.write_eof()  # half-close: the other side still sends its answer
        except (OSError, RuntimeError):
            writer.close()


def _handler(target: str):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await _open(target)
        except OSError:  # nothing listens there yet: the client sees a reset, as with a closed port
            writer.close()
            return
        await asyncio.gather(_pump(reader, t_writer), _pump(t_reader, writer))
        writer.close()
        t_writer.close()

    return handle


async def _listen(end: str, target: str) -> asyncio.base_events.Server:
    kind, _, where = end.partition(":")
    if kind == "unix":
        return await asyncio.start_unix_server(_handler(target), where)
    host, _, port = where.rpartition(":")
    return await asyncio.start_server(_handler(target), host, int(port), reuse_address=True)


async def main(pairs: list[str]) -> None:
    servers = [await _listen(*pair.split("=", 1)) for pair in pairs]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
