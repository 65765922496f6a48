"""
Replication figures of issue 4, each beside a baseline measured in the
same run, on PostgreSQL:

  - backfill: a new, empty server copies 100 files of 16 MiB
    (C{--files}, C{--mib}, put to a lone server in a namespace of
    C{min_copies} 1) from a real server; MB/s from the moment it
    listens (its replicator starts right after) until its last replica
    row, beside a plain copy of the same stored files over loopback by a
    minimal Python socket sender and receiver (1 MiB reads, write, fsync
    of each file); plain copies and new servers alternate (C{--repeat}
    new servers, a plain copy before and after each), medians compared;
  - lag: 4 KiB files put one after another to server A (C{--lag-files})
    in a namespace of C{min_copies} 1, so that the put is not forwarded
    and B's copy is its replicator's; the time from the put's
    acknowledgement to server B's replica row, p50 and p99, with passes so
    rare (C{--replicate-interval=300}) that only PostgreSQL's notifications
    can wake B; beside the put's own latency, the baseline a client sees
    anyway.  Then as many puts in a namespace of the default settings
    (two copies while two hosts are alive): A forwards each to B as it
    arrives, so B's copy is recorded in the put's own commit, before the
    acknowledgement (lag 0, checked for each file); their latency is the
    price of that (the first puts' latency includes B's replicator
    copying them meanwhile, these' does not);
  - sweep: one replicator pass with nothing to do, with 1,000 and with
    100,000 files stored (C{--sweep-files}), their rows inserted directly
    in bulk with a replica row for the server, so nothing is missing.
    The pass is a real L{Replicator} pass on a real L{PostgresStore}, run
    in this process, the two databases' passes alternating: the first pass
    (from file id 0, as at start and in the hourly rescan) and the median
    of the C{--passes} after it.

Servers are real C{twistd koboldfs} processes on loopback
(L{koboldfs.test.cluster}), each with its data in a new directory.

    bash .ci/postgres.sh /work/venv/bin/python benchmarks/replication.py

Needs C{KOBOLDFS_TEST_POSTGRES_URL} (C{.ci/postgres.sh} sets it); scratch
databases are created on that cluster and dropped.  Output: a table, then
one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from koboldfs.client import DeferredClient  # noqa: E402
from koboldfs.connection import ConnectionCache  # noqa: E402
from koboldfs.interfaces import ServerInfo  # noqa: E402
from koboldfs.metadata import store_from_url  # noqa: E402
from koboldfs.replicator import Replicator  # noqa: E402
from koboldfs.config import ServerConfig  # noqa: E402
from koboldfs.node import Node  # noqa: E402
from koboldfs.storage import Storage  # noqa: E402
from koboldfs.test.cluster import ServerProcess  # noqa: E402
from koboldfs.test.pgcluster import create_database, drop_database, query  # noqa: E402
from koboldfs.test.support import free_port, sleep  # noqa: E402

NAMESPACE = "bench"
#: A namespace of the default settings: its puts are forwarded.
FORWARDED = "bench-forwarded"
MIB = 1024 * 1024
#: Passes only notifications can hurry.
RARE = "--replicate-interval=300"
HEADER = struct.Struct("!HQ")


# -- the baseline copy: a plain sender and receiver over loopback


def receive(directory: str, port_file: str) -> None:
    """
    Accept one connection; for each (name, size, bytes) write the file
    under C{directory} and fsync it; print the seconds from the first byte
    to the last fsync.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    conn, _ = server.accept()
    stream = conn.makefile("rb", buffering=MIB)
    started = None
    while True:
        header = stream.read(HEADER.size)
        if not header:
            break
        started = started or time.monotonic()
        length, size = HEADER.unpack(header)
        name = stream.read(length).decode()
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        left = size
        while left:
            chunk = stream.read(min(MIB, left))
            if not chunk:
                raise SystemExit("sender went away")
            os.write(fd, chunk)
            left -= len(chunk)
        os.fsync(fd)
        os.close(fd)
    print(time.monotonic() - (started or time.monotonic()))


def send(port: int, paths: list[str]) -> None:
    """
    Send each file: name, size, then its bytes in 1 MiB reads.
    """
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for path in paths:
            name = os.path.basename(path).encode()
            size = os.path.getsize(path)
            conn.sendall(HEADER.pack(len(name), size) + name)
            with open(path, "rb") as f:
                while chunk := f.read(MIB):
                    conn.sendall(chunk)


