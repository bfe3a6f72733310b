"""Child process for the kill -9 test: appends as fast as it can and prints every acknowledged event.

Usage: python child_appender.py DIRECTORY APPENDERS. Each line: `partition sequence device counter`,
written only after `append()` returned (the event is durable), so every printed line must survive.
"""

from __future__ import annotations

import asyncio
import sys

from tether.storage.stream.local import LocalEventStream


async def main(directory: str, appenders: int) -> None:
    stream = LocalEventStream(directory, 4, 24.0, 1 << 30, segment_bytes=256 << 10)
    await stream.start()
    out = sys.stdout

    async def run(n: int) -> None:
        device = f"child-{n}"
        i = 0
        while True:
            ev = await stream.append(device, f"{device}:{i}".encode() * 8, properties={"i": str(i)},
                                     system_properties={})
            out.write(f"{ev.partition} {ev.sequence_number} {device} {i}\n")
            out.flush()
            i += 1

    print("ready", flush=True)
    await asyncio.gather(*(run(n) for n in range(appenders)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
