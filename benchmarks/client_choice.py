"""
Which blocking client?  The measurement behind docs/clients.md.

Starts one real C{twistd koboldfs} server on loopback (SQLite, a temporary
data directory) and moves the same files through:

  - C{koboldfs.Client}: the blocking client as shipped, a view of
    DeferredClient running on a reactor in a daemon thread;
  - a plain-socket client: the sans-IO codec over a blocking socket, with
    none of the failover, retries or pooling (the least such a design could
    cost, so the comparison flatters it).

Workloads: one large file (default 256 MiB) put then got, and many 4 KiB
files (default 1,000) put then got, one at a time.  Each is repeated and the
median reported, with the server's peak RSS (VmHWM) at the end.

    python benchmarks/client_choice.py [--large-mib 256] [--small 1000] [--repeat 3]

Output: a table, then one JSON line per figure.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import deque
from functools import partial
from typing import Any, BinaryIO, Callable

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

from koboldfs import Client  # noqa: E402
from koboldfs.protocol import (  # noqa: E402
    CHUNK_SIZE,
    MAX_PAYLOAD,
    VERSION,
    Data,
    FrameDecoder,
    Message,
    Op,
    encode_data_header,
    encode_message,
)
from koboldfs.test.cluster import ServerProcess  # noqa: E402

NAMESPACE = "bench"


def start_server(base: str) -> ServerProcess:
    """
    One started C{twistd -n koboldfs} on loopback, with its own data
    directory and SQLite metadata under C{base}.
    """
    server = ServerProcess(base, "bench")
    server.start_blocking()
    return server


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


class PlainClient:
    """
    The codec over one blocking socket: the alternative design, reduced to
    put and get on a single server.
    """

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.frames: deque[Any] = deque()
        self.sock.sendall(
            encode_message(Op.HELLO, {"versions": [VERSION], "max_payload": MAX_PAYLOAD})
        )
        self._expect(Op.WELCOME)

    def _frame(self) -> Any:
        while not self.frames:
            data = self.sock.recv(4 * CHUNK_SIZE)
            if not data:
                raise ConnectionError("server closed the connection")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    def _expect(self, op: Op) -> Message:
        frame = self._frame()
        if not isinstance(frame, Message) or frame.op is not op:
            raise RuntimeError(f"expected {op.name}, got {frame!r}")
        return frame

    def put(self, key: str, source: BinaryIO, size: int) -> bool:
        digest = hashlib.sha256()
        self.sock.sendall(encode_message(Op.PUT, {"ns": NAMESPACE, "key": key, "size": size}))
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
            self.sock.sendmsg([encode_data_header(len(chunk)), chunk])
        self.sock.sendall(encode_message(Op.END, {"sha256": digest.hexdigest()}))
        self._expect(Op.OK)
        return True

    def get(self, key: str, output: BinaryIO) -> bool:
        digest = hashlib.sha256()
        self.sock.sendall(encode_message(Op.GET, {"ns": NAMESPACE, "key": key}))
        meta = self._expect(Op.FILE)
        while isinstance(frame := self._frame(), Data):
            digest.update(frame.payload)
            output.write(frame.payload)
        if frame.op is not Op.END or digest.hexdigest() != meta["sha256"]:
            raise RuntimeError(f"bad download of {key}")
        return True

    def close(self) -> None:
        self.sock.close()


def timed(f: Callable[[], None]) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = tempfile.mkdtemp(prefix="koboldfs-bench-")
    large = os.path.join(base, "large.bin")
    with open(large, "wb") as f:
        for _ in range(args.large_mib):
            f.write(os.urandom(1024 * 1024))
    size = os.path.getsize(large)
    small = [os.urandom(4096) for _ in range(args.small)]
    server = start_server(base)
    results: dict[tuple[str, str], list[float]] = {}
    try:
        wrapped = Client(NAMESPACE, servers=[server.address])
        plain = PlainClient(server.address)

        def large_put(name: str) -> None:
            if name == "wrapped":
                wrapped.put(f"{name}/large", large)
            else:
                with open(large, "rb") as f:
                    plain.put(f"{name}/large", f, size)

        def large_get(name: str) -> None:
            with open(os.path.join(base, "out.bin"), "wb") as out:
                (wrapped if name == "wrapped" else plain).get(f"{name}/large", out)

        def small_put(name: str) -> None:
            for i, body in enumerate(small):
                if name == "wrapped":
                    wrapped.put(f"{name}/small/{i}", body)
                else:
                    plain.put(f"{name}/small/{i}", io.BytesIO(body), len(body))

        def small_get(name: str) -> None:
            client = wrapped if name == "wrapped" else plain
            for i in range(len(small)):
                client.get(f"{name}/small/{i}", io.BytesIO())

        workloads = [
            ("large put", large_put, size / 2**20, "MiB/s"),
            ("large get", large_get, size / 2**20, "MiB/s"),
            ("small put", small_put, len(small), "files/s"),
            ("small get", small_get, len(small), "files/s"),
        ]
        for _ in range(args.repeat):
            for label, work, _amount, _unit in workloads:
                # Alternate which goes first, so neither always gets a warm cache.
                for name in ("wrapped", "plain") if _ % 2 == 0 else ("plain", "wrapped"):
                    results.setdefault((label, name), []).append(timed(partial(work, name)))
        wrapped.close()
        plain.close()
        peak = peak_rss_mib(server.pid)
    finally:
        server.stop_blocking()
        shutil.rmtree(base, ignore_errors=True)

    figures = []
    for label, _work, amount, unit in workloads:
        rates = {
            name: amount / statistics.median(results[label, name]) for name in ("wrapped", "plain")
        }
        figures.append(
            {
                "figure": label,
                "unit": unit,
                "client": rates["wrapped"],
                "plain_socket": rates["plain"],
                "ratio": rates["wrapped"] / rates["plain"],
            }
        )
    figures.append({"figure": "server peak RSS", "unit": "MiB", "value": peak})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    figures = run(parser.parse_args())
    print(f"{'figure':<16}{'Client':>12}{'plain socket':>14}{'ratio':>8}  unit")
    for fig in figures:
        if "ratio" in fig:
            print(
                f"{fig['figure']:<16}{fig['client']:>12.1f}{fig['plain_socket']:>14.1f}"
                f"{fig['ratio']:>8.2f}  {fig['unit']}"
            )
        else:
            print(f"{fig['figure']:<16}{fig['value']:>12.1f}{'':>22}  {fig['unit']}")
    for fig in figures:
        print(json.dumps(fig))


if __name__ == "__main__":
    main()
