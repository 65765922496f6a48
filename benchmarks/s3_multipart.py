"""
How long completing an S3 multipart upload takes, and what memory it
costs (docs/s3-store.md, "Completion assembles a new file").

One KoboldFS server in this process (the real service, SQLite metadata,
its data directory under --tmp).  It takes an object of --gib GiB as
parts of --part-mib MiB through the core's part puts (as the S3 front end
calls them), then completes the upload: the parts streamed into one new
file.  Beside it, in the same run, a plain put of the same size through the
same core (the bytes written once, as the completion writes them): the
ratio is what assembling costs over writing.  Memory: the process's
resident set sampled every 50 ms during the completion, against its size
just before.

    python benchmarks/s3_multipart.py --gib 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from koboldfs.tap import Options, makeService  # noqa: E402

MIB = 1024 * 1024
CHUNK = MIB


def rss() -> int:
    """
    This process's resident set, in bytes.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Producer:
    """
    The client side of a put in this process: paused and resumed by the
    upload's flow control.
    """

    def __init__(self) -> None:
        self.paused = False
        self.resumed: defer.Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        resumed, self.resumed = self.resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()


async def write_all(stream: Any, producer: Producer, block: bytes, size: int) -> None:
    """
    Write C{size} bytes of C{block} repeated, waiting while paused.
    """
    left = size
    while left:
        n = min(CHUNK, left)
        stream.write(block[:n])
        left -= n
        if producer.paused:
            producer.resumed = defer.Deferred()
            await producer.resumed


async def main(reactor: Any, args: argparse.Namespace) -> None:
    base = tempfile.mkdtemp(prefix="s3mp-", dir=args.tmp)
    options = Options()
    options.parseOptions(
        [
            "--name=bench",
            "--host=bench",
            f"--data={os.path.join(base, 'data')}",
            "--listen=tcp:0:interface=127.0.0.1",
            "--http=tcp:0:interface=127.0.0.1",
            f"--db=sqlite:///{os.path.join(base, 'metadata.sqlite')}",
        ]
    )
    service = makeService(options)
    service.startService()
    try:
        node = service.node
        while node.up("bench") is None:
            await task.deferLater(reactor, 0.1, lambda: None)
        size = args.gib * 1024 * MIB
        part_size = args.part_mib * MIB
        block = os.urandom(CHUNK)

        plain = None
        if not args.no_plain:
            started = time.monotonic()
            producer = Producer()
            stream = node.put("bench", "plain", size, producer, md5=True)
            await write_all(stream, producer, block, size)
            await stream.finish(None)
            plain = time.monotonic() - started

        upload = await node.create_upload("bench", "parted", None)
        started = time.monotonic()
        parts = []
        left, number = size, 1
        while left:
            n = min(part_size, left)
            producer = Producer()
            stream = node.upload_part(upload, number, n, producer)
            await write_all(stream, producer, block, n)
            info = await stream.finish(None)
            parts.append((number, info.etag))
            left -= n
            number += 1
        uploading = time.monotonic() - started

        before = rss()
        peak = before

        def sample() -> None:
            nonlocal peak
            peak = max(peak, rss())

        sampler = task.LoopingCall(sample)
        sampler.start(0.05)
        started = time.monotonic()
        info = await node.complete_upload(upload.upload_id, parts)
        completing = time.monotonic() - started
        sampler.stop()
        sample()
        assert info.size == size and info.parts == len(parts), info
        result = {
            "object_bytes": size,
            "parts": len(parts),
            "part_bytes": part_size,
            "plain_put_s": None if plain is None else round(plain, 2),
            "parts_put_s": round(uploading, 2),
            "complete_s": round(completing, 2),
            "complete_MBps": round(size / completing / 1e6, 1),
            "complete_over_plain_put": None if plain is None else round(completing / plain, 2),
            "rss_before_MiB": round(before / MIB, 1),
            "rss_peak_during_complete_MiB": round(peak / MIB, 1),
            "rss_growth_MiB": round((peak - before) / MIB, 1),
            "load_average": os.getloadavg(),
        }
        print(json.dumps(result, indent=2))
    finally:
        await service.stopService()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, default=1, help="object size in GiB [1]")
    parser.add_argument("--part-mib", type=int, default=64, help="part size in MiB [64]")
    parser.add_argument("--tmp", default=None, help="where the data directory goes")
    parser.add_argument(
        "--no-plain", action="store_true", help="skip the plain put of the same size (the baseline)"
    )
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