def plain_copy(paths: list[str], base: str) -> float:
    """
    Copy C{paths} over loopback into a new directory under C{base} with
    two processes; the seconds it took, from the first byte received to
    the last fsync.  The copy is deleted afterwards.
    """
    target = tempfile.mkdtemp(prefix="plain-", dir=base)
    port_file = os.path.join(target, ".port")
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--_receive", target, port_file], stdout=subprocess.PIPE
    )
    while not os.path.exists(port_file):
        time.sleep(0.01)
    with open(port_file) as f:
        port = f.read()
    os.unlink(port_file)
    list_file = os.path.join(base, "paths.txt")
    with open(list_file, "w") as f:
        f.write("\n".join(paths))
    subprocess.run([sys.executable, __file__, "--_send", port, list_file], check=True)
    out, _ = receiver.communicate()
    if receiver.returncode:
        raise RuntimeError("the plain receiver failed")
    shutil.rmtree(target)
    # The receiver's own count: the processes' start is not the copy.
    return float(out)


# -- helpers


class Bench:
    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.base = tempfile.mkdtemp(prefix="koboldfs-replbench-", dir=args.dir)
        self.servers: list[ServerProcess] = []
        self.databases: list[str] = []
        self.results: dict[str, Any] = {}
        self.cleanups: list[Any] = []

    async def database(self) -> str:
        url = await create_database(self.args.url, prefix="koboldfs_replbench")
        self.databases.append(url)
        return url

    async def server(self, name: str, db: str, *extra: str) -> ServerProcess:
        server = ServerProcess(self.base, name, db=db, extra=("--scrub-rate=0", *extra))
        self.servers.append(server)
        await server.start()
        return server

    async def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            await cleanup()
        for server in self.servers:
            await server.stop()
        for url in self.databases:
            await drop_database(url)
        shutil.rmtree(self.base, ignore_errors=True)

    async def replicas_of(self, db: str, server: str) -> int:
        [(count,)] = await query(db, f"SELECT count(*) FROM replicas WHERE server = '{server}'")
        return int(count)

    async def one_copy_per_put(self, db: str) -> None:
        """
        C{min_copies} 1 for L{NAMESPACE}, as C{koboldfs admin namespace set
        bench --min-copies 1} does: its puts are not forwarded, so every
        other copy is the replicator's.
        """
        store = store_from_url(db, self.reactor)
        await store.start()
        try:
            assert (await store.set_namespace(NAMESPACE, min_copies=1)).min_copies == 1
        finally:
            await store.stop()

    # -- backfill

    async def backfill(self) -> None:
        args = self.args
        db = await self.database()
        await self.one_copy_per_put(db)
        a = await self.server("a", db, RARE)
        client = DeferredClient(NAMESPACE, [a.address], self.reactor, timeout=300)
        size = args.mib * MIB
        for n in range(args.files):
            body = os.urandom(size)
            assert await client.put(f"big/{n:03d}", body)
        del body
        await client.close()
        rows = await query(db, "SELECT path FROM files ORDER BY id")
        paths = [os.path.join(a.data, path) for (path,) in rows]
        total = args.files * size
        # Let the writes of the puts settle before timing anything.
        await self._sync()
        # Alternately, so that both see the same machine: plain, new
        # server, plain, new server... plain.
        plain = [await self._plain(paths)]
        backfill: list[float] = []
        cpu_used: list[float] = []
        for n in range(args.repeat):
            b = await self.server(f"b{n}", db, RARE)
            # From the moment it listens: its replicator starts right after.
            started = time.monotonic()
            cpu = cpu_seconds(a) + cpu_seconds(b)
            while await self.replicas_of(db, b.name) < args.files:
                await sleep(0.02)
            backfill.append(time.monotonic() - started)
            cpu_used.append(cpu_seconds(a) + cpu_seconds(b) - cpu)
            assert len(os.listdir(os.path.join(b.data, "tmp"))) == 0
            await b.stop()
            # Forgotten, so that the next new server copies from A alone.
            await query(db, f"UPDATE servers SET state = 'dead' WHERE name = '{b.name}'")
            shutil.rmtree(b.data)
            await self._sync()
            plain.append(await self._plain(paths))
        self.results["backfill"] = {
            "files": args.files,
            "file_mib": args.mib,
            "backfill_s": backfill,
            "backfill_MBps": total / statistics.median(backfill) / 1e6,
            "plain_s": plain,
            "plain_MBps": total / statistics.median(plain) / 1e6,
            "ratio": statistics.median(plain) / statistics.median(backfill),
            "servers_cpu_s": cpu_used,
        }
        await a.stop()
        shutil.rmtree(a.data)

    async def _sync(self) -> None:
        await deferToThread(os.sync)
        await sleep(1)

    async def _plain(self, paths: list[str]) -> float:
        return await deferToThread(plain_copy, paths, self.base)

    # -- lag

    async def lag(self) -> None:
        args = self.args
        db = await self.database()
        await self.one_copy_per_put(db)
        b = await self.server("b", db, RARE)
        # A, started once B is registered, forwards from its first put on.
        while not await query(db, "SELECT 1 FROM servers WHERE name = 'b'"):
            await sleep(0.05)
        a = await self.server("a", db, RARE)
        body = os.urandom(4096)
        acked, latency = await self._puts(a, NAMESPACE, "small", body)
        deadline = time.monotonic() + 120
        while await self.replicas_of(db, "b") < args.lag_files:
            if time.monotonic() > deadline:
                raise RuntimeError("B did not copy every file")
            await sleep(0.05)
        rows = await self._copies(db, NAMESPACE)
        from_ack = sorted(copied - acked[key] for key, _, copied in rows)
        from_commit = sorted(copied - created for _, created, copied in rows)
        # The same, forwarded: B's copy recorded with the file.
        f_acked, f_latency = await self._puts(a, FORWARDED, "fwd", body)
        f_rows = await self._copies(db, FORWARDED)
        # Recorded in the put's own commit (the file's time), before its ack.
        at_ack = sum(
            1 for key, created, copied in f_rows if copied == created and copied <= f_acked[key]
        )
        self.results["lag"] = {
            "files": args.lag_files,
            "pause_s": args.lag_pause,
            "lag_ms_p50": percentile(from_ack, 50) * 1000,
            "lag_ms_p99": percentile(from_ack, 99) * 1000,
            "lag_from_publish_ms_p50": percentile(from_commit, 50) * 1000,
            "lag_from_publish_ms_p99": percentile(from_commit, 99) * 1000,
            "put_ms_p50": percentile(sorted(latency), 50) * 1000,
            "put_ms_p99": percentile(sorted(latency), 99) * 1000,
            "forwarded_put_ms_p50": percentile(sorted(f_latency), 50) * 1000,
            "forwarded_put_ms_p99": percentile(sorted(f_latency), 99) * 1000,
            "forwarded_recorded_at_ack": at_ack,
        }
        for server in (a, b):
            await server.stop()

    async def _puts(
        self, server: ServerProcess, namespace: str, prefix: str, body: bytes
    ) -> tuple[dict[str, float], list[float]]:
        """
        Put C{--lag-files} copies of C{body} one after another; the time
        each was acknowledged, and each put's latency.
        """
        client = DeferredClient(namespace, [server.address], self.reactor)
        acked: dict[str, float] = {}
        latency = []
        for n in range(self.args.lag_files):
            key = f"{prefix}/{n:05d}"
            started = time.time()
            assert await client.put(key, body)
            acked[key] = time.time()
            latency.append(acked[key] - started)
            if self.args.lag_pause:
                await sleep(self.args.lag_pause)
        await client.close()
        return acked, latency

    async def _copies(self, db: str, namespace: str) -> list[tuple[str, float, float]]:
        """
        Each file of C{namespace} with B's copy: key, the file's and the
        copy's creation times.
        """
        rows = await query(
            db,
            "SELECT f.key, f.created, r.created FROM files f"
            " JOIN namespaces n ON n.id = f.namespace_id"
            " JOIN replicas r ON r.file_id = f.id AND r.server = 'b'"
            f" WHERE n.name = '{namespace}'",
        )
        assert len(rows) == self.args.lag_files, f"{len(rows)} copies on B in {namespace}"
        return rows

    # -- sweep

    async def sweep(self) -> None:
        """
        Passes on each database in turn, so that each count sees the same
        machine: the first pass of each, then the others alternately.
        """
        replicators = {}
        for count in self.args.sweep_files:
            replicators[count] = await self._sweeper(count)
        times: dict[int, list[float]] = {count: [] for count in replicators}
        for _ in range(self.args.passes + 1):
            for count, replicator in replicators.items():
                started = time.perf_counter()
                await replicator.sweep()
                times[count].append(time.perf_counter() - started)
        results = {}
        for count, replicator in replicators.items():
            assert not replicator.retries
            store = replicator._node.store
            assert not await store.missing_replicas("s", 0, 1)
            results[count] = {
                "files": count,
                "first_pass_ms": times[count][0] * 1000,
                "pass_ms_median": statistics.median(times[count][1:]) * 1000,
                "pass_ms_max": max(times[count][1:]) * 1000,
            }
        self.results["sweep"] = results

    async def _sweeper(self, count: int) -> Replicator:
        """
        A replicator of server C{s} on a new database of C{count} files,
        every one of them held by C{s}.
        """
        db = await self.database()
        store = store_from_url(db, self.reactor)
        await store.start()
        self.cleanups.append(store.stop)
        pool = ThreadPool(minthreads=1, maxthreads=4, name="bench-io")
        pool.start()
        self.cleanups.append(lambda: deferToThread(pool.stop))
        data = tempfile.mkdtemp(prefix="sweep-", dir=self.base)
        storage = Storage(data, self.reactor, pool)
        await storage.start()
        config = ServerConfig(name="s", host="s", data=data, db=db)
        await store.register_server(
            ServerInfo("s", "s", f"127.0.0.1:{free_port()}", "http://x", heartbeat=time.time())
        )
        ns = await store.namespace(NAMESPACE, create=True)
        assert ns is not None
        await query(
            db,
            "INSERT INTO files (fid, namespace_id, key, size, sha256, created, path, state)"
            f" SELECT md5(i::text), {ns.id}, 'k' || i, 4096, repeat('0', 64), 0,"
            " 'files/' || md5(i::text), 'live' FROM generate_series(1, %d) AS i" % count,
        )
        await query(
            db,
            "INSERT INTO replicas (file_id, server, state, created)"
            " SELECT id, 's', 'ok', 0 FROM files",
        )
        await query(db, "VACUUM ANALYZE")
        peers = ConnectionCache(self.reactor)
        self.cleanups.append(peers.close)
        node = Node(config, storage, store, self.reactor, peers)
        await node.refresh_servers()
        return Replicator(node, self.reactor, 300.0)


