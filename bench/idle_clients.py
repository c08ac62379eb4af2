"""Thousands of idle keep-alive HTTP clients from one helper process, so the memory figure of a layerlb
worker is taken with 5,000 real connections open without the harness itself running out of sockets.

`python -m bench.idle_clients HOST PORT COUNT` opens COUNT connections (a bounded number at a time, so
the listen backlog never overflows), sends one keep-alive GET on each and reads its response, then
prints `ready OPEN FAILED` and keeps every connection open until its stdin closes.
"""

from __future__ import annotations

import asyncio
import resource
import sys

CONCURRENCY = 200


async def _one(host: str, port: int, gate: asyncio.Semaphore) -> asyncio.StreamWriter | None:
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), 10)
            return writer if head.startswith(b"HTTP/1.1 200") else None
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return None


async def hold(host: str, port: int, count: int) -> None:
    """Open `count` keep-alive connections, report, and hold them until stdin reaches its end."""
    gate = asyncio.Semaphore(CONCURRENCY)
    writers = await asyncio.gather(*(_one(host, port, gate) for _ in range(count)))
    opened = [writer for writer in writers if writer is not None]
    print(f"ready {len(opened)} {count - len(opened)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for writer in opened:
        writer.close()


def main(argv: list[str]) -> int:
    """Raise the open-file limit, then hold the connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = int(argv[2])
    wanted = max(soft, min(hard, count + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    asyncio.run(hold(argv[0], int(argv[1]), count))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