def cpu_seconds(server: ServerProcess) -> float:
    """
    The CPU time (user and system) a server process has used so far.
    """
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    """
    The nearest-rank percentile of sorted C{values}.
    """
    rank = max(1, min(len(values), round(p / 100 * len(values) + 0.5)))
    return values[rank - 1]


def report(results: dict[str, Any]) -> None:
    if "backfill" in results:
        r = results["backfill"]
        print(
            f"backfill  {r['files']} x {r['file_mib']} MiB: {r['backfill_MBps']:.0f} MB/s "
            f"({', '.join(f'{s:.2f}' for s in r['backfill_s'])} s); "
            f"plain copy {r['plain_MBps']:.0f} MB/s "
            f"({', '.join(f'{s:.2f}' for s in r['plain_s'])} s); medians, "
            f"backfill/plain = {r['ratio']:.2f}; CPU of both servers "
            f"{', '.join(f'{s:.1f}' for s in r['servers_cpu_s'])} s"
        )
    if "lag" in results:
        r = results["lag"]
        print(
            f"lag       {r['files']} x 4 KiB: ack -> replica p50 {r['lag_ms_p50']:.1f} ms, "
            f"p99 {r['lag_ms_p99']:.1f} ms (from the metadata commit: "
            f"p50 {r['lag_from_publish_ms_p50']:.1f}, p99 {r['lag_from_publish_ms_p99']:.1f} ms); "
            f"put latency p50 {r['put_ms_p50']:.1f} ms, p99 {r['put_ms_p99']:.1f} ms"
        )
        print(
            f"forwarded {r['files']} x 4 KiB: B's copy recorded at the ack for "
            f"{r['forwarded_recorded_at_ack']} (lag 0); put latency "
            f"p50 {r['forwarded_put_ms_p50']:.1f} ms, p99 {r['forwarded_put_ms_p99']:.1f} ms"
        )
    if "sweep" in results:
        for count, r in results["sweep"].items():
            print(
                f"sweep     {count:>7} files: pass {r['pass_ms_median']:.2f} ms median "
                f"(max {r['pass_ms_max']:.2f}), first pass from id 0 {r['first_pass_ms']:.1f} ms"
            )
    for name, r in results.items():
        print(json.dumps({"figure": name, **(r if name != "sweep" else {"by_files": r})}))


async def main(reactor: Any, args: argparse.Namespace) -> None:
    bench = Bench(reactor, args)
    try:
        if "sweep" in args.only:
            await bench.sweep()
        if "lag" in args.only:
            await bench.lag()
        if "backfill" in args.only:
            await bench.backfill()
    finally:
        await bench.close()
    report(bench.results)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KOBOLDFS_TEST_POSTGRES_URL"))
    parser.add_argument("--dir", default=None, help="where data goes [default: $TMPDIR]")
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--lag-files", type=int, default=500)
    parser.add_argument(
        "--lag-pause", type=float, default=0.0, help="seconds between puts [default: none]"
    )
    parser.add_argument("--sweep-files", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--passes", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="backfills [default: 3]")
    parser.add_argument(
        "--only", nargs="+", default=["sweep", "lag", "backfill"], help="figures to measure"
    )
    args = parser.parse_args()
    if not args.url:
        parser.error("no PostgreSQL: run under bash .ci/postgres.sh, or give --url")
    return args


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--_receive":
        receive(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--_send":
        with open(sys.argv[3]) as f:
            send(int(sys.argv[2]), f.read().split("\n"))
    else:
        options = parse()
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
